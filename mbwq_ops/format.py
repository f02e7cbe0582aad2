"""The MBWQ stored format (FORMAT.md) in plain torch: packing, group tables, validation.

Everything here runs once per layer (load / prepare / quantize), never on the hot path, so it
may read tensor values on the host. Every check raises ``ValueError`` naming the field and the
offending value.

Packing (FORMAT.md §4): a run of stored rows of width ``b`` is one little-endian bit string per
column; row ``r`` of the run holds bits ``[r*b, r*b + b)``. 32 rows of width b fill exactly b
words, so every 32-row block starts on a word boundary::

    3-bit, one column:   word0 = |c0|c1|...|c9|c10(2 bits)     (bit 0 on the right in memory order)
                         word1 = |c10(1 bit)|c11|...|c20|c21(1 bit)
                         word2 = |c21(2 bits)|c22|...|c31|

Internally the kernels see each layer as a ``blocks`` table (one row per 32 stored rows:
width, first qweight row, group) plus an int32 ``perm``; see csrc/format.h.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

BLOCK_ROWS = 32
WIDTHS = (8, 6, 5, 4, 3, 2)  # the only widths, in the order mixed groups must appear
UNIFORM_WIDTHS = (4, 2)
MAX_IN_FEATURES = 65536  # q_perm is read as uint16


@dataclass(frozen=True)
class Group:
    """One group of stored rows: ``rows`` rows of width ``bits`` starting at stored row
    ``first_row``, packed from qweight row ``start``."""

    bits: int
    rows: int
    start: int
    first_row: int

    @property
    def packed_rows(self) -> int:
        return self.rows * self.bits // 32


# ----------------------------------------------------------------------------- packing
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack unsigned codes ``[rows, N]`` (rows a multiple of 32) into int32 ``[rows*bits/32, N]``."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be one of {WIDTHS}, got {bits}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [rows, N], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    rows, N = codes.shape
    if rows % BLOCK_ROWS:
        raise ValueError(f"rows must be a multiple of {BLOCK_ROWS}, got {rows}")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing, got "
                         f"[{int(c.min())}, {int(c.max())}]")
    # Blocks of 32 rows fill exactly `bits` words each, so all blocks pack in parallel.
    c = c.reshape(rows // 32, 32, N)
    words = torch.zeros(rows // 32, bits, N, dtype=torch.int64, device=codes.device)
    for r in range(32):
        j, s = divmod(r * bits, 32)
        words[:, j] |= (c[:, r] << s) & 0xFFFFFFFF
        if s + bits > 32:  # the code's high bits spill into the next word
            words[:, j + 1] |= c[:, r] >> (32 - s)
    words = words.reshape(rows * bits // 32, N)
    return _as_int32(words)


def unpack_codes(packed: Tensor, bits: int, rows: Optional[int] = None) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[P, N]`` -> int64 codes ``[rows, N]``."""
    if bits not in WIDTHS:
        raise ValueError(f"bits must be one of {WIDTHS}, got {bits}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be 2-D [P, N], got shape {tuple(packed.shape)}")
    w = packed.to(torch.int64) & 0xFFFFFFFF
    capacity = w.shape[0] * 32 // bits
    if rows is not None and not 0 <= rows <= capacity:
        raise ValueError(f"rows must lie in [0, {capacity}] for {w.shape[0]} packed rows at "
                         f"{bits} bits, got {rows}")
    rows = capacity if rows is None else rows
    out = torch.empty(rows, w.shape[1], dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for r in range(rows):
        j, s = divmod(r * bits, 32)
        v = w[j] >> s
        if s + bits > 32:
            v = v | (w[j + 1] << (32 - s))
        out[r] = v & mask
    return out


def pack_groups(codes: Tensor, groups: Sequence[Group]) -> Tensor:
    """Pack stored-order codes ``[K, N]`` group by group into one qweight ``[R, N]``."""
    first = 0
    for gi, g in enumerate(groups):
        if g.first_row != first:
            raise ValueError(f"groups must be consecutive: group {gi} starts at stored row "
                             f"{g.first_row}, expected {first}")
        first += g.rows
    if codes.dim() != 2 or first != codes.shape[0]:
        raise ValueError(f"the groups cover {first} rows but codes has shape {tuple(codes.shape)}")
    parts = [pack_codes(codes[g.first_row:g.first_row + g.rows], g.bits) for g in groups]
    return torch.cat(parts, 0)


def _as_int32(words: Tensor) -> Tensor:
    # Reinterpret unsigned 32-bit patterns as int32 (two's complement).
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


# ----------------------------------------------------------------------------- groups
def uniform_groups(in_features: int, w_bit: int, group_size: int) -> List[Group]:
    """Groups of a uniform layer: ``group_size`` stored rows each, the last one may be shorter."""
    check_in_features(in_features)
    if w_bit not in UNIFORM_WIDTHS:
        raise ValueError(f"w_bit must be 4 or 2 for a uniform layer (use_mbw=False), got {w_bit}")
    if group_size != int(group_size) or group_size <= 0 or group_size % BLOCK_ROWS:
        raise ValueError(f"group_size must be a positive multiple of {BLOCK_ROWS}, got {group_size}")
    group_size = int(group_size)
    groups, first = [], 0
    while first < in_features:
        rows = min(group_size, in_features - first)
        groups.append(Group(w_bit, rows, first * w_bit // 32, first))
        first += rows
    return groups


def mixed_groups(widths: Sequence[int], rows: Sequence[int]) -> List[Group]:
    """Groups from per-group widths and row counts, in the given (stored) order."""
    widths, rows = list(widths), list(rows)
    if len(widths) != len(rows):
        raise ValueError(f"widths and rows must have the same length, got {len(widths)} widths "
                         f"{widths} and {len(rows)} row counts {rows}")
    for g, (b, r) in enumerate(zip(widths, rows)):
        if b not in WIDTHS:
            raise ValueError(f"group {g} has width {b!r}; allowed widths are {WIDTHS}")
        if r != int(r) or int(r) <= 0 or int(r) % BLOCK_ROWS:
            raise ValueError(f"group {g} has {r!r} rows; it must be a positive multiple of "
                             f"{BLOCK_ROWS}")
    groups, first, start = [], 0, 0
    for b, r in zip(widths, rows):
        groups.append(Group(int(b), int(r), start, first))
        first += int(r)
        start += int(r) * int(b) // 32
    return groups


def q_groups_tensor(groups: Sequence[Group]) -> Tensor:
    """The stored ``q_groups`` buffer: int16 ``[2G]`` of (bits, packed start) pairs."""
    flat = [v for g in groups for v in (g.bits, g.start)]
    return as_int16(torch.tensor(flat, dtype=torch.int64))


def parse_q_groups(q_groups: Tensor, in_features: int, packed_rows: int) -> List[Group]:
    """Read and validate a stored ``q_groups`` (FORMAT.md §6.1-6.2)."""
    check_in_features(in_features)
    if q_groups.dim() != 1 or q_groups.numel() < 2 or q_groups.numel() % 2:
        raise ValueError(f"q_groups must be 1-D with an even, non-zero length, got shape "
                         f"{tuple(q_groups.shape)}")
    v = (q_groups.detach().to("cpu", torch.int64) & 0xFFFF).tolist()  # read as uint16
    bits, starts = v[0::2], v[1::2]
    G = len(bits)
    for g, b in enumerate(bits):
        if b not in WIDTHS:
            raise ValueError(f"q_groups: group {g} has bits={b}; allowed widths are {WIDTHS}")
    for g in range(G - 1):
        if WIDTHS.index(bits[g]) > WIDTHS.index(bits[g + 1]):
            raise ValueError(f"q_groups: groups must be sorted by width 8, 6, 5, 4, 3, 2; group {g} "
                             f"({bits[g]}-bit) comes before group {g + 1} ({bits[g + 1]}-bit)")
    if starts[0] != 0:
        raise ValueError(f"q_groups: group 0 must start at packed row 0, got {starts[0]}")
    groups, first = [], 0
    for g in range(G):
        if g < G - 1:
            packed = starts[g + 1] - starts[g]
            if packed <= 0 or (packed * 32) % (bits[g] * BLOCK_ROWS):
                raise ValueError(
                    f"q_groups: group {g} ({bits[g]}-bit) spans {packed} packed rows "
                    f"(start {starts[g]} -> {starts[g + 1]}); it must be a positive multiple of "
                    f"{bits[g]} (whole 32-row blocks)")
            rows = packed * 32 // bits[g]
        else:
            rows = in_features - first
            if rows <= 0 or rows % BLOCK_ROWS:
                raise ValueError(f"q_groups: the groups before the last cover {first} rows, leaving "
                                 f"{rows} for the last group of in_features={in_features}; it must "
                                 f"be a positive multiple of {BLOCK_ROWS}")
        groups.append(Group(bits[g], rows, starts[g], first))
        first += rows
    end = groups[-1].start + groups[-1].packed_rows
    if end != packed_rows:
        raise ValueError(f"q_groups describe {end} packed rows (for in_features={in_features}) but "
                         f"qweight has {packed_rows}")
    return groups


def rows_list(groups: Sequence[Group]) -> List[int]:
    """The 7-element ``rows`` list of FORMAT.md §6.3: cumulative row ends per width, kernel_p."""
    count = {b: 0 for b in WIDTHS}
    kernel_p = 0
    for g in groups:
        count[g.bits] += g.rows
        kernel_p |= 1 << (g.bits - 1)
    out, total = [], 0
    for b in WIDTHS:
        total += count[b]
        out.append(total)
    return out + [kernel_p]


def group_map(groups: Sequence[Group]) -> Tensor:
    """``q_group_map`` (FORMAT.md §6.4): int16 [2K] of (group, rows left in group) per row."""
    parts = []
    for gi, g in enumerate(groups):
        left = torch.arange(g.rows, 0, -1, dtype=torch.int64)
        parts.append(torch.stack([torch.full_like(left, gi), left], 1).reshape(-1))
    return as_int16(torch.cat(parts))


def groups_from_group_map(q_group_map: Tensor, rows: Sequence[int]) -> List[Group]:
    """Rebuild the groups from ``q_group_map`` and the ``rows`` list (for ``exl2fp_weight``)."""
    if len(rows) != 7:
        raise ValueError(f"rows must have 7 entries [r8, r6, r5, r4, r3, r2, kernel_p], got {list(rows)}")
    gm = (q_group_map.detach().to("cpu", torch.int64) & 0xFFFF).reshape(-1, 2)
    K = gm.shape[0]
    if int(rows[5]) != K:
        raise ValueError(f"rows[5] (total rows) = {rows[5]} but q_group_map covers {K} rows")
    ends = [int(r) for r in rows[:6]]
    groups, k, start = [], 0, 0
    while k < K:
        n = int(gm[k, 1])
        if n <= 0 or k + n > K:
            raise ValueError(f"q_group_map[{2 * k + 1}] = {n} rows left at stored row {k} (K = {K})")
        bits = next(b for b, end in zip(WIDTHS, ends) if k < end)
        groups.append(Group(bits, n, start, k))
        start += n * bits // 32
        k += n
    return groups


# ----------------------------------------------------------------------------- kernel tables
def make_blocks(groups: Sequence[Group]) -> Tensor:
    """The kernels' ``blocks`` table, int32 [K/32, 3]: (bits, first qweight row, group)."""
    rows = []
    for gi, g in enumerate(groups):
        for b in range(g.rows // BLOCK_ROWS):
            rows.append((g.bits, g.start + b * g.bits, gi))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 3)


def perm_index(q_perm: Tensor, in_features: int, use_mbw: bool) -> Tensor:
    """Validate ``q_perm`` and return the kernels' int32 ``perm`` ([0] when it is the identity).

    ``q_perm`` is stored as int16 but read as uint16. In uniform mode an all-zero ``q_perm``
    means "no permutation"; in mixed mode it must always be a true permutation.
    """
    if q_perm.dim() != 1 or q_perm.numel() != in_features:
        raise ValueError(f"q_perm must have shape [{in_features}], got {tuple(q_perm.shape)}")
    if q_perm.dtype.is_floating_point or q_perm.dtype == torch.bool:
        raise ValueError(f"q_perm must be an integer tensor, got {q_perm.dtype}")
    p = q_perm.detach().to("cpu", torch.int64)
    if q_perm.dtype == torch.int16:
        p = p & 0xFFFF
    if not use_mbw and not bool(p.any()):
        return torch.empty(0, dtype=torch.int32)
    seen = torch.zeros(in_features, dtype=torch.int64)
    bad = (p < 0) | (p >= in_features)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise ValueError(f"q_perm is not a permutation of 0..{in_features - 1}: q_perm[{k}] = {int(p[k])}"
                         + (" (an all-zero q_perm means identity only when use_mbw=False)"
                            if use_mbw and not bool(p.any()) else ""))
    seen.index_add_(0, p, torch.ones_like(p))
    if bool((seen != 1).any()):
        v = int((seen != 1).nonzero()[0])
        hint = (" (an all-zero q_perm means identity only when use_mbw=False)"
                if use_mbw and not bool(p.any()) else "")
        raise ValueError(f"q_perm is not a permutation of 0..{in_features - 1}: feature {v} appears "
                         f"{int(seen[v])} times{hint}")
    if torch.equal(p, torch.arange(in_features)):
        return torch.empty(0, dtype=torch.int32)
    return p.to(torch.int32)


def check_in_features(in_features: int) -> None:
    if in_features <= 0 or in_features % BLOCK_ROWS or in_features > MAX_IN_FEATURES:
        raise ValueError(f"in_features must be a positive multiple of {BLOCK_ROWS} and at most "
                         f"{MAX_IN_FEATURES}, got {in_features}")


def as_int16(v: Tensor) -> Tensor:
    """Values 0..65535 as the int16 bit patterns the format stores (q_perm, q_groups)."""
    v = v.to(torch.int64)
    return torch.where(v >= 1 << 15, v - (1 << 16), v).to(torch.int16)
