"""Exercise every CUDA kernel path of mbwq once, on small shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python scripts/sanitize_paths.py
    compute-sanitizer --tool racecheck python scripts/sanitize_paths.py

Paths: the tensor-core kernel (fp16/bf16: one, two, four and eight 8-token tiles, x copied per
warp or once per CTA, row chunks of 64 tokens; one or two column quads per lane (two on the
8192-column layer); on compute capability 9.0 the many-token tile kernel, 128-token tiles at M =
100 and 256-token tiles at M = 200, with one and two K splits, tiles of 16, 32 and 64 tokens at
M = 1, 17 and 40 through MBWQ_TILE_MIN_M, its stream-K schedule at M = 40, 100 and 200 through
MBWQ_TILE_STREAM; the scale-after-product row at M = 1 through MBWQ_MMA_CONFIG), the x gather
element by element and through shared memory (from 32 rows; several rows a CTA at M = 1200), one
and several K splits (+ the split reduction), every width, fp16 / bf16 / fp32 activations,
channel_scale and bias in several dtypes or absent, identity and random perm; the large-M path
(x gather + stored-order dequant + cuBLAS); dequant with 4-column and 1-column threads in every
output dtype; misaligned qweight; invalid blocks / perm entries (NaN, no OOB).
Each result is compared with the CPU kernel, so the script also fails on wrong numbers.
"""
from __future__ import annotations

import copy
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mbwq_ops  # noqa: E402
from mbwq_ops import format as fmt  # noqa: E402
from random_layers import random_layer, random_mixed_groups  # noqa: E402


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
    # (K, N, groups, use_mbw, random_layer options)
    specs = [
        # one K split (2 blocks), every width
        (192, 256, fmt.mixed_groups((8, 6, 5, 4, 3, 2), (32,) * 6), True,
         dict(bias=True, seed=1)),
        # many K blocks on one column tile: several K splits + reduction
        (2048, 132, random_mixed_groups(rng, 2048, (8, 5, 4, 3, 2)), True,
         dict(bias=True, seed=2)),
        (512, 200, fmt.uniform_groups(512, 4, 128), False, dict(perm="zeros", seed=3)),
        (256, 130, fmt.uniform_groups(256, 2, 64), False, dict(bias=True, seed=4)),  # N % 4
        # >= 8192 columns: the 17-64-token kernels with two column quads per lane
        (64, 8192, fmt.mixed_groups((4, 2), (32, 32)), True, dict(bias=True, seed=5)),
    ]
    # M = 65 .. 192 as tensor-core row chunks (plan.h: large layers only; here on small ones)
    torch.ops.mbwq.set_knob("MBWQ_MMA_MAX_M", 192)
    # Second calls under knobs: the tile kernel's K splits and reduction (M = 200), its tiles of
    # 16, 32 and 64 tokens (M = 1, 17, 40, which only the knob sends there), and its stream-K
    # schedule (M = 40, 100, 200: CTAs that cut tiles, K = 192's short runs)
    small = {"MBWQ_TILE_MIN_M": "1"}
    stream = {"MBWQ_TILE_MIN_M": "1", "MBWQ_TILE_STREAM": "2"}
    fold = {"MBWQ_MMA_CONFIG": "7"}  # the scale-after-product row (plan.h), one row of fp16 x
    knob = {200: [{"MBWQ_TILE_SPLITS": "2"}, stream], 1: [small, fold], 17: [small],
            40: [small, stream], 100: [stream]}
    checked = 0
    for K, N, groups, use_mbw, opts in specs:
        spec = (K, N, [g.bits for g in groups], opts)  # for assertion messages
        layer_cpu, _ = random_layer(groups, K, N, use_mbw=use_mbw, device="cpu", **opts)
        layer = copy.deepcopy(layer_cpu).to("cuda")  # the same stored tensors, on the GPU
        layer.prepare_params()  # the kernel tables rebuilt from the GPU copy
        args = (layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm)
        cargs = (layer_cpu.qweight, layer_cpu.scales, layer_cpu.zeros, layer_cpu._blocks,
                 layer_cpu._perm)
        cs = layer.channel_scale.reshape(-1)
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            W = mbwq_ops.dequant(*args, dtype)
            assert torch.equal(W.cpu(), mbwq_ops.dequant(*cargs, dtype)), (spec, dtype)
            for M in (1, 2, 3, 7, 12, 17, 40, 64, 100, 200, 300, 1200):
                x = torch.randn(M, K, dtype=dtype)
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
    K0, N0, groups0, _, opts0 = specs[0]
    layer, _ = random_layer(groups0, K0, N0, use_mbw=True, device="cuda", **opts0)
    q = layer.qweight
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = buf[1:].view_as(q)
    q_off.copy_(q)
    args = (q_off, layer.scales, layer.zeros, layer._blocks, layer._perm)
    x = torch.randn(3, K0, dtype=torch.float16, device="cuda")
    y = mbwq_ops.gemm(x, *args, layer.channel_scale.reshape(-1), layer.bias)
    W = mbwq_ops.dequant(*args)
    # invalid tables: NaN, never an out-of-bounds access
    bad = layer._blocks.clone()
    bad[0, 0] = 7
    bad[1, 1] = 1 << 20
    bad[2, 2] = -3
    for M, env in ((2, {}), (1, fold), (40, {}), (100, {}), (200, {}), (1200, {})):
        x = torch.randn(M, K0, dtype=torch.float16, device="cuda")
        bad_perm = torch.full((K0,), 1 << 20, dtype=torch.int32, device="cuda")
        with mbwq_ops.ops.tuning(**env):
            y = mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, bad, layer._perm)
            y2 = mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, layer._blocks,
                               bad_perm)
        assert torch.isnan(y).all() and torch.isnan(y2).all()
    W = mbwq_ops.dequant(layer.qweight, layer.scales, layer.zeros, bad, layer._perm)
    assert torch.isnan(W).any()
    torch.cuda.synchronize()
    print(f"sanitize_paths: OK ({checked} gemm calls checked against the CPU kernel)")


if __name__ == "__main__":
    main()
