"""Dequantize-then-matmul written straight from FORMAT.md: the oracle the tests trust.

Deliberately independent of the kernels' ``blocks`` table and of :mod:`mbwq_ops.format`'s
shift-based unpacking: it reads ``q_groups`` / ``group_size`` literally, expands every packed
column into its individual bits and reads codes off that bit string, then computes in float64.
Slow and simple on purpose.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def round_to_fp16(exact: Tensor) -> Tensor:
    """Round float64 values to fp16 with a single IEEE rounding (no float32 double rounding).

    Round to float32 with "round to odd" (truncate, then set the last bit if inexact), then
    round to fp16: float32 keeps enough extra bits for that second rounding to be correct.
    """
    f = exact.to(torch.float32)
    inexact = f.to(torch.float64) != exact
    too_big = f.to(torch.float64).abs() > exact.abs()
    toward_zero = torch.where(too_big & inexact, torch.nextafter(f, torch.zeros_like(f)), f)
    odd = (toward_zero.view(torch.int32) | 1).view(torch.float32)
    return torch.where(inexact & torch.isfinite(f), odd, f).to(torch.float16)


def _bit_string(words: Tensor) -> Tensor:
    """int32 words ``[P, N]`` -> bits ``[32P, N]`` (uint8), string bit i = bit i%32 of word i//32."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    return ((w.unsqueeze(1) >> shifts) & 1).reshape(-1, words.shape[1]).to(torch.uint8)


def _codes(words: Tensor, bits: int, rows: int) -> Tensor:
    """Codes of ``rows`` rows of width ``bits`` from the bit string of ``words``."""
    s = _bit_string(words)[: rows * bits].to(torch.int64).view(rows, bits, -1)
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    return (s * weights).sum(1)


def stored_groups(qweight: Tensor, in_features: int, *, use_mbw: bool,
                  q_groups: Optional[Tensor] = None, group_size: Optional[int] = None):
    """List of ``(bits, first packed row, rows)`` per group, read as FORMAT.md §5/§6.1 say."""
    if use_mbw:
        v = (q_groups.to("cpu", torch.int64) & 0xFFFF).tolist()
        bits, starts = v[0::2], v[1::2]
        out, done = [], 0
        for g, (b, s) in enumerate(zip(bits, starts)):
            rows = (starts[g + 1] - s) * 32 // b if g + 1 < len(bits) else in_features - done
            out.append((b, s, rows))
            done += rows
        return out
    w_bit = qweight.shape[0] * 32 // in_features
    out = []
    for first in range(0, in_features, group_size):
        rows = min(group_size, in_features - first)
        out.append((w_bit, first * w_bit // 32, rows))
    return out


def dequant_reference(qweight: Tensor, scales: Tensor, zeros: Tensor, q_perm: Tensor,
                      in_features: int, *, use_mbw: bool, q_groups: Optional[Tensor] = None,
                      group_size: Optional[int] = None) -> Tensor:
    """The fp16 weight ``W [K, N]`` in original input order (FORMAT.md §5, §6.5)."""
    qweight, scales, zeros = qweight.cpu(), scales.cpu(), zeros.cpu()
    stored = []
    for g, (bits, start, rows) in enumerate(stored_groups(
            qweight, in_features, use_mbw=use_mbw, q_groups=q_groups, group_size=group_size)):
        words = qweight[start: start + rows * bits // 32]
        code = _codes(words, bits, rows).to(torch.float64)
        stored.append(round_to_fp16(code * scales[g].double() - zeros[g].double()))
    Ws = torch.cat(stored, 0)
    perm = q_perm.to("cpu", torch.int64) & 0xFFFF
    if not use_mbw and not bool(perm.any()):
        return Ws  # all-zero q_perm = identity, uniform mode only (FORMAT.md §3)
    W = torch.empty_like(Ws)
    W[perm] = Ws  # stored row k is input feature q_perm[k]
    return W


def gemm_reference(x: Tensor, W: Tensor, channel_scale: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None) -> Tensor:
    """``round(x * channel_scale) @ W + bias`` in float64 (FORMAT.md §7), unrounded."""
    xs = x.cpu().double()
    if channel_scale is not None:  # the product of two 16-bit floats is exact in float64
        xs = (xs * channel_scale.cpu().double().reshape(-1)).to(x.dtype).double()
    y = xs @ W.cpu().double()
    if bias is not None:
        y = y + bias.cpu().double()
    return y


def error_scale(x: Tensor, W: Tensor, channel_scale: Optional[Tensor] = None,
                bias: Optional[Tensor] = None) -> Tensor:
    """``S = |xs| @ |W| + |bias|``: the size of the terms of each output, which bounds any
    rounding error of the sum (golden/README.md uses it for its tolerances)."""
    xs = x.cpu().double()
    if channel_scale is not None:
        xs = (xs * channel_scale.cpu().double().reshape(-1)).to(x.dtype).double()
    S = xs.abs() @ W.cpu().double().abs()
    if bias is not None:
        S = S + bias.cpu().double().abs()
    return S
