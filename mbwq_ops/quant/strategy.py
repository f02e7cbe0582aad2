"""green-bit-llm quantization strategy files (``quant_strategy.json``): reading them and
finding the entry of each layer. What an entry means for a layer (widths, shares of the input
features, group sizes) is ``quantize.plan_from_strategy``.

An entry is ``{"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size": {"4": 32, "2": 32}}``;
the ``measurement`` mapping holds entries either flat (``{"model.layers.0.self_attn.q_proj":
entry}``) or per block (``{"model.layers.0": {"self_attn.q_proj" | "q_proj": entry}}``).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["load_strategy", "strategy_entry", "unmatched_entries"]

# What an entry may hold: its widths, their shares of the input features, their group sizes,
# and scale_bits (the width of the scales in exllamav2-style formats; MBWQ stores fp16 scales,
# so it is accepted and has no effect).
ENTRY_KEYS = frozenset({"bits", "bits_prop", "group_size", "scale_bits"})


def load_strategy(path_or_dict: Union[str, Dict]) -> Dict[str, Dict]:
    """Read a green-bit-llm ``quant_strategy.json`` (or its dict). Returns the ``measurement``
    mapping: either flat (``{layer name: entry}``) or per block
    (``{"model.layers.0": {"self_attn.q_proj" | "q_proj": entry}}``)."""
    if isinstance(path_or_dict, dict):
        d = path_or_dict
    elif not isinstance(path_or_dict, (str, bytes, os.PathLike)):
        raise ValueError(f"strategy must be a mapping ({{'measurement': {{...}}}}) or the path "
                         f"of a JSON file, got {type(path_or_dict).__name__}")
    else:
        with open(path_or_dict) as f:
            d = json.load(f)
    if not isinstance(d, dict):
        raise ValueError(f"strategy must be a mapping ({{'measurement': {{...}}}}), got "
                         f"{type(d).__name__}")
    m = d.get("measurement", d)
    if not isinstance(m, dict):
        raise ValueError("strategy: 'measurement' must be a mapping of layer names")
    for key, v in m.items():
        if _is_entry(v):
            continue
        if not isinstance(v, dict):
            raise ValueError(f"strategy: {key!r} must be an entry {{'bits': [...], ...}} or a "
                             f"mapping of sub-layer names to entries, got {v!r}")
        for sub, e in v.items():
            if not _is_entry(e):
                raise ValueError(f"strategy: {key}.{sub} must be an entry with 'bits' "
                                 f"({{'bits': [...], 'bits_prop': [...], ...}}), got {e!r}")
    odd = sorted({f"{'.'.join(path)}: {k!r}" for path in _entry_keys(m)
                  for k in _entry(m, path) if k not in ENTRY_KEYS})
    if odd:  # a misspelt key ("groupsize") would otherwise fall back to its default unseen
        warnings.warn(f"strategy: keys that mean nothing here, ignored: {', '.join(odd[:8])}"
                      + (" ..." if len(odd) > 8 else "") + f" (an entry's keys: "
                      f"{', '.join(sorted(ENTRY_KEYS))})", UserWarning, stacklevel=2)
    return m


def _entry(strategy: Dict[str, Dict], path: Tuple[str, ...]) -> Dict:
    return strategy[path[0]] if len(path) == 1 else strategy[path[0]][path[1]]


def _entry_keys(strategy: Dict[str, Dict]) -> List[Tuple[str, ...]]:
    """The key path of every entry of a strategy: ``(key,)`` flat, ``(block, sub)`` nested."""
    out = []
    for key, v in strategy.items():
        if _is_entry(v):
            out.append((key,))
        elif isinstance(v, dict):
            out += [(key, sub) for sub, e in v.items() if _is_entry(e)]
    return out


def _is_entry(v) -> bool:
    return isinstance(v, dict) and "bits" in v


def strategy_entry(strategy: Dict[str, Dict], name: str) -> Optional[Dict]:
    """The strategy entry for the module ``name`` (exact flat key, or block prefix + sub-key
    matched on the last components, as green-bit-llm does)."""
    found = lookup(strategy, name)
    return None if found is None else found[1]


def lookup(strategy: Dict[str, Dict], name: str
           ) -> Optional[Tuple[Tuple[str, ...], Dict]]:
    """:func:`strategy_entry` with the key path it was found under: ``(key,)`` for a flat
    entry, ``(block, sub)`` for a nested one."""
    v = strategy.get(name)
    if _is_entry(v):
        return (name,), v
    best = None
    for block, sub in strategy.items():
        if isinstance(sub, dict) and not _is_entry(sub) and name.startswith(block + "."):
            if best is None or len(block) > len(best):
                best = block
    if best is None:
        return None
    rest = name[len(best) + 1:]
    sub = strategy[best]
    if _is_entry(sub.get(rest)):
        return (best, rest), sub[rest]
    last = rest.split(".")[-1]
    if _is_entry(sub.get(last)):
        return (best, last), sub[last]
    for k, e in sub.items():
        if _is_entry(e) and rest.endswith(k):
            return (best, k), e
    return None


def unmatched_entries(strategy: Dict[str, Dict], names: Sequence[str]) -> List[str]:
    """The entries (dotted key paths) that :func:`strategy_entry` gives to none of ``names``: a
    misspelt layer name, which would otherwise leave its layer to the defaults unnoticed."""
    used = {found[0] for found in (lookup(strategy, n) for n in names) if found is not None}
    return [".".join(k) for k in _entry_keys(strategy) if k not in used]
