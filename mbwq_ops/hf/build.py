"""A transformers model with MBWQ layers from a converted checkpoint.

Every source ends in one place: a transformers config carrying the ``mbwq`` quantization config
(the per-layer records) and a state_dict in the stored format, handed to
``AutoModelForCausalLM.from_pretrained``. The registered quantizer puts the MBWQ layers in, so a
converted GreenBitAI / GPTQ / EXL2 model is the same kind of object as one saved by
``save_pretrained``, and saving it writes an MBWQ checkpoint.

A checkpoint here is anything shaped like ``mbwq_ops.loaders.QuantizedCheckpoint``: ``source``,
``config`` (the transformers config as a dict), ``layers`` (name -> ``{"ctor": MBWQLinear
kwargs, "state": stored tensors, optionally "record": the layer's checked
``checkpoint.layer_record``}``), ``tensors`` (every other tensor by state_dict key) and
optionally ``tie_word_embeddings``.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Dict, Optional

import torch
from tqdm.auto import tqdm

from .. import checkpoint as C
from ..layer import MBWQLinear
from .quantizer import QUANT_METHOD, MbwqConfig, ctor_of

__all__ = ["build_model", "checkpoint_from_save_quantized", "check_loading_info"]


def build_model(ckpt, *, dtype=None, device=None, progress: bool = True):
    """The transformers model (eval mode, prepared) holding ``ckpt``'s layers and tensors.

    ``dtype``: the floating dtype of the unquantized weights (default: the config's); the MBWQ
    stored tensors keep theirs. ``device``: where to put the model (default: CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    records, state = {}, {}
    for name, entry in tqdm(ckpt.layers.items(), desc=f"{ckpt.source} layers",
                            disable=not progress, total=len(ckpt.layers)):
        record = entry.get("record")
        if record is None:  # an entry its reader did not check: build the layer once to check it
            layer = MBWQLinear(**entry["ctor"])
            try:
                layer.load_state_dict(entry["state"])  # checks dtypes and shapes against the ctor
                record = C.layer_record(layer)
            except (ValueError, KeyError) as e:
                raise ValueError(f"{ckpt.source} checkpoint, layer {name}: {e}") from e
        records[name] = record
        state.update({f"{name}.{k}": v for k, v in entry["state"].items()})
    overlap = sorted(set(state) & set(ckpt.tensors))
    if overlap:
        raise ValueError(f"{ckpt.source} checkpoint: {overlap[:4]} are both quantized-layer and "
                         f"plain tensors")
    state.update(ckpt.tensors)

    cfg = dict(ckpt.config)
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{ckpt.source} checkpoint: its config has no model_type")
    cfg.pop("quantization_config", None)  # the source's own; ours replaces it
    if getattr(ckpt, "tie_word_embeddings", None) is not None:
        cfg["tie_word_embeddings"] = bool(ckpt.tie_word_embeddings)
    config = AutoConfig.for_model(model_type, **cfg)
    if dtype is None and getattr(config, "dtype", None) is None:
        # transformers' "auto" would take the first floating tensor, maybe an fp16 scale
        dtype = next((t.dtype for t in ckpt.tensors.values() if t.is_floating_point()), None)
    config.quantization_config = MbwqConfig(layers=records).to_dict()
    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"{ckpt.source} checkpoint: transformers has no causal LM for "
                         f"model_type {model_type!r}") from None
    # the class's from_pretrained (the Auto class wants a folder) with the tensors in memory
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or "auto", output_loading_info=True)
    check_loading_info(info, f"{ckpt.source} checkpoint")
    return _place(model, device)


def check_loading_info(info: Dict, what: str) -> None:
    """Raise when transformers left weights uninitialised or mis-shaped, or ignored tensors: it
    only logs these, and a model with random weights must not pass for the checkpoint."""
    problems = []
    for key, label in (("missing_keys", "missing"), ("mismatched_keys", "of the wrong shape"),
                       ("unexpected_keys", "not used by the model")):
        keys = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(key) or ())
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise ValueError(f"{what}: tensors " + "; ".join(problems))


def _place(model, device):
    if device is not None:
        model.to(device)  # MBWQ layers move their kernel tables too; stored dtypes are kept
    return model.eval()


def checkpoint_from_save_quantized(path: str, *, dtype: Optional[torch.dtype] = None):
    """A checkpoint of :func:`mbwq_ops.save_quantized` that holds a transformers model (its
    ``config.json`` beside ``mbwq_config.json``), in the shape :func:`build_model` reads."""
    from safetensors.torch import load_file

    cfg = C.read_config(path)
    hf_config = os.path.join(path, "config.json")
    if not os.path.isfile(hf_config):
        kind = cfg.get("metadata", {}).get("model", {}).get("kind")
        raise ValueError(f"{path}: an MBWQ checkpoint without a transformers config.json"
                         + (f" (it holds a {kind} model)" if kind else "")
                         + "; load it with mbwq_ops.load_quantized(skeleton, path), or write "
                         "the transformers config beside it (model.config.save_pretrained(path))")
    with open(hf_config) as f:
        config = json.load(f)
    tensors = load_file(os.path.join(path, C.WEIGHTS_NAME))
    for alias, target in cfg.get("aliases", {}).items():
        tensors[alias] = tensors[target]
    layers = {}
    for name, record in cfg["layers"].items():
        prefix = name + "."
        state = {k[len(prefix):]: tensors.pop(k) for k in list(tensors) if k.startswith(prefix)
                 and "." not in k[len(prefix):]}
        layers[name] = {"ctor": ctor_of(name, record), "state": state}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    tie = config.get("tie_word_embeddings")
    return SimpleNamespace(source=QUANT_METHOD, config=config, layers=layers, tensors=tensors,
                           tie_word_embeddings=tie)
