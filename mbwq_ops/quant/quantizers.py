"""The quantizers of one layer's stored rows: round-to-nearest and GPTQ onto per-group fp16
grids (quantize.py decides the widths, groups and row order; this module only rounds).

Grid of a group (asymmetric min/max): ``zero = -min`` and ``scale = (max + zero) / (2^b - 1)``,
both rounded *up* to fp16, so every weight of the group lies inside the representable range
``[-zero, (2^b - 1) * scale - zero]`` and round-to-nearest errs by at most half a step (plus the
fp16 rounding of the dequantized value).

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): rows are quantized one at a time in stored order and the rounding
error of each row is spread over the rows not yet quantized through the upper Cholesky factor
of ``H^-1``; error propagation to later blocks is batched. Groups take their grid from the
already-updated weights when their first row is reached. Act-order comes for free: the stored
order puts the features with the largest ``H_kk`` first (within each width).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["rtn_grid", "quantize_to_grid", "quantize_rtn", "damped_hessian", "gptq"]


def _fp16_up(v: Tensor) -> Tensor:
    """Smallest fp16 value >= v (v float64); saturates at the fp16 maximum."""
    h = v.clamp(max=65504.0).to(torch.float16)
    low = h.to(torch.float64) < v
    if bool(low.any()):
        h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h


def rtn_grid(w: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Asymmetric min/max grid of a group ``w [..., rows, N]``: fp16 ``scale``, ``zero``
    ``[..., N]`` (min/max over the rows of each column).

    ``zero`` and ``scale`` are rounded up so that ``[-zero, maxq*scale - zero]`` covers
    ``[min, max]`` of every column exactly.
    """
    maxq = (1 << bits) - 1
    w = w.to(torch.float64)
    lo, hi = w.amin(-2), w.amax(-2)
    zero = _fp16_up(-lo)
    scale = _fp16_up((hi + zero.to(torch.float64)) / maxq)
    tiny = torch.tensor(2.0 ** -24, dtype=torch.float16, device=w.device)
    scale = torch.where(scale > 0, scale, tiny)
    return scale, zero


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Codes (int64) of ``w [..., N]`` on the grid, and their exact dequantized values (float64,
    rounded once to fp16 like the kernels do)."""
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    codes = torch.round((w.to(torch.float64) + z) / s).clamp_(0, (1 << bits) - 1)
    deq = (codes * s - z).to(torch.float32).to(torch.float16).to(torch.float64)
    # (float64 -> float32 -> fp16 could round twice; the error it adds is below one fp16 ulp
    # and only matters for error feedback, never for the stored codes.)
    return codes.to(torch.int64), deq


def quantize_rtn(Ws: Tensor, groups: Sequence[Tuple[int, int]]):
    codes, scales, zeros, first = [], [], [], 0
    for b, r in groups:
        w = Ws[first:first + r]
        s, z = rtn_grid(w, b)
        c, _ = quantize_to_grid(w, s, z, b)
        codes.append(c)
        scales.append(s)
        zeros.append(z)
        first += r
    return torch.cat(codes), torch.stack(scales), torch.stack(zeros)


def damped_hessian(H: Tensor, damp: float) -> Tensor:
    """``H`` (float64 copy) with the diagonal of features never seen set to 1 and ``damp`` times
    the mean diagonal added (GPTQ's damping; the allocation measures with the same)."""
    H = H.to(torch.float64).clone()
    d = torch.diagonal(H)
    dead = d <= 0
    d[dead] = 1.0
    d += damp * float(d.mean())
    return H


def gptq(Ws: Tensor, Hs: Tensor, groups: Sequence[Tuple[int, int]], damp: float = 0.01,
          block: int = 128):
    """GPTQ over stored rows ``Ws [K, N]`` with Hessian ``Hs [K, K]`` in the same order."""
    K, N = Ws.shape
    H = damped_hessian(Hs, damp)
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite even after damping: damp harder
        H += torch.eye(K, dtype=H.dtype, device=H.device) * float(torch.diagonal(H).mean())
        L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
    W = Ws.to(torch.float32).clone()
    codes = torch.empty(K, N, dtype=torch.int64, device=W.device)
    scales, zeros = [], []
    group_of_row = []
    bounds = set()
    first = 0
    for gi, (b, r) in enumerate(groups):
        bounds.add(first)
        group_of_row += [gi] * r
        first += r
    cuts = sorted(bounds | set(range(0, K, block)) | {K})
    scale = zero = None
    for i1, i2 in zip(cuts, cuts[1:]):
        gi = group_of_row[i1]
        b, r = groups[gi]
        if i1 in bounds:  # a group starts: grid from the weights as updated so far
            g0 = i1
            scale, zero = rtn_grid(W[g0:g0 + r], b)
            scales.append(scale)
            zeros.append(zero)
        W1 = W[i1:i2].clone()
        E = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for j in range(i2 - i1):
            w = W1[j]
            c, q = quantize_to_grid(w, scale, zero, b)
            codes[i1 + j] = c
            err = (w - q.to(torch.float32)) / U1[j, j]
            W1[j:] -= U1[j, j:, None] * err[None, :]
            E[j] = err
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].t() @ E
    return codes, torch.stack(scales), torch.stack(zeros)
