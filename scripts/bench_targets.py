"""The speed targets, checked against one bench.py run: each with the value the run measured
and whether it is met ("not measured" where the run lacks the records).

    python scripts/bench_targets.py benchmarks/runs --commit 40933f4 --device H100

  1. decode (M = 1, fp16 x) near the read time of the layer's bytes: 4-bit g128 at >= 85 % of
     the plain read, mixed 2.5 / mixed 3.0 / 2-bit g64 at >= 75 %, and mixed 2.5 in <= 0.75x
     the 4-bit time (fewer bits, less time);
  2. flat in M while memory-bound: M <= 16 within 1.1x of the M = 1 time, M = 32 1.25x,
     M = 64 1.6x;
  3. never slower than torch.matmul in x's dtype (fp16 and bf16, every bench layer and M), and
     tokens/s that never drop as M grows;
  4. 4096 x 4096 at M = 1 within 1.5x of the plain read of its bytes;
  5. the 32-block Llama-3-8B decode step at >= 3.0x fp16 tokens/s (4-bit) and >= 4.0x
     (mixed 2.5).
Targets 1 and 2 are read on the two large layers (8192 x 28672 and 28672 x 8192).
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Optional, Tuple

import bench_tables

LARGE = [(8192, 28672), (28672, 8192)]
BENCH_LAYERS = LARGE + [(4096, 4096), (8192, 8192)]

Row = Tuple[str, str, Optional[bool]]  # target, measured, met (None: not measured)


def layer_records(recs: List[dict]) -> dict:
    """(K, N, format, dtype) -> {M: record} of the run's layer records."""
    out = defaultdict(dict)
    for r in recs:
        if "shape" in r and r.get("kind") != "decode_stack":
            out[(r["shape"][0], r["shape"][1], r["format"], bench_tables.dtype_of(r))][r["M"]] = r
    return out


def shown(values: List[Tuple[str, float]], unit: str) -> str:
    """The measured values as "8192x28672 87.1 %, ..." (unit "%") or "... 1.15x" (unit "x")."""
    return ", ".join(f"{where} {v:.1f} %" if unit == "%" else f"{where} {v:.2f}x"
                     for where, v in values)


def at_least(name: str, values: List[Tuple[str, float]], bound: float, unit: str) -> Row:
    if not values:
        return name, "", None
    return name, shown(values, unit), all(v >= bound for _, v in values)


def at_most(name: str, values: List[Tuple[str, float]], bound: float, unit: str) -> Row:
    if not values:
        return name, "", None
    return name, shown(values, unit), all(v <= bound for _, v in values)


def decode_rows(layers: dict) -> List[Row]:
    rows = []
    for fmt, bound in (("q4_g128", 85), ("mixed_2.5", 75), ("mixed_3.0", 75), ("q2_g64", 75)):
        vals = [(f"{K}x{N}", layers[(K, N, fmt, "fp16")][1]["pct_read_same"]) for K, N in LARGE
                if 1 in layers.get((K, N, fmt, "fp16"), {})]
        rows.append(at_least(f"1: M = 1 {fmt} >= {bound} % of the plain read", vals, bound, "%"))
    vals = [(f"{K}x{N}", layers[(K, N, "mixed_2.5", "fp16")][1]["us"] /
             layers[(K, N, "q4_g128", "fp16")][1]["us"]) for K, N in LARGE
            if 1 in layers.get((K, N, "mixed_2.5", "fp16"), {}) and
            1 in layers.get((K, N, "q4_g128", "fp16"), {})]
    rows.append(at_most("1: M = 1 mixed_2.5 time <= 0.75x the q4_g128 time", vals, 0.75, "x"))
    return rows


def flat_rows(layers: dict) -> List[Row]:
    rows = []
    for lo, hi, bound in ((2, 16, 1.1), (32, 32, 1.25), (64, 64, 1.6)):
        vals = []
        for K, N in LARGE:
            for fmt in ("q4_g128", "mixed_2.5"):
                by_m = layers.get((K, N, fmt, "fp16"), {})
                ms = [m for m in by_m if lo <= m <= hi]
                if 1 in by_m and ms:
                    vals.append((f"{K}x{N} {fmt}",
                                 max(by_m[m]["us"] for m in ms) / by_m[1]["us"]))
        span = f"M = {lo}-{hi}" if lo != hi else f"M = {lo}"
        rows.append(at_most(f"2: {span} time <= {bound}x the M = 1 time", vals, bound, "x"))
    return rows


def matmul_rows(layers: dict) -> List[Row]:
    slower, drops, n = [], [], 0
    for (K, N, fmt, dtype), by_m in sorted(layers.items()):
        if (K, N) not in BENCH_LAYERS:
            continue
        ms = sorted(by_m)
        for m in ms:
            n += 1
            if bench_tables.speedup_of(by_m[m]) < 1.0:
                slower.append((m, bench_tables.speedup_of(by_m[m]), f"{K}x{N} {fmt} {dtype}"))
        for a, b in zip(ms, ms[1:]):  # tokens per µs
            if b / by_m[b]["us"] < a / by_m[a]["us"]:
                drops.append(f"{K}x{N} {fmt} {dtype} M {a}->{b}")
    if not n:
        return [("3: >= torch.matmul at every M", "", None),
                ("3: throughput never drops as M grows", "", None)]
    worst = min(slower, key=lambda s: s[1]) if slower else None
    text = (f"{len(slower)} of {n} records below 1.0x, from M = {min(s[0] for s in slower)}; "
            f"worst {worst[1]:.2f}x ({worst[2]} M = {worst[0]})") if slower else f"all {n}"
    return [("3: >= torch.matmul at every M", text, not slower),
            ("3: throughput never drops as M grows",
             f"{len(drops)} drops" + (f": {'; '.join(drops[:4])}" if drops else ""), not drops)]


def small_layer_row(layers: dict) -> Row:
    r = layers.get((4096, 4096, "q4_g128", "fp16"), {}).get(1)
    vals = [("4096x4096 q4_g128", r["us"] / r["read_same_bytes_us"])] if r else []
    return at_most("4: 4096x4096 M = 1 <= 1.5x its plain read", vals, 1.5, "x")


def stack_rows(recs: List[dict]) -> List[Row]:
    rows = []
    for stack in ("llama3-8b", "llama3-8b-fused"):
        for fmt, bound in (("q4_g128", 3.0), ("mixed_2.5", 4.0)):
            vals = [(f"{r['blocks']} blocks", r["speedup_fp16"]) for r in recs
                    if r.get("kind") == "decode_stack" and r.get("stack") == stack and
                    r["format"] == fmt and r.get("blocks") == 32]
            rows.append(at_least(f"5: decode step ({stack}) {fmt} >= {bound}x fp16", vals,
                                 bound, "x"))
    return rows


def targets(recs: List[dict]) -> List[Row]:
    layers = layer_records(recs)
    return (decode_rows(layers) + flat_rows(layers) + matmul_rows(layers) +
            [small_layer_row(layers)] + stack_rows(recs))


def render(rows: List[Row]) -> str:
    met = {True: "yes", False: "no", None: "not measured"}
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {shown} | {met[ok]} |" for name, shown, ok in rows]
    return "\n".join(lines)


def main(argv=None):
    recs = bench_tables.one_run_from_args("bench_targets", __doc__.split("\n")[0], argv)
    print(render(targets(recs)))


if __name__ == "__main__":
    main()
