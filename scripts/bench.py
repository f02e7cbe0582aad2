"""Benchmark mbwq::gemm against the card's read bandwidth and torch's own matmuls.

One run measures, on the current CUDA device:
  * read bandwidth: a 2 GiB device reduction, the same 2 GiB through the read probe of
    scripts/read_probe.py, and a 1 GiB device-to-device copy (bytes read [+ written] /
    time); the largest is `read_bw_tbs`;
  * per layer, the fastest plain read of exactly the layer's weight bytes
    (`read_same_bytes_us`: the read probe, or torch's reductions if faster): what a single
    read kernel achieves at that size, fixed per-call costs included (`%rd` = that time /
    ours: 100 would be as fast as only reading the bytes);
  * torch.matmul in fp16 and bf16 on the same [M, K] x [K, N] problem;
  * torch.ops.aten._weight_int4pack_mm (4-bit, group 128, bf16) where it runs, else null;
  * our gemm through torch.ops.mbwq.gemm (CUDA-graph replays) and through MBWQLinear (eager
    calls, so Python / launch overhead shows), with fp16 x and, in a second pass, bf16 x
    (`--dtypes`; records carry "dtype", and "speedup_matmul" against torch.matmul in that
    dtype);
for M in {1, 2, 4, ..., 4096} on LLM layer shapes, in the formats uniform 4-bit g128, uniform
2-bit g64, and mixed 4/3/2-bit groups of 32-128 rows averaging ~2.5 and ~3.0 code bits.

Timing: warm-up, then a CUDA graph of several calls replayed many times, timed with CUDA
events; the median per call over the replays is reported. Every call of a graph uses another
copy of the weights and x, and the copies together are larger than L2 (timing.RotateBytes), so the
numbers are DRAM numbers, not L2 hits.

Layers come from scripts/random_layers.py (codes uniform over all 2^b values, random fp16
scales/zeros, channel scales and q_perm), generated on the GPU so that big shapes build in
milliseconds.

Output: a table on stdout and one JSON file for the run (a list of records; see RECORD_KEYS
and benchmarks/README.md), named <date>_<commit>_<card>.json, in --out if that is a folder
(default: $OUT if set, else benchmarks/runs/); --out ending in .json names the file itself.
Render tables from a folder of runs with scripts/bench_tables.py.

    python scripts/bench.py            # full run (a few minutes on an H100)
    python scripts/bench.py --quick    # 8192x28672, 4-bit + mixed 2.5, M in {1, 16, 256}, fp16

It also times a decode step (M = 1) through transformer blocks shaped like Llama-3-8B's (32; 8
with --quick), with separate projections and with q/k/v and gate/up fused (records with
"kind": "decode_stack"; --stack-blocks 0 skips it).

Every record says which kernel-choice knobs (csrc/plan.h, MBWQ_* environment variables) it ran
under: "knobs" is "" for the plan's own choices, else e.g. "MBWQ_MMA_CONFIG=7".
scripts/bench_tables.py and scripts/bench_targets.py read only the "" records.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from typing import Dict, List, Optional

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS_DIR = os.path.join(ROOT, "benchmarks", "runs")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mbwq_ops  # noqa: E402 - registers torch.ops.mbwq
from mbwq_ops.apps.args import DTYPES  # noqa: E402
import read_probe  # noqa: E402
from bench_tables import run_file_name  # noqa: E402
from random_layers import FORMATS as ALL_FORMATS  # noqa: E402
from random_layers import make_layer, op_args  # noqa: E402
from timing import copies_for, time_eager, time_graph  # noqa: E402

ALL_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
ALL_SHAPES = [(4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192)]  # (K, N)
RECORD_KEYS = ["device", "torch", "commit", "date", "knobs", "shape", "format", "bpw", "M", "us",
               "layer_us", "matmul_fp16_us", "matmul_bf16_us", "int4pack_us", "weight_bytes",
               "read_bw_tbs", "eff_tbs", "pct_bw", "read_same_bytes_us", "pct_read_same",
               "speedup_fp16", "dtype", "speedup_matmul"]
GEMM_DTYPES = ("fp16", "bf16")  # names of mbwq_ops.apps.args.DTYPES that --dtypes takes


def read_bandwidth(probe: bool = True) -> Dict[str, float]:
    """TB/s of a 2 GiB read: torch.sum and (probe) the read probe (bytes read), and of a 1 GiB
    copy (bytes read + written)."""
    n = (2 << 30) // 4
    buf = torch.rand(n, device="cuda")
    out = torch.empty((), device="cuda")
    t_sum = time_graph([lambda: torch.sum(buf, 0, out=out)], min_replays=20, target_ms=300)
    a = buf[: n // 2]
    b = torch.empty_like(a)
    t_copy = time_graph([lambda: b.copy_(a)], min_replays=20, target_ms=300)
    res = {"sum_tbs": n * 4 / t_sum / 1e6, "copy_tbs": 2 * a.numel() * 4 / t_copy / 1e6}
    if probe:
        fastest = read_probe.fastest_read_us([buf])
        res["probe_tbs"] = n * 4 / fastest[0] / 1e6 if fastest else 0.0
    del buf, a, b
    torch.cuda.empty_cache()
    return res


def read_same_bytes_us(nbytes: int) -> float:
    """Microseconds the fastest plain read of `nbytes` takes (buffers rotated past L2 like the
    layers): the read probe of scripts/read_probe.py at its best configuration, or torch's
    reductions if that is faster or cannot be built (torch.sum of fp16 into fp32, torch.sum
    of the bytes as fp32, torch.amax of them as int32). Launch, ramp-up and tail included: the
    ceiling for a kernel that must read the same bytes."""
    n = copies_for(nbytes)
    bufs = [torch.rand(nbytes // 2, device="cuda").half() for _ in range(n)]
    words = [b[: b.numel() // 2 * 2].view(torch.float32) for b in bufs]
    out = torch.empty((), device="cuda", dtype=torch.float32)
    out_i = torch.empty((), device="cuda", dtype=torch.int32)
    probe = read_probe.fastest_read_us(bufs)
    us = min(
        probe[0] if probe else math.inf,
        time_graph([lambda b=b: torch.sum(b, 0, dtype=torch.float32, out=out) for b in bufs]),
        time_graph([lambda w=w: torch.sum(w, 0, out=out) for w in words]),
        time_graph([lambda w=w: torch.amax(w.view(torch.int32), 0, out=out_i) for w in words]))
    del bufs, words
    torch.cuda.empty_cache()
    return us


# ----------------------------------------------------------------------------- layers
def clone_layer_args(layer, n):
    base = op_args(layer)
    out = [base]
    for _ in range(n - 1):
        out.append(tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in base))
    return out


# ----------------------------------------------------------------------------- baselines
def bench_matmul(K, N, Ms, dtype) -> Dict[int, float]:
    n = copies_for(K * N * 2)
    Ws = [torch.randn(K, N, device="cuda", dtype=dtype) for _ in range(n)]
    res = {}
    for M in Ms:
        xs = [torch.randn(M, K, device="cuda", dtype=dtype) for _ in range(n)]
        res[M] = time_graph([lambda x=x, W=W: torch.matmul(x, W) for x, W in zip(xs, Ws)])
        del xs
    del Ws
    torch.cuda.empty_cache()
    return res


def bench_int4pack(K, N, Ms) -> Dict[int, Optional[float]]:
    """aten._weight_int4pack_mm (bf16, 4-bit, group 128), or None where it does not run."""
    try:
        n = copies_for(K * N // 2)
        packs = []
        for _ in range(n):
            w = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device="cuda")
            packs.append(torch.ops.aten._convert_weight_to_int4pack(w, 8))
        sz = torch.rand(K // 128, N, 2, device="cuda").to(torch.bfloat16)
        res = {}
        for M in Ms:
            xs = [torch.randn(M, K, device="cuda", dtype=torch.bfloat16) for _ in range(n)]
            res[M] = time_graph([lambda x=x, p=p: torch.ops.aten._weight_int4pack_mm(x, p, 128, sz)
                                 for x, p in zip(xs, packs)])
        return res
    except Exception as e:  # not built for this GPU / torch version
        print(f"bench: _weight_int4pack_mm unavailable ({type(e).__name__}: {str(e)[:120]})")
        return {M: None for M in Ms}
    finally:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- decode stack
# Per transformer block of Llama-3-8B, as (K, N): q (4096 x 4096), k and v (4096 x 1024,
# grouped-query attention), o (4096 x 4096), gate and up (4096 x 14336), down (14336 x 4096);
# 32 blocks make the model's decode step (records name the stack "llama3-8b"; records before
# 2026-12-07 used q/k/v/o all 4096 x 4096 and 8 blocks, "stack" absent).
# "llama3-8b-fused": the same weights with the projections that read one input as one layer
# (mbwq_ops.fuse_linears; fp16 likewise one matmul): qkv (4096 x 6144), o, gate_up
# (4096 x 28672), down.
STACKS = {
    "llama3-8b": [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336),
                  (4096, 14336), (14336, 4096)],
    "llama3-8b-fused": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
}
STACK_NAME = "llama3-8b"


def bench_decode_stack(blocks: int, formats: List[str], stack: str = STACK_NAME) -> List[dict]:
    """One decode step (M = 1) through `blocks` blocks of STACKS[stack], captured in one CUDA
    graph: fp16 torch.matmul against mbwq layers in each format. Each projection takes a fixed
    [1, K] input, so the step costs the projections alone (no attention, norms or activations);
    the stack's weights (several GB) are far larger than L2."""
    shapes = STACKS[stack] * blocks
    res = []
    Ws = [torch.randn(K, N, device="cuda", dtype=torch.float16) * 0.02 for K, N in shapes]
    xs = {K: torch.randn(1, K, device="cuda", dtype=torch.float16) for K, _ in shapes}
    fp16_us = time_graph([lambda: [torch.matmul(xs[K], W) for (K, _), W in zip(shapes, Ws)]])
    del Ws
    torch.cuda.empty_cache()
    for f in formats:
        layers, wbytes = [], 0
        for i, (K, N) in enumerate(shapes):
            layer, nb = make_layer(f, K, N, seed=i)
            layers.append(layer)
            wbytes += nb
        us = time_graph([lambda: [lay(xs[K]) for (K, _), lay in zip(shapes, layers)]])
        res.append({"kind": "decode_stack", "stack": stack, "blocks": blocks, "format": f,
                    "bpw": round(wbytes * 8 / sum(K * N for K, N in shapes), 3),
                    "weight_bytes": wbytes, "us_per_token": round(us, 1),
                    "tokens_per_s": round(1e6 / us, 1), "fp16_us_per_token": round(fp16_us, 1),
                    "fp16_tokens_per_s": round(1e6 / fp16_us, 1),
                    "speedup_fp16": round(fp16_us / us, 2)})
        del layers
        torch.cuda.empty_cache()
    return res


# ----------------------------------------------------------------------------- main
def commit_id() -> str:
    """$MBWQ_COMMIT when set (a copied tree's .git can lag behind its files), else git HEAD."""
    if os.environ.get("MBWQ_COMMIT"):
        return os.environ["MBWQ_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT,
                                       stderr=subprocess.DEVNULL, text=True).strip()
    except Exception:
        return "unknown"


def output_path(out: Optional[str], common: dict) -> str:
    """--out as given when it ends in .json, else <folder>/<date>_<commit>_<card>.json."""
    if out and out.endswith(".json"):
        return out
    folder = out or os.environ.get("OUT") or RUNS_DIR
    return os.path.join(folder, run_file_name(common))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subset (well under a minute)")
    ap.add_argument("--out", default=None,
                    help="folder for the run's JSON (default: $OUT if set, else "
                         "benchmarks/runs/), or a path ending in .json")
    ap.add_argument("--Ms", default=None, help="comma-separated M list (overrides the preset)")
    ap.add_argument("--shapes", default=None, help="comma-separated KxN list, e.g. 4096x4096")
    ap.add_argument("--formats", default=None, help="comma-separated formats, e.g. q4_g128")
    ap.add_argument("--dtypes", default=None,
                    help="activation dtypes of our gemm, comma-separated from fp16, bf16 "
                         "(default both; fp16 with --quick)")
    ap.add_argument("--stack-blocks", type=int, default=None,
                    help="decode-step figure: blocks of the Llama-3-8B stack (default 32, the "
                         "whole model's projections; 8 with --quick; 0 = skip)")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "bench.py needs a CUDA device"
    torch.manual_seed(0)
    if args.stack_blocks is None:
        args.stack_blocks = 8 if args.quick else 32
    if args.quick:
        shapes, formats, Ms = [(8192, 28672)], ["q4_g128", "mixed_2.5"], [1, 16, 256]
    else:
        shapes, formats, Ms = ALL_SHAPES, ALL_FORMATS, ALL_M
    if args.Ms:
        Ms = [int(m) for m in args.Ms.split(",")]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    dtypes = (args.dtypes or ("fp16" if args.quick else "fp16,bf16")).split(",")
    if sorted(set(dtypes) - set(GEMM_DTYPES)):
        ap.error(f"unknown dtype(s) {sorted(set(dtypes) - set(GEMM_DTYPES))}; choose from "
                 f"{list(GEMM_DTYPES)}")
    if args.formats:
        formats = args.formats.split(",")
        unknown = sorted(set(formats) - set(ALL_FORMATS))
        if unknown:
            ap.error(f"unknown format(s) {unknown}; choose from {ALL_FORMATS}")

    device = torch.cuda.get_device_name()
    bw = read_bandwidth()
    read_bw = max(bw.values())
    print(f"device: {device}, torch {torch.__version__}, read bandwidth: reduction "
          f"{bw['sum_tbs']:.2f} TB/s, read probe {bw['probe_tbs']:.2f} TB/s, copy "
          f"{bw['copy_tbs']:.2f} TB/s -> {read_bw:.2f} TB/s")
    common = {"device": device, "torch": torch.__version__, "commit": commit_id(),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "knobs": mbwq_ops.ops.knob_settings()}
    if common["knobs"]:
        print(f"knobs: {common['knobs']} (records marked; the tables and targets skip them)")
    out_path = output_path(args.out, common)

    records = []

    def save():  # after every layer too, so that a run cut short keeps what it measured
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path, "w") as fh:
            json.dump(records, fh, indent=1)

    header = (f"{'K x N':>12} {'format':>10} {'x':>4} {'bpw':>5} {'M':>5} {'us':>9} "
              f"{'layer':>9} {'fp16':>9} {'bf16':>9} {'int4pk':>9} {'TB/s':>6} {'%bw':>5} "
              f"{'%rd':>5} {'x mm':>6}")
    for K, N in shapes:
        mm16 = bench_matmul(K, N, Ms, torch.float16)
        mm_bf = bench_matmul(K, N, Ms, torch.bfloat16)
        i4 = bench_int4pack(K, N, Ms)
        print(f"\n{header}")
        for f in formats:
            layer, wbytes = make_layer(f, K, N)
            n = copies_for(wbytes)
            arg_sets = clone_layer_args(layer, n)
            bpw = wbytes * 8 / (K * N)
            rd_us = read_same_bytes_us(wbytes)
            for dt, M in [(dt, M) for dt in dtypes for M in Ms]:
                xs = [torch.randn(M, K, device="cuda", dtype=DTYPES[dt]) for _ in range(n)]
                us = time_graph([lambda x=x, a=a: torch.ops.mbwq.gemm(x, *a)
                                 for x, a in zip(xs, arg_sets)])
                layer_us = time_eager([lambda x=x: layer(x) for x in xs[:1]] * 4)
                eff = wbytes / us / 1e6
                mm = (mm16 if dt == "fp16" else mm_bf)[M]
                rec = dict(common, shape=[K, N], format=f, bpw=round(bpw, 3), M=M, us=round(us, 2),
                           layer_us=round(layer_us, 2), matmul_fp16_us=round(mm16[M], 2),
                           matmul_bf16_us=round(mm_bf[M], 2),
                           int4pack_us=None if i4[M] is None else round(i4[M], 2),
                           weight_bytes=wbytes, read_bw_tbs=round(read_bw, 3),
                           eff_tbs=round(eff, 3), pct_bw=round(100 * eff / read_bw, 1),
                           read_same_bytes_us=round(rd_us, 2),
                           pct_read_same=round(100 * rd_us / us, 1),
                           speedup_fp16=round(mm16[M] / us, 2), dtype=dt,
                           speedup_matmul=round(mm / us, 2))
                records.append(rec)
                i4s = "-" if rec["int4pack_us"] is None else f"{rec['int4pack_us']:.1f}"
                print(f"{K:>5} x{N:>6} {f:>10} {dt:>4} {bpw:5.2f} {M:5d} {us:9.1f} "
                      f"{layer_us:9.1f} {mm16[M]:9.1f} {mm_bf[M]:9.1f} {i4s:>9} {eff:6.2f} "
                      f"{rec['pct_bw']:5.1f} {rec['pct_read_same']:5.1f} "
                      f"{rec['speedup_matmul']:6.2f}", flush=True)
                del xs
            del layer, arg_sets
            torch.cuda.empty_cache()
            save()
    if args.stack_blocks > 0:
        for stack, what in ((STACK_NAME, "projections"),
                            ("llama3-8b-fused", "projections, q/k/v and gate/up fused")):
            print(f"\ndecode step, M = 1, {args.stack_blocks} blocks of "
                  f"{len(STACKS[stack])} {what} (Llama-3-8B shapes), one CUDA graph:")
            for r in bench_decode_stack(args.stack_blocks, ["q4_g128", "mixed_2.5"], stack):
                records.append(dict(common, **r))
                print(f"  {r['format']:>10} {r['bpw']:5.2f} bpw  {r['us_per_token']:8.1f} us/token "
                      f"{r['tokens_per_s']:8.1f} tok/s   fp16 {r['fp16_us_per_token']:8.1f} "
                      f"us/token {r['fp16_tokens_per_s']:8.1f} tok/s   x{r['speedup_fp16']:.2f}",
                      flush=True)
    save()
    print(f"\nwrote {len(records)} records to {out_path}")


if __name__ == "__main__":
    main()
