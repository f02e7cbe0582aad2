"""green-bit-llm quantization strategy files (``quant_strategy.json``): reading them and
finding the entry of each layer. What an entry means for a layer (widths, shares of the input
features, group sizes) is ``quantize.plan_from_strategy``.

An entry is ``{"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size": {"4": 32, "2": 32}}``;
the ``measurement`` mapping holds entries either flat (``{"model.layers.0.self_attn.q_proj":
entry}``) or per block (``{"model.layers.0": {"self_attn.q_proj" | "q_proj": entry}}``).

Files written by green-bit-llm's tools also carry numbers beside the entries of a block (its
measured ``"accuracy"``, ``"total_bits"``, and in newer files a key spelt ``"scale_groups:"``,
colon included); they describe the block, not a layer, and are skipped. Values inside an entry
are checked for their type when the file is read, so ``"group_size": 64.5`` (or ``null``,
``"abc"``) is an error naming the entry and the field instead of a truncated number.
"""
from __future__ import annotations

import json
import math
import operator
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

__all__ = ["load_strategy", "strategy_entry", "unmatched_entries", "check_entry"]

# What an entry may hold: its widths, their shares of the input features, their group sizes,
# and scale_bits / scale_groups (how exllamav2-style formats store their scales; MBWQ stores
# fp16 scales, so they are accepted and have no effect; "scale_groups:" is how newer files
# spell the latter).
ENTRY_KEYS = frozenset({"bits", "bits_prop", "group_size", "scale_bits", "scale_groups",
                        "scale_groups:"})


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
            if _is_block_value(e):
                continue  # "accuracy", "total_bits", ...: numbers about the whole block
            if not _is_entry(e):
                raise ValueError(f"strategy: {key}.{sub} must be an entry with 'bits' "
                                 f"({{'bits': [...], 'bits_prop': [...], ...}}), got {e!r}")
    for path in _entry_keys(m):
        check_entry(_entry(m, path), ".".join(path))
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


def _is_block_value(v) -> bool:
    """A number (or string) stored beside a block's entries, describing the block."""
    return v is None or isinstance(v, (int, float, str))


def _integer(value) -> Optional[int]:
    """``value`` if it is an integer (any integer type, not a bool, float or string)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_entry(entry: Dict, where: str = "entry") -> None:
    """Check the types of one entry's values; ``ValueError`` naming ``where`` and the field.

    ``bits``: a list of integers; ``bits_prop``: a list of real numbers; ``group_size``: an
    integer, a list of integers or a mapping width -> integer; ``scale_bits`` /
    ``scale_groups``: integers. What the values mean (allowed widths, shares summing to 1,
    group sizes in whole blocks) is checked where they are used."""
    def bad(field, value, want):
        return ValueError(f"strategy: {where}: {field} must be {want}, got {value!r}")

    bits = entry.get("bits")
    if not isinstance(bits, (list, tuple)):
        raise bad("bits", bits, "a list of integer widths")
    for i, b in enumerate(bits):
        if _integer(b) is None:
            raise bad(f"bits[{i}]", b, "an integer width")
    if "bits_prop" in entry:
        prop = entry["bits_prop"]
        if not isinstance(prop, (list, tuple)):
            raise bad("bits_prop", prop, "a list of shares, one per width")
        for i, p in enumerate(prop):
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p):
                raise bad(f"bits_prop[{i}]", p, "a real number")
    if "group_size" in entry:
        gs = entry["group_size"]
        if isinstance(gs, dict):
            items = [(f"group_size[{k!r}]", v) for k, v in gs.items()]
        elif isinstance(gs, (list, tuple)):
            items = [(f"group_size[{i}]", v) for i, v in enumerate(gs)]
        else:
            items = [("group_size", gs)]
        for field, v in items:
            if _integer(v) is None:
                raise bad(field, v, "an integer number of rows")
    for field in ("scale_bits", "scale_groups", "scale_groups:"):
        if field in entry and _integer(entry[field]) is None:
            raise bad(field, entry[field], "an integer")


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
