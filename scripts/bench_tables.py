"""Markdown tables from bench.py's records: one table per layer shape and activation dtype
(µs of the op, its speed-up over torch.matmul in that dtype, and the baselines), a line of
M = 1 bandwidth figures under each fp16 table, the roofline rows of the two large layers (fp16),
and the decode-stack line.

Records live one file per run in benchmarks/runs/ (<date>_<commit>_<card>.json, each a JSON
list of records; see benchmarks/README.md). Pass folders of runs or run files:

    python scripts/bench_tables.py benchmarks/runs --commit 0611e75 > tables.md
    python scripts/bench_tables.py benchmarks/runs/2026-12-05_0611e75_H200.json --commit 0611e75
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from collections import defaultdict
from typing import Iterable, List

RUNS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "runs")

FORMATS = ["q4_g128", "q2_g64", "mixed_2.5", "mixed_3.0"]
TENSOR_TFLOPS = 989.0  # dense fp16 / bf16 tensor-core rate of the H100 / H200 SXM


def card_name(device: str) -> str:
    """A file-name-safe card name: "NVIDIA H100 80GB HBM3" -> "H100-80GB-HBM3"."""
    return re.sub(r"[^A-Za-z0-9]+", "-", device.replace("NVIDIA", "")).strip("-") or "unknown"


def run_file_name(rec: dict) -> str:
    """<date>_<commit>_<card>.json of a run, from any of its records (date YYYY-MM-DD,
    commit shortened to 7 characters)."""
    return f"{rec['date']}_{rec['commit'][:7]}_{card_name(rec['device'])}.json"


def load_runs(paths: Iterable[str], with_knobs: bool = False) -> List[dict]:
    """Every record of the given run files and folders of run files (*.json, by name) that ran
    under the plan's own choices (bench.py's "knobs" empty or absent); with_knobs: every one."""
    recs = []
    for path in paths:
        files = sorted(glob.glob(os.path.join(path, "*.json"))) if os.path.isdir(path) else [path]
        for name in files:
            with open(name) as f:
                run = json.load(f)
            if not isinstance(run, list):
                raise ValueError(f"{name}: a run file holds a JSON list of records, "
                                 f"got {type(run).__name__}")
            recs += [r for r in run if with_knobs or not r.get("knobs")]
    return recs


def same_commit(rec_commit: str, commit: str) -> bool:
    """Short and full commit ids name the same commit when one starts with the other."""
    return bool(rec_commit) and (rec_commit.startswith(commit) or commit.startswith(rec_commit))


def dtype_of(rec: dict) -> str:
    """The activation dtype of a layer record; runs before bench.py's --dtypes were fp16."""
    return rec.get("dtype", "fp16")


def speedup_of(rec: dict) -> float:
    """A layer record's speed-up over torch.matmul in x's dtype (runs before bench.py's --dtypes
    recorded only the fp16 one, and had fp16 x)."""
    return rec.get("speedup_matmul", rec["speedup_fp16"])


def shape_table(recs, K, N, dtype="fp16"):
    """µs of our gemm with `dtype` activations per M and format, with in brackets the speed-up
    over torch.matmul in the same dtype; the baselines' µs after them."""
    rows = defaultdict(dict)
    for r in recs:
        if dtype_of(r) == dtype:
            rows[r["M"]][r["format"]] = r
    if not rows:
        return []
    fmts = [f for f in FORMATS if any(f in v for v in rows.values())]
    title = f"#### {K} × {N} (K × N)" + (", bf16 activations" if dtype == "bf16" else "")
    out = [title, "",
           "| M | " + " | ".join(fmts) + " | fp16 | bf16 | int4pk |",
           "|---:|" + "---|" * len(fmts) + "---:|---:|---:|"]
    for M in sorted(rows):
        cells = []
        for f in fmts:
            r = rows[M].get(f)
            speedup = speedup_of(r) if r else None
            cells.append(f"{r['us']:.1f} ({speedup:.2f}×)" if r else "")
        any_r = next(iter(rows[M].values()))
        i4 = any_r["int4pack_us"]
        out.append(f"| {M} | " + " | ".join(cells) + f" | {any_r['matmul_fp16_us']:.1f} | "
                   f"{any_r['matmul_bf16_us']:.1f} | {'-' if i4 is None else f'{i4:.1f}'} |")
    m1 = rows.get(1, {})
    if m1 and dtype == "fp16":
        any_r = next(iter(m1.values()))
        out += ["", "bpw: " + ", ".join(f"{f} {m1[f]['bpw']}" for f in fmts if f in m1)
                + f"; read bandwidth {any_r['read_bw_tbs']} TB/s; at M = 1, % of it: "
                + ", ".join(f"{f} {m1[f]['pct_bw']} %" for f in fmts if f in m1)
                + "; fastest plain read of the same bytes / our time: "
                + ", ".join(f"{f} {m1[f]['pct_read_same']} % ({m1[f]['read_same_bytes_us']} µs)"
                            for f in fmts if f in m1)]
    return out + [""]


def roofline(recs):
    """Rows M: byte floor (bytes / read bandwidth; in brackets the fastest plain read of the
    same bytes, fixed costs included) and flop floor, and each large layer's time with the
    larger floor / time in brackets."""
    big = [(8192, 28672), (28672, 8192)]
    by = {(tuple(r["shape"]), r["format"], r["M"]): r for r in recs}
    Ms = sorted({r["M"] for r in recs if tuple(r["shape"]) in big})
    head = ("| M | byte floor q4 / mixed 2.5 (plain read of the bytes) | flop floor | "
            "8192 × 28672 q4 | mixed 2.5 | "
            "28672 × 8192 q4 | mixed 2.5 | fp16 matmul (8192 × 28672) |")
    out = [head, "|---:|---|---:|---|---|---|---|---|"]
    for M in Ms:
        q4, mx = by.get((big[0], "q4_g128", M)), by.get((big[0], "mixed_2.5", M))
        if not q4 or not mx:
            continue
        bw = q4["read_bw_tbs"]
        floors = {f: r["weight_bytes"] / bw / 1e6 for f, r in (("q4_g128", q4), ("mixed_2.5", mx))}
        flop = 2 * M * big[0][0] * big[0][1] / TENSOR_TFLOPS / 1e6
        cells = []
        for shape in big:
            for f in ("q4_g128", "mixed_2.5"):
                r = by.get((shape, f, M))
                floor = max(floors[f], flop)
                cells.append(f"{r['us']:.1f} µs ({100 * floor / r['us']:.0f} %)" if r else "")
        fp16 = q4["matmul_fp16_us"]
        fp16_floor = max(big[0][0] * big[0][1] * 2 / bw / 1e6, flop)
        out.append(f"| {M} | {floors['q4_g128']:.1f} / {floors['mixed_2.5']:.1f} µs "
                   f"({q4['read_same_bytes_us']:.1f} / {mx['read_same_bytes_us']:.1f}) | "
                   f"{flop:.1f} µs | " + " | ".join(cells)
                   + f" | {fp16:.1f} µs ({100 * fp16_floor / fp16:.0f} %) |")
    return out + [""]


def render(recs: List[dict]) -> str:
    """The tables of one run's records (one commit, one card)."""
    layers = [r for r in recs if "shape" in r and r.get("shape")]
    shapes = sorted({tuple(r["shape"]) for r in layers}, key=lambda s: (s[0] * s[1], s[0]))
    lines = []
    for K, N in shapes:
        for dtype in ("fp16", "bf16"):
            lines += shape_table([r for r in layers if tuple(r["shape"]) == (K, N)], K, N, dtype)
    lines += roofline([r for r in layers if dtype_of(r) == "fp16"])
    for r in recs:
        if r.get("kind") == "decode_stack":
            fused = ", q/k/v and gate/up fused" if r.get("stack", "").endswith("-fused") else ""
            lines.append(f"Decode stack ({r['blocks']} blocks{fused}), {r['format']}: "
                         f"{r['us_per_token']} µs/token ({r['tokens_per_s']} tokens/s), fp16 "
                         f"{r['fp16_us_per_token']} µs ({r['fp16_tokens_per_s']} tokens/s): "
                         f"{r['speedup_fp16']}×")
    return "\n".join(lines)


def select_run(recs: List[dict], commit: str, device: str = None) -> List[dict]:
    """The records of one commit on one card; ValueError when there are none, or when the
    commit ran on several cards and `device` (a substring of the name) does not pick one."""
    recs = [r for r in recs if same_commit(r.get("commit", ""), commit)]
    if device:
        recs = [r for r in recs if device in r.get("device", "")]
    if not recs:
        raise ValueError(f"no records for commit {commit}" + (f" on {device!r}" if device else ""))
    devices = sorted({r.get("device", "?") for r in recs})
    if len(devices) > 1:
        raise ValueError(f"commit {commit} was measured on {devices}; choose one with --device")
    return recs


def one_run_from_args(tool: str, description: str, argv=None) -> List[dict]:
    """The command line of the tools that read one run (this one, bench_targets.py): run files
    or folders, --commit, --device; the selected records, or exit with the reason."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("runs", nargs="*", default=[RUNS_DIR],
                    help="run files or folders of them (default: benchmarks/runs)")
    ap.add_argument("--commit", required=True, help="this commit's records")
    ap.add_argument("--device", default=None,
                    help="only records whose device contains this (needed when the commit "
                         "was measured on several cards)")
    args = ap.parse_args(argv)
    try:
        return select_run(load_runs(args.runs), args.commit, args.device)
    except ValueError as e:
        sys.exit(f"{tool}: {e} (in {', '.join(args.runs)})")


def main(argv=None):
    print(render(one_run_from_args("bench_tables", __doc__.split("\n")[0], argv)))


if __name__ == "__main__":
    main()
