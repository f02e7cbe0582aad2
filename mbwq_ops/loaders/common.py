"""What every converter shares: JSON files, lazily read safetensors shards, layer entries."""
from __future__ import annotations

import glob
import json
import operator
import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import format as fmt
from ..checkpoint import layer_record
from ..layer import MBWQLinear

CONFIG_FILE = "config.json"
INDEX_SUFFIX = ".index.json"


def read_json(folder: str, name: str, required: bool = True) -> Optional[dict]:
    """The JSON object in ``folder/name``; None when it is absent and not ``required``."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if required:
            raise FileNotFoundError(f"{path}: missing")
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def as_int(value, where: str, *, minimum: Optional[int] = None,
           allowed: Optional[Sequence[int]] = None) -> int:
    """``value`` as an int, or a ValueError naming ``where`` (a float such as 64.5 or 64.0, a
    string, null or a bool is not an integer here)."""
    try:
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or isinstance(value, bool):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where} must be at least {minimum}, got {v}")
    if allowed is not None and v not in allowed:
        raise ValueError(f"{where} must be one of {tuple(allowed)}, got {v}")
    return v


class Shards:
    """The safetensors files of a checkpoint, read lazily.

    ``keys`` maps every tensor name to its file: from ``<name>.safetensors.index.json``'s
    ``weight_map`` when there is one, else from the headers of the files matching
    ``patterns``. Tensors are read one at a time (``safe_open``), each counted on one tqdm bar.
    """

    def __init__(self, folder: str, patterns: Sequence[str] = ("*.safetensors",),
                 progress: bool = True, desc: str = "reading"):
        from safetensors import safe_open

        self.folder = folder
        self._open = safe_open
        self._handles: Dict[str, object] = {}
        self.keys: Dict[str, str] = {}
        indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors" + INDEX_SUFFIX)))
        if indexes:
            for index in indexes:
                self._read_index(index)
        else:
            files = sorted({f for p in patterns for f in glob.glob(os.path.join(folder, p))})
            if not files:
                raise FileNotFoundError(f"{folder}: no safetensors file "
                                        f"({' or '.join(patterns)})")
            for path in files:
                for k in self._handle(os.path.basename(path)).keys():
                    if k in self.keys:
                        raise ValueError(f"{path}: tensor {k!r} is also in {self.keys[k]}")
                    self.keys[k] = os.path.basename(path)
        self._bar = None
        if progress:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=len(self.keys), desc=desc, unit="tensor", leave=False)

    def _read_index(self, index: str) -> None:
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}: not a safetensors index (no 'weight_map')") from None
        for k, name in weight_map.items():
            if not os.path.isfile(os.path.join(self.folder, name)):
                raise FileNotFoundError(f"{index}: names {name} (for {k}), which is missing")
            self.keys[k] = name

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = self._open(os.path.join(self.folder, name), framework="pt")
        return self._handles[name]

    def get(self, key: str) -> Tensor:
        name = self.keys[key]
        h = self._handle(name)
        if key not in h.keys():
            raise ValueError(f"{os.path.join(self.folder, name)}: the index names tensor "
                             f"{key!r} here, but the file has no such tensor")
        t = h.get_tensor(key)
        if self._bar is not None:
            self._bar.update(1)
        return t

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def modules_with(keys: Iterable[str], marker: str) -> List[str]:
    """The module prefixes ``m`` with a tensor ``m.<marker>``, in key order."""
    suffix = "." + marker
    return sorted({k[:-len(suffix)] for k in keys if k.endswith(suffix)})


def module_keys(keys: Iterable[str], module: str) -> Dict[str, str]:
    """The tensors directly under ``module``: local name -> full key."""
    p = module + "."
    return {k[len(p):]: k for k in keys if k.startswith(p) and "." not in k[len(p):]}


def read_modules(shards: Shards, marker: str, known: Iterable[str], convert, *,
                 dtype: Optional[torch.dtype], none_found: str, not_part_of: str
                 ) -> Tuple[Dict[str, dict], Dict[str, Tensor]]:
    """The walk every reader shares: each module with a ``<module>.<marker>`` tensor is read
    (its tensors must be among ``known``) and converted by ``convert(name, stored)`` into a
    ``QuantizedCheckpoint.layers`` entry; every other tensor goes to ``float_tensors``.
    ``none_found`` and ``not_part_of`` word the two errors for the source."""
    names = modules_with(shards.keys, marker)
    if not names:
        raise ValueError(f"{shards.folder}: {none_found} (no '*.{marker}' tensor)")
    known = set(known)
    layers: Dict[str, dict] = {}
    taken = set()
    for name in names:
        local = module_keys(shards.keys, name)
        unknown = sorted(set(local) - known)
        if unknown:
            raise ValueError(f"{name}: tensors {unknown} are not part of {not_part_of}")
        taken.update(local.values())
        layers[name] = convert(name, {k: shards.get(v) for k, v in local.items()})
    return layers, float_tensors(shards, taken, dtype)


def float_tensors(shards: Shards, skip: Iterable[str], dtype: Optional[torch.dtype]
                  ) -> Dict[str, Tensor]:
    """Every tensor not in ``skip``, floating-point ones cast to ``dtype`` when given."""
    skip = set(skip)
    out = {}
    for k in shards.keys:
        if k in skip:
            continue
        t = shards.get(k)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t
    return out


def check_shape(layer: str, name: str, t: Tensor, expected: Sequence[int], why: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{layer}: tensor {name} has shape {list(t.shape)} in the checkpoint, "
                         f"expected {list(expected)}" + (f" ({why})" if why else ""))


def check_dtype(layer: str, name: str, t: Tensor, dtype: torch.dtype) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{layer}: tensor {name} is {t.dtype} in the checkpoint, expected {dtype}")


def identity_perm(K: int) -> Tensor:
    return fmt.as_int16(torch.arange(K))


def entry(layer: str, ctor: dict, state: Dict[str, Tensor]) -> dict:
    """A ``QuantizedCheckpoint.layers`` entry, checked by building the layer once: a layout this
    library cannot run raises here, naming the layer, not later inside a model. The entry keeps
    the layer's record (``checkpoint.layer_record``) so that no consumer builds it again to ask."""
    state = {k: v.contiguous() for k, v in state.items()}
    try:
        m = MBWQLinear(**ctor)
        m.load_state_dict(state)  # validates the stored tensors (check_parameters)
    except ValueError as e:
        raise ValueError(f"{layer}: {e}") from e
    return {"ctor": ctor, "state": state, "record": layer_record(m)}


def mixed_ctor(K: int, N: int, groups: Sequence[fmt.Group], bias: bool) -> dict:
    return {"in_channels": K, "out_channels": N, "w_bit": groups[0].bits, "use_mbw": True,
            "group_size": groups[0].rows, "groups": len(groups),
            "rows_packed": sum(g.packed_rows for g in groups), "disable_bias": not bias,
            "dq_group_size": 32, "dq_mode": 2}


def uniform_ctor(K: int, N: int, w_bit: int, group_size: int, bias: bool) -> dict:
    return {"in_channels": K, "out_channels": N, "w_bit": w_bit, "use_mbw": False,
            "group_size": group_size, "disable_bias": not bias, "dq_group_size": 32, "dq_mode": 2}


# ----------------------------------------------------------------------------- fast repacking
# Reordering the rows of a packed matrix (GPTQ act-order) means unpacking and packing it again.
# At 2, 4 and 8 bits every byte of a word holds 8/b whole codes (FORMAT.md §4: code t of a word
# at bits [t*b, t*b + b)), so uint8 shifts do it without the per-row / per-block loops of
# format.unpack_codes / pack_codes. Measured on a busy 2-core machine, 4-bit 4096 x 11008,
# unpack + reorder + pack: 0.28 s CPU time against 1.16 s; 3-bit codes take format.py's path.
def unpack_rows(words: Tensor, bits: int) -> Tensor:
    """All codes ``[32P/bits, N]`` (uint8) of int32 words ``[P, N]`` packed along dim 0."""
    P, N = words.shape
    if bits not in (2, 4, 8):
        return fmt.unpack_codes(words, bits).to(torch.uint8)
    per = 8 // bits
    x = words.contiguous().view(torch.uint8).reshape(P, N, 4)  # little-endian bytes
    c = torch.stack([(x >> (bits * h)) & ((1 << bits) - 1) for h in range(per)], -1)
    return c.permute(0, 2, 3, 1).reshape(P * 4 * per, N)  # row = 4*per*p + per*byte + h


def pack_rows(codes: Tensor, bits: int) -> Tensor:
    """Inverse of :func:`unpack_rows` (R a multiple of 32): the words of ``format.pack_codes``."""
    R, N = codes.shape
    if bits not in (2, 4, 8):
        return fmt.pack_codes(codes, bits)
    if R % 32:
        raise ValueError(f"{R} rows are not whole 32-row blocks")
    per = 8 // bits
    P = R * bits // 32
    c = codes.to(torch.uint8).reshape(P, 4, per, N).permute(0, 3, 1, 2)  # [P, N, byte, h]
    x = c[..., 0].clone()
    for h in range(1, per):
        x |= c[..., h] << (bits * h)
    return x.contiguous().reshape(P, 4 * N).view(torch.int32)
