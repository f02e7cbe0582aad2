"""The quantizers of one layer's stored rows: round-to-nearest and GPTQ onto per-group fp16
grids (quantize.py decides the widths, groups and row order; this module only rounds).

Every grid is stored the same way (FORMAT.md): ``W = code * scale - zero`` per group and output
column, one fp16 ``scale`` and one fp16 ``zero``, codes ``0 .. 2^b - 1``. The grids differ only in
how ``scale`` and ``zero`` are chosen (``GRIDS``):

* ``"minmax"``: ``zero = -min`` exactly and ``scale = (max - min) / (2^b - 1)``, both rounded up to
  fp16. Covers ``[min, max]`` exactly, but a real 0 usually falls between two grid points.
* ``"zero-point"`` (integer zero point): the same scale, ``zero = fp16(round(-min / scale) *
  scale)``, so the grid is ``(code - z) * scale`` for an integer ``z`` and a real 0 lies on it
  (up to the fp16 rounding of ``zero``: half an ulp of ``zero``, at most (2^b - 1) * 2^-11 of a
  step). The grid's ends move by at most half a step, so round-to-nearest still errs by at most
  half a step.
* ``"mse"``: per column, the candidate with the smallest squared error (weighted by the Hessian
  diagonal of the group's rows when there is one) among the min/max grid and the zero-point
  grids of the clipped ranges ``[p*min, p*max]``, ``p`` in ``MSE_SHRINKS``. Clipping the few
  extreme weights buys a finer step for all; the min/max candidate keeps it never worse than
  ``"minmax"`` (which wins for 2-bit groups with no weight near 0: its 4 levels are symmetric).

Every grid is fp16-safe: no stored value is infinite, and codes whose dequantized value would
overflow fp16 are never chosen (weights at +-65504 stay finite).

GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): rows are quantized one at a time in stored order and the rounding
error of each row is spread over the rows not yet quantized through the upper Cholesky factor
of ``H^-1``; error propagation to later blocks is batched. Act-order comes from the stored
order, which puts the features with the largest ``H_kk`` first (within each width); the stored
``q_perm`` undoes it, so groups stay contiguous. Groups take their grid from the weights as
updated when their first row is reached, or (``static_groups=True``) from the original weights
before any error feedback. Damping: ``H + damp * mean(diag H) * I`` (``damped_hessian``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..reference import round_to_fp16

__all__ = ["GRIDS", "DEFAULT_GRID", "rtn_grid", "quantize_to_grid", "quantize_rtn",
           "damped_hessian", "gptq"]

GRIDS = ("minmax", "zero-point", "mse")
DEFAULT_GRID = "mse"
FP16_MAX = 65504.0
# clipping factors the "mse" grid tries (1.0 = the plain zero-point grid): fine steps near 1,
# where most groups land, coarse ones down to 0.2 for groups with a lone outlier
MSE_SHRINKS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4,
               0.3, 0.2)


def _fp16_up(v: Tensor) -> Tensor:
    """Smallest fp16 value >= v (v float64); saturates at the fp16 maximum (never inf)."""
    h = v.clamp(min=-FP16_MAX, max=FP16_MAX).to(torch.float16)
    low = (h.to(torch.float64) < v) & (h < FP16_MAX)
    if bool(low.any()):
        h = torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h


def check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")


def _zero_point_grid(lo: Tensor, hi: Tensor, maxq: int) -> Tuple[Tensor, Tensor]:
    """fp16 ``(scale, zero)`` of the integer-zero-point grid of ``[lo, hi]`` (float64)."""
    scale = _fp16_up((hi - lo) / maxq).to(torch.float64)
    flat = scale <= 0  # a constant column: any step; the zero alone carries the value
    scale = torch.where(flat, torch.full_like(scale, 2.0 ** -24), scale)
    zc = torch.round(-lo / scale)
    # |zero| <= 65504: a grid shifted that far still reaches every weight within fp16 range
    zc = torch.minimum(torch.maximum(zc, torch.ceil(-FP16_MAX / scale)),
                       torch.floor(FP16_MAX / scale))
    zero = torch.where(flat, -lo, zc * scale)
    return scale.to(torch.float16), round_to_fp16(zero.clamp(-FP16_MAX, FP16_MAX))


def rtn_grid(w: Tensor, bits: int, grid: str = DEFAULT_GRID,
             row_weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Grid of a group ``w [..., rows, N]``: fp16 ``scale``, ``zero`` ``[..., N]`` (one per
    column, from the rows of that column). ``row_weight [..., rows]`` (the Hessian diagonal)
    weighs the squared error the ``"mse"`` grid minimises."""
    check_grid(grid)
    maxq = (1 << bits) - 1
    w = w.to(torch.float64)
    lo, hi = w.amin(-2), w.amax(-2)
    if grid == "minmax":
        zero = _fp16_up(-lo)
        scale = _fp16_up((hi + zero.to(torch.float64)) / maxq)
        tiny = torch.tensor(2.0 ** -24, dtype=torch.float16, device=w.device)
        return torch.where(scale > 0, scale, tiny), zero
    if grid == "zero-point":
        return _zero_point_grid(lo, hi, maxq)
    # The search runs often (every candidate of the allocation): float32, and the dequantized
    # value is not rounded to fp16. That rounding (2^-11 relative) can only swap candidates
    # that nearly tie: the one kept is within a few parts in 10^5 of the best once rounded.
    w32 = w.to(torch.float32)
    rw = (torch.ones_like(w32[..., 0]) if row_weight is None
          else row_weight.to(w32.device, torch.float32).clamp_min(0)).unsqueeze(-1)
    best = best_s = best_z = None
    candidates = [rtn_grid(w, bits, "minmax")] + [
        _zero_point_grid(lo * p, hi * p, maxq) for p in MSE_SHRINKS]
    for s, z in candidates:
        s64, z64 = s.to(torch.float64), z.to(torch.float64)
        bottom, top = (t.to(torch.float32).unsqueeze(-2) for t in _code_range(s64, z64, bits))
        s32, z32 = s.to(torch.float32).unsqueeze(-2), z.to(torch.float32).unsqueeze(-2)
        q = torch.clamp(torch.round((w32 + z32) / s32), bottom, top).mul_(s32).sub_(z32)
        err = (q.sub_(w32).square_().mul_(rw)).sum(-2)
        if best is None:
            best, best_s, best_z = err, s, z
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def quantize_to_grid(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """Codes (int64) of ``w [..., N]`` on the grid, and their exact dequantized values (float64,
    rounded once to fp16 like the kernels do). Codes whose value would overflow fp16 are never
    chosen: the nearest finite one is."""
    s, z = scale.to(torch.float64), zero.to(torch.float64)
    bottom, top = _code_range(s, z, bits)
    codes = torch.round((w.to(torch.float64) + z) / s)
    codes = torch.minimum(torch.maximum(codes, bottom), top)
    deq = round_to_fp16(codes * s - z).to(torch.float64)
    return codes.to(torch.int64), deq


def _code_range(s: Tensor, z: Tensor, bits: int) -> Tuple[Tensor, Tensor]:
    """The codes whose value ``code * s - z`` stays within the fp16 range."""
    top = torch.floor((FP16_MAX + z) / s).clamp(max=(1 << bits) - 1)
    bottom = torch.ceil((z - FP16_MAX) / s).clamp(min=0)
    return bottom, top


def quantize_rtn(Ws: Tensor, groups: Sequence[Tuple[int, int]], grid: str = DEFAULT_GRID):
    """Round-to-nearest over stored rows ``Ws [K, N]``: ``(codes, scales, zeros)``."""
    codes, scales, zeros, first = [], [], [], 0
    for b, r in groups:
        w = Ws[first:first + r]
        s, z = rtn_grid(w, b, grid)
        c, _ = quantize_to_grid(w, s, z, b)
        codes.append(c)
        scales.append(s)
        zeros.append(z)
        first += r
    return torch.cat(codes), torch.stack(scales), torch.stack(zeros)


def damped_hessian(H: Tensor, damp: float) -> Tensor:
    """``H`` (float64 copy) with the diagonal of features never seen set to 1 and ``damp`` times
    the mean diagonal added (GPTQ's damping; the allocation measures with the same).

    GPTQ's paper uses ``damp = 0.01``; with fewer calibration rows than features (a
    rank-deficient ``H``) a larger ``damp`` (0.1 .. 1) keeps GPTQ from fitting the few rows."""
    H = H.to(torch.float64).clone()
    d = torch.diagonal(H)
    dead = d <= 0
    d[dead] = 1.0
    d += damp * float(d.mean())
    return H


def gptq(Ws: Tensor, Hs: Tensor, groups: Sequence[Tuple[int, int]], damp: float = 0.01,
         block: int = 128, grid: str = DEFAULT_GRID, static_groups: bool = False,
         low_widths_first: bool = True):
    """GPTQ over stored rows ``Ws [K, N]`` with Hessian ``Hs [K, K]`` in the same order:
    ``(codes, scales, zeros)`` in stored order. ``static_groups``: every group's grid from the
    original weights (else from the weights as updated when the group's first row is reached).

    ``low_widths_first``: GPTQ runs over whole groups in order of increasing width (stored
    order within a width), so the coarse rows' large rounding errors are spread over the fine
    rows still to come rather than the reverse. The stored order (8 -> 2) is unchanged; only
    the order GPTQ visits the groups in differs."""
    check_grid(grid)
    seq = list(range(len(groups)))
    if low_widths_first:
        seq.sort(key=lambda g: groups[g][0])  # stable: stored order within a width
    if seq == list(range(len(groups))):
        return _gptq(Ws, Hs, groups, damp, block, grid, static_groups)
    starts = [0]
    for _, r in groups:
        starts.append(starts[-1] + r)
    perm = torch.cat([torch.arange(starts[g], starts[g + 1]) for g in seq]).to(Ws.device)
    c, sc, ze = _gptq(Ws[perm], Hs[perm][:, perm], [groups[g] for g in seq], damp, block, grid,
                      static_groups)
    codes = torch.empty_like(c)
    codes[perm] = c
    back = torch.empty(len(seq), dtype=torch.long)
    back[torch.tensor(seq)] = torch.arange(len(seq))
    return codes, sc[back.to(sc.device)], ze[back.to(ze.device)]


def _gptq(Ws: Tensor, Hs: Tensor, groups: Sequence[Tuple[int, int]], damp: float, block: int,
          grid: str, static_groups: bool):
    K, N = Ws.shape
    H = damped_hessian(Hs, damp)
    try:
        L = torch.linalg.cholesky(H)
    except RuntimeError:  # not positive definite even after damping: damp harder
        H += torch.eye(K, dtype=H.dtype, device=H.device) * float(torch.diagonal(H).mean())
        L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True).to(torch.float32)
    hdiag = torch.diagonal(H).to(torch.float32)
    W = Ws.to(torch.float32).clone()
    codes = torch.empty(K, N, dtype=torch.int64, device=W.device)
    starts, first = {}, 0
    group_of_row = []
    for gi, (b, r) in enumerate(groups):
        starts[first] = gi
        group_of_row += [gi] * r
        first += r
    grids = {}
    if static_groups:
        for g0, gi in starts.items():
            b, r = groups[gi]
            grids[gi] = rtn_grid(W[g0:g0 + r], b, grid, hdiag[g0:g0 + r])
    cuts = sorted(set(starts) | set(range(0, K, block)) | {K})
    for i1, i2 in zip(cuts, cuts[1:]):
        gi = group_of_row[i1]
        b, r = groups[gi]
        if gi not in grids:  # a group starts: grid from the weights as updated so far
            grids[gi] = rtn_grid(W[i1:i1 + r], b, grid, hdiag[i1:i1 + r])
        scale, zero = grids[gi]
        # the row loop runs K times: float32 and no exact fp16 rounding here (codes*s is exact in
        # float32; the final fp16 rounding of the feedback value may differ in the last ulp)
        s32, z32 = scale.to(torch.float32), zero.to(torch.float32)
        bottom, top = (t.to(torch.float32) for t in _code_range(
            scale.to(torch.float64), zero.to(torch.float64), b))
        W1 = W[i1:i2].clone()
        E = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        C = torch.empty(i2 - i1, N, dtype=torch.float32, device=W.device)
        for j in range(i2 - i1):
            w = W1[j]
            c = torch.clamp(torch.round((w + z32) / s32), bottom, top)
            C[j] = c
            q = (c * s32 - z32).to(torch.float16).to(torch.float32)
            err = (w - q) / U1[j, j]
            W1[j:] -= U1[j, j:, None] * err[None, :]
            E[j] = err
        codes[i1:i2] = C.to(torch.int64)
        if i2 < K:
            W[i2:] -= U[i1:i2, i2:].t() @ E
    scales = torch.stack([grids[gi][0] for gi in range(len(groups))])
    zeros = torch.stack([grids[gi][1] for gi in range(len(groups))])
    return codes, scales, zeros
