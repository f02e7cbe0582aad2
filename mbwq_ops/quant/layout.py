"""The layout a quantizer gives one layer, and the argument checks around it: which input
features go to which stored rows (importance order), units of rows, widths and group sizes, and
what each choice costs in stored bits (``candidate_bits``, ``cheapest_bpw``). quantize.py builds
layers from these plans; measure.py prices and chooses them."""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import format as fmt

WIDTHS = fmt.WIDTHS


# ============================================================================ plans
@dataclass
class LayerPlan:
    """How one layer is stored: ``order`` (stored row -> input feature) and the groups as
    ``(bits, rows)`` in stored order. ``use_mbw=False`` means uniform mode."""

    order: Tensor
    groups: List[Tuple[int, int]]
    use_mbw: bool = True
    w_bit: int = 4
    group_size: int = 128

    def check(self, K: int) -> None:
        if self.order.dim() != 1 or self.order.numel() != K:
            raise ValueError(f"plan order must have shape [{K}], got {tuple(self.order.shape)}")
        if not self.groups:
            raise ValueError("plan has no groups")
        bad = [b for b, _ in self.groups if b not in WIDTHS]
        if bad:
            raise ValueError(f"plan widths must be in {WIDTHS}, got {bad}")
        if sum(r for _, r in self.groups) != K:
            raise ValueError(f"plan covers {sum(r for _, r in self.groups)} rows, layer has {K}")
        ws = [b for b, _ in self.groups]
        if any(WIDTHS.index(a) > WIDTHS.index(b) for a, b in zip(ws, ws[1:])):
            raise ValueError(f"groups must be sorted by width 8..2, got {ws}")
        if any(r <= 0 or r % fmt.BLOCK_ROWS for _, r in self.groups):
            raise ValueError(f"every group needs a positive multiple of {fmt.BLOCK_ROWS} rows, got "
                             f"{[r for _, r in self.groups]}")


def _split(rows: int, size: int) -> List[int]:
    out = []
    while rows > 0:
        out.append(min(size, rows))
        rows -= size
    return out


def _importance(W: Tensor, H: Optional[Tensor]) -> Tensor:
    energy = W.float().pow(2).sum(1)
    if H is not None:
        energy = energy * torch.diagonal(H).float().clamp_min(0)
    return energy


def _check_group_size(gs: int, arg: str = "group_size") -> None:
    """Groups are whole blocks of fmt.BLOCK_ROWS rows (the kernels' unit)."""
    if not isinstance(gs, int) or gs <= 0 or gs % fmt.BLOCK_ROWS:
        raise ValueError(f"{arg} must be a positive multiple of {fmt.BLOCK_ROWS}, got {gs!r}")


def _group_sizes(group_size) -> List[int]:
    """Candidate group sizes (an int or a non-empty sequence of them), validated."""
    if isinstance(group_size, (str, bytes, float)) or not (
            isinstance(group_size, int) or hasattr(group_size, "__iter__")):
        raise ValueError(f"group_size must be an int or a sequence of ints, got {group_size!r}")
    gss = [group_size] if isinstance(group_size, int) else list(group_size)
    if not gss:
        raise ValueError("group_size must be an int or a non-empty sequence of ints, got an "
                         "empty sequence")
    for g in gss:
        _check_group_size(g)
    return gss


def _check_widths(widths: Sequence[int]) -> None:
    ws = list(widths)
    if not ws or any(isinstance(b, bool) or b not in WIDTHS for b in ws):
        raise ValueError(f"widths must be a non-empty selection of {WIDTHS}, got {widths!r}")


def _as_real(value) -> float:
    """``value`` as a float; NaN for what is not a real number (strings and bools included)."""
    if isinstance(value, (str, bool)):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _check_budget_value(value, arg: str) -> float:
    v = _as_real(value)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{arg} must be a positive, finite number of bits per weight, got {value!r}")
    return v


def _as_width(bits, arg: str) -> int:
    """An int width (any integer type; not a float, str or bool), validated against WIDTHS."""
    try:
        b = operator.index(bits)
    except TypeError:
        b = None
    if b is None or isinstance(bits, bool) or b not in WIDTHS:
        raise ValueError(f"{arg} must be one of {WIDTHS}, got {bits!r}")
    return b


def _check_damp(damp) -> None:
    d = _as_real(damp)
    if not math.isfinite(d) or d < 0:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")


def _check_method(method) -> None:
    if method not in ("auto", "rtn", "gptq"):
        raise ValueError(f"method must be 'auto', 'rtn' or 'gptq', got {method!r}")


def candidate_bits(rows: int, N: int, bits: int, group_size: int) -> int:
    """Stored bits of ``rows`` stored rows x ``N`` columns at width ``bits`` in groups of
    ``group_size`` rows: the codes plus one fp16 scale and one fp16 zero per group and column."""
    return N * (rows * bits + 32 * -(-rows // group_size))


def cheapest_bpw(shapes: Optional[Iterable[Tuple[int, int]]] = None,
                 group_size: Union[int, Sequence[int]] = 128,
                 widths: Sequence[int] = WIDTHS) -> float:
    """The smallest ``bpw`` that ``quantize_model(bpw=...)`` can meet for layers of these
    ``(in_features, out_features)`` shapes: every unit of ``max(group_size)`` rows at its
    cheapest ``(width, group size)``. Arithmetic only, so a budget can be checked before any
    measuring.

    Without ``shapes``: the floor over all shapes, that of one unit of ``max(group_size)``
    rows (``min(widths) + 32 / max(group_size)``); a shorter unit needs at least as many
    groups per row."""
    gss = _group_sizes(group_size)
    _check_widths(widths)
    if shapes is None:
        shapes = [(max(gss), 1)]
    total = weights = 0
    for K, N in shapes:
        total += sum(min(candidate_bits(r, N, b, gs) for b in widths for gs in gss)
                     for r in _split(K, max(gss)))
        weights += K * N
    if not weights:
        raise ValueError("cheapest_bpw: no layer shapes given")
    return total / weights


def _check_min_budget(min_bpw: float, bpw: float, arg: str, hint: str = "") -> None:
    """Raise when ``bpw`` bits per weight is below ``min_bpw``, the cheapest layout."""
    if bpw < min_bpw * (1 - 1e-12):
        raise ValueError(f"{arg}={bpw!r} is a bit budget below the cheapest layout possible: "
                         f"{min_bpw:.4g} bits per weight (codes + scales + zeros) with these "
                         f"widths and group sizes; ask for at least {min_bpw:.4g}{hint}")


def _assemble(order: Tensor, unit_rows: List[int], choice: List[Tuple[int, int]]) -> LayerPlan:
    """Stored order from units (in importance order) and their (bits, group size) choices:
    units sorted by width (stable), each split into groups of its group size."""
    starts = [0]
    for r in unit_rows:
        starts.append(starts[-1] + r)
    idx = sorted(range(len(unit_rows)), key=lambda u: WIDTHS.index(choice[u][0]))
    perm, groups = [], []
    for u in idx:
        b, gs = choice[u]
        perm.append(order[starts[u]:starts[u + 1]])
        groups += [(b, r) for r in _split(unit_rows[u], gs)]
    return LayerPlan(torch.cat(perm), groups, True, groups[0][0], choice[idx[0]][1])


def _check_shared_layout(shared) -> Tuple[Tuple[str, ...], ...]:
    """``shared_layout`` as a tuple of tuples of module leaf names, each naming 2+ layers."""
    if shared is None:
        return ()
    if isinstance(shared, str) or not isinstance(shared, (list, tuple)):
        raise ValueError(f"shared_layout must be a list of tuples of layer names, such as "
                         f"[('q_proj', 'k_proj', 'v_proj')], got {shared!r}")
    out = []
    for names in shared:
        if (isinstance(names, str) or not isinstance(names, (list, tuple)) or len(names) < 2
                or not all(isinstance(n, str) and n and "." not in n for n in names)
                or len(set(names)) != len(names)):
            raise ValueError(f"shared_layout: each entry must name two or more distinct sibling "
                             f"layers by their own names (no dots), got {names!r}")
        out.append(tuple(names))
    return tuple(out)


def _shared_units(names: Sequence[str], shared: Tuple[Tuple[str, ...], ...]
                  ) -> Tuple[List[List[str]], List[Tuple[str, ...]]]:
    """``names`` cut into allocation units: each set of siblings (one parent module) named by an
    entry of ``shared`` is one unit, every other layer a unit of its own. Also returns the
    entries that matched no parent."""
    present = set(names)
    taken: Dict[str, List[str]] = {}
    used = set()
    for entry in shared:
        parents = {n.rsplit(".", 1)[0] for n in names if "." in n and n.rsplit(".", 1)[1] == entry[0]}
        for parent in sorted(parents):
            members = [f"{parent}.{leaf}" for leaf in entry]
            if all(m in present and m not in taken for m in members):
                for m in members:
                    taken[m] = members
                used.add(entry)
    units, seen = [], set()
    for n in names:
        unit = taken.get(n, [n])
        if unit[0] not in seen:
            seen.add(unit[0])
            units.append(unit)
    return units, [e for e in shared if e not in used]
