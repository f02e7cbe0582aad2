"""Exercise every CUDA kernel path of mbwq once, on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python scripts/sanitize_paths.py
    compute-sanitizer --tool racecheck python scripts/sanitize_paths.py

Paths: the tensor-core kernel (fp16/bf16: one, two, four and eight 8-token tiles, x copied
per warp or once per CTA, row chunks of 64 tokens; one or two column quads per lane (two on
the 8192-column layer); on compute capability 9.0 the many-token tile kernel, 128-token
tiles at M = 100 and 256-token tiles at M = 200, with one and two K splits, tiles of 16, 32
and 64 tokens at M = 1, 17 and 40 through MBWQ_TILE_MIN_M), the x
gather element by element and through shared memory (from 32 rows), one and several K
splits (+ the split reduction), every width, fp16 / bf16 / fp32 activations, channel_scale
and bias in several dtypes or absent, identity and random perm; the large-M path (x gather +
stored-order dequant + cuBLAS); dequant with 4-column and 1-column threads in every output
dtype; misaligned qweight; invalid blocks / perm entries (NaN, no OOB).
Each result is compared with the CPU kernel, so the script also fails on wrong numbers.
"""
from __future__ import annotations

import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import mbwq_ops  # noqa: E402
from layers import LayerSpec, make_layer, random_mixed_spec  # noqa: E402


def close(a, b, dtype):
    # fp32: the CPU kernel may use the unrounded code*scale - zero for small M and the CUDA
    # path W's fp16 value (csrc/ops.cpp allows either), so allow W's own fp16 rounding
    tol = {torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float32: 2e-3}[dtype]
    a, b = a.float().cpu(), b.float().cpu()
    scale = b.abs().max().clamp_min(1e-6)
    return bool(((a - b).abs() <= tol * scale + tol * b.abs()).all())


def main():
    assert torch.cuda.is_available(), "needs a CUDA device"
    rng = random.Random(0)
    specs = [
        # one K split (2 blocks), every width
        LayerSpec(192, 256, True, widths=(8, 6, 5, 4, 3, 2), group_rows=(32,) * 6, bias=True, seed=1),
        # many K blocks on one column tile: several K splits + reduction
        random_mixed_spec(rng, 2048, 132, (8, 5, 4, 3, 2), bias=True, seed=2),
        LayerSpec(512, 200, False, w_bit=4, group_size=128, perm="zeros", seed=3),
        LayerSpec(256, 130, False, w_bit=2, group_size=64, perm="random", bias=True, seed=4),  # N % 4
        # >= 8192 columns: the 17-64-token kernels with two column quads per lane
        LayerSpec(64, 8192, True, widths=(4, 2), group_rows=(32, 32), perm="random", bias=True,
                  seed=5),
    ]
    # M = 65 .. 192 as tensor-core row chunks (plan.h: large layers only; here on small ones)
    torch.ops.mbwq.set_knob("MBWQ_MMA_MAX_M", 192)
    # Second calls under knobs: the tile kernel's K splits and reduction (M = 200), its tiles of
    # 16, 32 and 64 tokens (M = 1, 17, 40, which only the knob sends there)
    small = {"MBWQ_TILE_MIN_M": "1"}
    knob = {200: [{"MBWQ_TILE_SPLITS": "2"}], 1: [small], 17: [small], 40: [small]}
    checked = 0
    for spec in specs:
        layer_cpu, _ = make_layer(spec, "cpu")
        layer, _ = make_layer(spec, "cuda")
        args = (layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm)
        cargs = (layer_cpu.qweight, layer_cpu.scales, layer_cpu.zeros, layer_cpu._blocks,
                 layer_cpu._perm)
        cs = layer.channel_scale.reshape(-1)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            W = mbwq_ops.dequant(*args, dtype)
            assert torch.equal(W.cpu(), mbwq_ops.dequant(*cargs, dtype)), (spec, dtype)
            for M in (1, 2, 3, 7, 12, 17, 40, 64, 100, 200, 300):
                x = torch.randn(M, spec.in_features, dtype=dtype)
                variants = ((cs, layer.bias), (cs.float(), None), (None, layer.bias),
                            (cs.to(torch.bfloat16), None))
                for cs_v, bias_v in variants if dtype == torch.float16 else variants[:1]:
                    bias_c = None if bias_v is None else bias_v.cpu()
                    cs_c = None if cs_v is None else cs_v.cpu()
                    y = mbwq_ops.gemm(x.cuda(), *args, cs_v, bias_v)
                    y_ref = mbwq_ops.gemm(x, *cargs, cs_c, bias_c)
                    assert close(y, y_ref, dtype), (spec, dtype, M)
                    checked += 1
                    for env in knob.get(M, []):
                        with mbwq_ops.ops.tuning(**env):
                            y = mbwq_ops.gemm(x.cuda(), *args, cs_v, bias_v)
                        assert close(y, y_ref, dtype), (spec, dtype, M, env)
                        checked += 1
    # misaligned qweight (4-byte offset): the scalar paths
    layer, _ = make_layer(specs[0], "cuda")
    q = layer.qweight
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = buf[1:].view_as(q)
    q_off.copy_(q)
    args = (q_off, layer.scales, layer.zeros, layer._blocks, layer._perm)
    x = torch.randn(3, specs[0].in_features, dtype=torch.float16, device="cuda")
    y = mbwq_ops.gemm(x, *args, layer.channel_scale.reshape(-1), layer.bias)
    W = mbwq_ops.dequant(*args)
    # invalid tables: NaN, never an out-of-bounds access
    bad = layer._blocks.clone()
    bad[0, 0] = 7
    bad[1, 1] = 1 << 20
    bad[2, 2] = -3
    for M in (2, 40, 100, 200):
        x = torch.randn(M, specs[0].in_features, dtype=torch.float16, device="cuda")
        y = mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, bad, layer._perm)
        assert torch.isnan(y).all()
        bad_perm = torch.full((specs[0].in_features,), 1 << 20, dtype=torch.int32, device="cuda")
        y = mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, layer._blocks, bad_perm)
        assert torch.isnan(y).all()
    W = mbwq_ops.dequant(layer.qweight, layer.scales, layer.zeros, bad, layer._perm)
    assert torch.isnan(W).any()
    torch.cuda.synchronize()
    print(f"sanitize_paths: OK ({checked} gemm calls checked against the CPU kernel)")


if __name__ == "__main__":
    main()
