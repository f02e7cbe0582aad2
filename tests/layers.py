"""Random MBWQ layers in the stored format, for tests and benchmarks.

Codes are uniform over all 2^b values, scales/zeros/channel scales random, so nothing is
all-zero. Every layer is built from a torch.Generator seed, so hypothesis can shrink it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

import mbwq_ops
from mbwq_ops import format as fmt

# csrc/plan.h: kMmaConfigs' scale-after-product row (opt-in: MBWQ_MMA_CONFIG=FOLD_ROW + 1)
FOLD_ROW = 6


@dataclass
class LayerSpec:
    in_features: int
    out_features: int
    use_mbw: bool
    widths: Sequence[int] = ()          # mixed: width per group (sorted 8 -> 2)
    group_rows: Sequence[int] = ()      # mixed: rows per group (multiples of 32)
    w_bit: int = 4                      # uniform
    group_size: int = 128               # uniform
    perm: str = "random"                # "random", "identity", "zeros" (uniform only)
    bias: bool = False
    seed: int = 0


def random_mixed_spec(rng: random.Random, in_features: int, out_features: int,
                      widths: Optional[Sequence[int]] = None, **kw) -> LayerSpec:
    """Split ``in_features`` into groups of 32..128 rows with widths drawn from ``widths``."""
    widths = list(widths or fmt.WIDTHS)
    rows, left = [], in_features
    while left:
        r = min(left, 32 * rng.randint(1, 4))
        rows.append(r)
        left -= r
    ws = sorted((rng.choice(widths) for _ in rows), key=fmt.WIDTHS.index)
    return LayerSpec(in_features, out_features, True, ws, rows, **kw)


def build(spec: LayerSpec, device="cpu") -> Dict[str, torch.Tensor]:
    """The stored tensors of a random layer (what a state_dict holds)."""
    g = torch.Generator().manual_seed(spec.seed)
    K, N = spec.in_features, spec.out_features
    if spec.use_mbw:
        groups = fmt.mixed_groups(spec.widths, spec.group_rows)
    else:
        groups = fmt.uniform_groups(K, spec.w_bit, spec.group_size)
    codes = torch.cat([torch.randint(0, 1 << gr.bits, (gr.rows, N), generator=g) for gr in groups])
    G = len(groups)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.001).half()
    max_code = torch.tensor([float((1 << gr.bits) - 1) for gr in groups]).view(G, 1)
    zeros = (scales.float() * max_code * (0.3 + 0.4 * torch.rand(G, N, generator=g))).half()
    if spec.perm == "random":
        q_perm = torch.randperm(K, generator=g)
    elif spec.perm == "identity":
        q_perm = torch.arange(K)
    else:
        q_perm = torch.zeros(K, dtype=torch.int64)
    out = {
        "qweight": fmt.pack_groups(codes, groups),
        "scales": scales,
        "zeros": zeros,
        "q_perm": fmt.as_int16(q_perm),
        "channel_scale": (0.5 + torch.rand(1, 1, K, generator=g)).half(),
    }
    if spec.use_mbw:
        out["q_groups"] = fmt.q_groups_tensor(groups)
    if spec.bias:
        out["bias"] = torch.randn(N, generator=g).half()
    return {k: v.to(device) for k, v in out.items()}


def make_layer(spec: LayerSpec, device="cpu"):
    """A prepared MBWQLinear holding the random layer, and its stored tensors."""
    t = build(spec, device)
    layer = mbwq_ops.MBWQLinear(spec.in_features, spec.out_features, w_bit=spec.w_bit,
                                group_size=spec.group_size, use_mbw=spec.use_mbw,
                                disable_bias=not spec.bias,
                                groups=len(spec.widths) or 1, rows_packed=t["qweight"].shape[0])
    layer.load_state_dict(t)
    layer.to(device).prepare_params()
    return layer, t


def reference_weight(spec: LayerSpec, t: Dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp16 W of the layer from mbwq_ops.reference (independent of the kernels' tables)."""
    return mbwq_ops.reference.dequant_reference(
        t["qweight"], t["scales"], t["zeros"], t["q_perm"], spec.in_features,
        use_mbw=spec.use_mbw, q_groups=t.get("q_groups"), group_size=spec.group_size)


def tolerance(dtype: torch.dtype, cublas_bf16: bool = False) -> float:
    """Relative bound per unit of ``|ref| + S`` (S = reference.error_scale) for a gemm result
    in ``dtype``: the output's rounding plus, for bf16 on the dequant+matmul path, the
    rounding of W to bf16. The CPU small-M kernel uses code*scale - zero rounded to fp32
    instead of dequant's fp16 W (at most half an fp16 ulp, 2^-11 relative, per weight), which
    bounds fp32 results at 2^-11 S; fp32 accumulation adds far less.

    ``cublas_bf16``: a bf16 result of the CUDA dequant + cuBLAS path. cuBLAS may add split-K
    partial sums in bf16 (torch's default ``allow_bf16_reduced_precision_reduction``, as for
    any bf16 ``torch.matmul``): each partial rounded to 2^-8 of its size, up to another
    2^-7 S over the reduction levels."""
    base = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -10}[dtype]
    return base + (2.0 ** -7 if cublas_bf16 and dtype == torch.bfloat16 else 0.0)


def error_bound(dtype: torch.dtype, ref: torch.Tensor, S: torch.Tensor,
                cublas_bf16: bool = False) -> torch.Tensor:
    """Elementwise bound on ``|result - ref|`` for a result in ``dtype``:
    ``tolerance(dtype, cublas_bf16) * (|ref| + S)`` plus the spacing of ``dtype``'s subnormals
    (where the output's rounding error is absolute, not relative)."""
    fi = torch.finfo(dtype)
    return tolerance(dtype, cublas_bf16) * (ref.abs() + S) + fi.smallest_normal * fi.eps


def devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """``devices()`` for ``pytest.mark.parametrize``: cuda always listed, marked ``cuda`` and
    skipped where CUDA is absent, so a CPU-only run reports the GPU variants as skipped."""
    import pytest

    return ["cpu", pytest.param("cuda", marks=[
        pytest.mark.cuda,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]
