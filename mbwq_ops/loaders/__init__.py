"""Read quantized checkpoints made by other tools and convert their layers to MBWQ layers.

Three sources are understood:

* ``"greenbit"`` -- GreenBitAI's models (green-bit-llm): ``quant_strategy.json`` beside a
  transformers ``config.json``; the layers are already in the MBWQ stored format.
* ``"gptq"`` -- AutoGPTQ / GPTQModel folders (``quantization_config.quant_method == "gptq"`` in
  ``config.json``, or a ``quantize_config.json``); codes are repacked into stored order and the
  integer zero-points become MBWQ's additive fp16 ``zeros``.
* ``"exl2"`` -- exllamav2 folders (``output*.safetensors``); same packing as MBWQ mixed layers,
  the 4-bit scales are expanded to fp16 and the symmetric mid-point becomes ``zeros``.

:func:`read_checkpoint` returns a :class:`QuantizedCheckpoint`: for every quantized module its
``MBWQLinear`` constructor arguments and its stored tensors, and every other tensor as stored.
Building the model around it (a transformers model, the built-in TinyLlama, ...) is the
consumer's job; :func:`build_layer` makes one prepared layer from an entry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from ..layer import MBWQLinear

__all__ = ["QuantizedCheckpoint", "SOURCES", "detect", "read_checkpoint", "build_layer"]

SOURCES = ("greenbit", "gptq", "exl2")


@dataclass
class QuantizedCheckpoint:
    """A checkpoint converted to MBWQ layers.

    ``layers``: module name (``"model.layers.0.self_attn.q_proj"``) -> ``{"ctor": MBWQLinear
    keyword arguments, "state": stored tensors, "record": checkpoint.layer_record of the layer
    they build}``; ``state`` holds exactly MBWQLinear's stored
    keys (``qweight`` int32, ``scales``/``zeros`` fp16, ``q_perm`` int16, ``q_groups`` int16 in
    mixed mode, ``channel_scale`` fp16 ``[1, 1, K]``, ``bias`` fp16 when the layer has one), so
    ``MBWQLinear(**ctor)`` + ``load_state_dict(state)`` + ``prepare_params()`` gives the layer.

    ``tensors``: every other tensor (embeddings, norms, an unquantized ``lm_head``) by its
    state_dict key, converted to ``dtype`` when one was asked for.

    ``tie_word_embeddings``: the output projection shares the input embedding (config
    ``tie_word_embeddings``); the checkpoint then has no ``lm_head.weight`` and the consumer must
    tie the two after loading.

    ``info``: what the source said about its quantization (bits, group size, format version,
    ...), for messages and model cards; nothing here is needed to build the layers.
    """

    source: str
    config: Dict[str, Any]
    layers: Dict[str, Dict[str, Any]]
    tensors: Dict[str, Tensor]
    tie_word_embeddings: bool = False
    info: Dict[str, Any] = field(default_factory=dict)


def detect(folder: Union[str, os.PathLike]) -> Optional[str]:
    """Which source the checkpoint folder ``folder`` is: ``"greenbit"``, ``"gptq"``, ``"exl2"``,
    or ``None`` when it is none of them (an MBWQ checkpoint of this library, a plain model, ...).
    """
    from . import common, exl2, gptq, greenbit

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    config = common.read_json(folder, common.CONFIG_FILE, required=False) or {}
    for name, module in (("gptq", gptq), ("exl2", exl2), ("greenbit", greenbit)):
        if module.matches(folder, config):
            return name
    return None


def read_checkpoint(folder: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                    progress: bool = True, source: Optional[str] = None) -> QuantizedCheckpoint:
    """Read the quantized checkpoint in ``folder`` and convert its layers to MBWQ layers.

    ``dtype``: floating-point dtype for the unquantized tensors (default: as stored); the MBWQ
    stored tensors keep their format dtypes. ``progress``: a tqdm bar over the tensors read.
    ``source``: skip :func:`detect` and read the folder as this source.

    Raises ``ValueError`` naming the file, the layer or the field for anything that cannot be
    read or represented (with a :class:`FileNotFoundError` for a missing folder or file)."""
    from . import common, exl2, gptq, greenbit

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such checkpoint folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if source is None:
        source = detect(folder)
        if source is None:
            raise ValueError(
                f"{folder}: not a quantized checkpoint this library reads: expected a GreenBitAI "
                f"folder ({greenbit.STRATEGY_FILE} beside {common.CONFIG_FILE}), a GPTQ folder "
                f"(quantization_config.quant_method 'gptq' in {common.CONFIG_FILE}, or "
                f"{gptq.QUANTIZE_CONFIG_FILE}) or an EXL2 folder (quant_method 'exl2', "
                f"output*.safetensors)")
    elif source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    reader = {"greenbit": greenbit.read, "gptq": gptq.read, "exl2": exl2.read}[source]
    return reader(folder, dtype=dtype, progress=progress)


def build_layer(entry: Dict[str, Any], device: Union[str, torch.device, None] = None
                ) -> MBWQLinear:
    """A prepared ``MBWQLinear`` from one ``QuantizedCheckpoint.layers`` entry."""
    layer = MBWQLinear(**entry["ctor"])
    layer.load_state_dict(entry["state"])
    if device is not None:
        layer.to(device)
    layer.prepare_params()
    return layer
