"""GreenBitAI checkpoints (green-bit-llm): the layers are MBWQ layers already.

A folder holds a transformers ``config.json`` (no ``quantization_config``), a
``quant_strategy.json`` with one entry per quantized module (``{"measurement":
{"model.layers.0": {"q_proj": {"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size":
{"4": 128, "2": 128}}, ...}}}``), ``model.safetensors`` or shards with an index, and tokenizer
files. The tensors of module ``m`` are ``m.qweight``, ``m.scales``, ``m.zeros``, ``m.q_perm``,
``m.channel_scale``, ``m.q_groups`` (mixed layers), ``m.bias`` (Qwen2's q/k/v_proj) and the
leftovers of FORMAT.md §2.2, which are dropped.

green-bit-llm picks the layer kind from the folder's name ("layer-mix" / "channel-mix"); here the
stored tensors decide (``q_groups`` present: a mixed layer), and the strategy entry says what the
shapes must be, by green-bit-llm's rules:

* one width (layer-mix): a uniform layer, ``w_bit = bits[0]``, ``group_size =
  group_size[str(bits[0])]``, ``scales`` ``[ceil(K / group_size), N]``;
* several widths (channel-mix): every width but the last gets ``max(1, int(K * prop) // gs) * gs``
  input features, the last one the rest, ``gs`` taken from the ``group_size`` mapping *by
  position*; each width adds ``features // gs`` groups and ``features / 32 * bits`` packed rows.

Only the linear layers inside the decoder blocks are quantized; embeddings, norms and
``lm_head`` stay floating point.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import format as fmt
from ..layer import LEGACY_KEYS, STORED_DTYPES
from . import common

STRATEGY_FILE = "quant_strategy.json"
# A quantized module must sit inside a decoder block ("model.layers.3.mlp.up_proj").
BLOCK_MODULE = re.compile(r"(^|\.)layers\.\d+\.")


def matches(folder: str, config: dict) -> bool:
    return (os.path.isfile(os.path.join(folder, STRATEGY_FILE))
            and not config.get("quantization_config"))


def packed_info(K: int, bits: Sequence[int], bits_prop: Sequence[float],
                group_sizes: Sequence[int]) -> Tuple[int, int, List[int]]:
    """green-bit-llm's layout rule for a channel-mix entry: (groups, packed rows, input
    features per width in the entry's order)."""
    groups = rows = 0
    features: List[int] = []
    for i, (b, p, gs) in enumerate(zip(bits, bits_prop, group_sizes)):
        n = max(1, int(K * p) // gs) * gs if i < len(bits) - 1 else K - sum(features)
        features.append(n)
        groups += n // gs
        rows += n // 32 * b
    return groups, rows, features


def read(folder: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    from ..quant.strategy import load_strategy, strategy_entry
    from . import QuantizedCheckpoint

    config = common.read_json(folder, common.CONFIG_FILE)
    strategy_path = os.path.join(folder, STRATEGY_FILE)
    try:
        strategy = load_strategy(strategy_path)
    except ValueError as e:
        raise ValueError(f"{strategy_path}: {e}") from e

    def convert(name: str, stored: Dict[str, Tensor]) -> dict:
        if not BLOCK_MODULE.search(name):
            raise ValueError(f"{name}: quantized, but only the linear layers inside the "
                             f"decoder blocks (model.layers.N.*) are quantized in GreenBitAI "
                             f"checkpoints")
        stored = {k: t for k, t in stored.items() if k in STORED_DTYPES}  # legacy keys dropped
        return _layer(name, stored, strategy_entry(strategy, name), strategy_path)

    with common.Shards(folder, progress=progress, desc="GreenBitAI checkpoint") as shards:
        layers, tensors = common.read_modules(
            shards, "qweight", set(STORED_DTYPES) | set(LEGACY_KEYS), convert, dtype=dtype,
            none_found="no quantized layer",
            not_part_of=f"the MBWQ format (known: {sorted(STORED_DTYPES)})")
    mixed = sum(e["ctor"]["use_mbw"] for e in layers.values())
    return QuantizedCheckpoint(
        source="greenbit", config=config, layers=layers, tensors=tensors,
        tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                            "lm_head.weight" not in tensors)),
        info={"strategy_file": STRATEGY_FILE, "mixed_layers": mixed,
              "uniform_layers": len(layers) - mixed})


def _layer(name: str, stored: Dict[str, Tensor], entry: Optional[dict], strategy_path: str
           ) -> dict:
    for k in ("qweight", "scales", "zeros"):
        if k not in stored:
            raise ValueError(f"{name}: tensor {k} is missing from the checkpoint")
    for k in ("q_perm", "q_groups"):  # int16 in the format; accept any integer type in range
        if k in stored and stored[k].dtype != torch.int16 and not stored[k].is_floating_point():
            stored[k] = fmt.as_int16(stored[k])
    for k, t in stored.items():
        common.check_dtype(name, k, t, STORED_DTYPES[k])
    qweight = stored["qweight"]
    if qweight.dim() != 2:
        raise ValueError(f"{name}: tensor qweight must be 2-D, got shape {list(qweight.shape)}")
    N = qweight.shape[1]
    if "q_groups" in stored:
        K, ctor = _mixed(name, stored, entry, strategy_path)
    else:
        K, ctor = _uniform(name, stored, entry, strategy_path)
    if "q_perm" not in stored:
        stored["q_perm"] = common.identity_perm(K)
    common.check_shape(name, "q_perm", stored["q_perm"], [K])
    cs = stored.get("channel_scale")
    if cs is None:
        stored["channel_scale"] = torch.ones(1, 1, K, dtype=torch.float16)
    else:
        common.check_shape(name, "channel_scale", cs, [1, 1, K])
    if "bias" in stored:
        common.check_shape(name, "bias", stored["bias"], [N])
    return common.entry(name, ctor, stored)


def _entry_layout(name: str, entry: dict, strategy_path: str
                  ) -> Tuple[List[int], List[float], List[int]]:
    """(bits, bits_prop, group size per width by position) of a strategy entry."""
    where = f"{strategy_path}: entry for {name}"
    bits = [common.as_int(b, f"{where}: bits[{i}]", allowed=fmt.WIDTHS)
            for i, b in enumerate(entry["bits"])]
    prop = entry.get("bits_prop", [1.0] if len(bits) == 1 else None)
    if prop is None or len(prop) != len(bits):
        raise ValueError(f"{where}: bits_prop must have one share per width {bits}, got {prop!r}")
    gs = entry.get("group_size", 128)
    if isinstance(gs, dict):
        sizes = list(gs.values())
    elif isinstance(gs, (list, tuple)):
        sizes = list(gs)
    else:
        sizes = [gs] * len(bits)
    if len(sizes) < len(bits):
        raise ValueError(f"{where}: group_size {gs!r} has fewer entries than bits {bits}")
    sizes = [common.as_int(g, f"{where}: group_size", minimum=1) for g in sizes[:len(bits)]]
    return bits, [float(p) for p in prop], sizes


def _uniform(name: str, stored: Dict[str, Tensor], entry: Optional[dict], strategy_path: str):
    qweight = stored["qweight"]
    N = qweight.shape[1]
    if entry is None:
        raise ValueError(f"{name}: a uniform layer (no q_groups) needs its width and group size "
                         f"from {strategy_path}, which has no entry for it")
    bits, _, _ = _entry_layout(name, entry, strategy_path)
    if len(bits) != 1:
        raise ValueError(f"{name}: {strategy_path} gives several widths {bits} (channel-mix), "
                         f"but the checkpoint has no q_groups tensor for a mixed layer")
    w_bit = bits[0]
    if w_bit not in fmt.UNIFORM_WIDTHS:
        raise ValueError(f"{name}: a uniform layer (no q_groups) must be 4- or 2-bit, "
                         f"{strategy_path} gives {w_bit}")
    gs = entry.get("group_size", 128)
    if isinstance(gs, dict):
        if str(w_bit) not in gs:
            raise ValueError(f"{strategy_path}: entry for {name}: group_size {gs} has no entry "
                             f"for width {w_bit}")
        gs = gs[str(w_bit)]
    elif isinstance(gs, (list, tuple)):
        gs = gs[0]
    group_size = common.as_int(gs, f"{strategy_path}: entry for {name}: group_size", minimum=1)
    K = (stored["q_perm"].numel() if "q_perm" in stored
         else stored["channel_scale"].numel() if "channel_scale" in stored
         else qweight.shape[0] * 32 // w_bit)
    common.check_shape(name, "qweight", qweight, [K * w_bit // 32, N],
                       f"{K} input features at {w_bit} bits")
    G = math.ceil(K / group_size)
    for k in ("scales", "zeros"):
        common.check_shape(name, k, stored[k], [G, N],
                           f"{G} groups of {group_size} rows, from {strategy_path}")
    return K, common.uniform_ctor(K, N, w_bit, group_size, "bias" in stored)


def _mixed(name: str, stored: Dict[str, Tensor], entry: Optional[dict], strategy_path: str):
    qweight, q_groups = stored["qweight"], stored["q_groups"]
    R, N = qweight.shape
    if q_groups.dim() != 1 or q_groups.numel() < 2 or q_groups.numel() % 2:
        raise ValueError(f"{name}: tensor q_groups must be 1-D with an even, non-zero length, "
                         f"got shape {list(q_groups.shape)}")
    G = q_groups.numel() // 2
    v = (q_groups.to(torch.int64) & 0xFFFF).tolist()
    if "q_perm" in stored:
        K = stored["q_perm"].numel()
    elif "channel_scale" in stored:
        K = stored["channel_scale"].numel()
    else:  # the last group runs to the end of qweight (the original's group-map rule)
        bits, starts = v[0::2], v[1::2] + [R]
        K = sum((starts[g + 1] - starts[g]) * 32 // max(bits[g], 1) for g in range(G))
    try:
        groups = fmt.parse_q_groups(q_groups, K, R)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if entry is not None:
        bits, prop, sizes = _entry_layout(name, entry, strategy_path)
        G_want, R_want, features = packed_info(K, bits, prop, sizes)
        why = f"{strategy_path}: bits {bits}, bits_prop {prop}, group sizes {sizes}, K = {K}"
        common.check_shape(name, "qweight", qweight, [R_want, N], why)
        common.check_shape(name, "q_groups", q_groups, [2 * G_want], why)
        have = {}
        for g in groups:
            have[g.bits] = have.get(g.bits, 0) + g.rows
        want = {b: n for b, n in zip(bits, features) if n}
        if have != want:
            raise ValueError(f"{name}: tensor q_groups gives input features per width {have}, "
                             f"expected {want} ({why})")
    for k in ("scales", "zeros"):
        common.check_shape(name, k, stored[k], [len(groups), N], "one row per q_groups group")
    return K, common.mixed_ctor(K, N, groups, "bias" in stored)
