"""Save and load quantized models: one safetensors file plus a JSON config.

A checkpoint is a directory::

    model.safetensors   the model's whole state_dict; MBWQ layers in the stored format
                        (FORMAT.md §2: qweight, scales, zeros, q_perm, q_groups, channel_scale, bias)
    mbwq_config.json    {"quant_method": "mbwq", "format_version": 1, "bpw": ..., "layers": {name:
                        {mode, w_bit, group_size, groups: [[bits, rows], ...], ...}},
                        "aliases": {...}, "metadata": {...}}

Loading needs the model's structure: a skeleton module (any weights, e.g. freshly initialised)
or a zero-argument factory. Every layer named in the config is replaced by an ``MBWQLinear`` of
the recorded shape before the tensors are loaded, so the round trip is bit-exact.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, Optional, Union

from torch import nn

from .layer import MBWQLinear, prepare_model
from .accounting import bits_per_weight, layer_bits, set_module

__all__ = ["save_quantized", "load_quantized", "read_config", "layer_ctor", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "mbwq_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


def _layer_config(layer: MBWQLinear) -> Dict:
    info = layer_bits(layer)
    return {
        "mode": "mixed" if layer.use_mbw else "uniform",
        "in_features": layer.in_channels,
        "out_features": layer.out_channels,
        "w_bit": layer.w_bit,
        "group_size": layer.group_size,
        "bias": layer.bias is not None,
        "groups": info["groups"],
        "widths": {str(b): r for b, r in sorted(info["rows_per_width"].items(), reverse=True)},
        "bpw": info["bpw"],
        "bytes": info["bytes"],
    }


def layer_ctor(lc: Dict) -> Dict:
    """``MBWQLinear`` keyword arguments for a layer record of :func:`_layer_config`: buffers of
    the recorded shapes, so that the stored tensors load into them unchanged."""
    mixed = lc["mode"] == "mixed"
    G = len(lc["groups"])
    R = sum(r * b // 32 for b, r in lc["groups"])
    return dict(in_channels=lc["in_features"], out_channels=lc["out_features"],
                w_bit=lc["w_bit"], group_size=lc["group_size"], use_mbw=mixed,
                disable_bias=not lc["bias"], groups=G if mixed else 64,
                rows_packed=R if mixed else 64)


def save_quantized(model: nn.Module, path: Union[str, os.PathLike],
                   metadata: Optional[Dict] = None) -> str:
    """Write ``model`` (with its MBWQ layers) to the directory ``path``; returns the path.

    ``metadata`` (JSON-serialisable) is stored in the config, e.g. what is needed to rebuild the
    skeleton. Tensors shared between modules (tied embeddings) are stored once."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    layers = {n: _layer_config(m) for n, m in model.named_modules() if isinstance(m, MBWQLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no MBWQLinear layer (quantize it first)")
    tensors, aliases, seen = {}, {}, {}
    for k, t in model.state_dict().items():
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = t.detach().to("cpu").contiguous()
    config = {
        "quant_method": "mbwq",
        "format_version": FORMAT_VERSION,
        "bpw": bits_per_weight(model),
        "bpw_with_metadata": bits_per_weight(model, include_metadata=True),
        "layers": layers,
        "aliases": aliases,
        "metadata": metadata or {},
    }
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"quant_method": "mbwq"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=1)
    return str(path)


def read_config(path: Union[str, os.PathLike]) -> Dict:
    """The JSON config of a checkpoint directory (raises if it is not an MBWQ checkpoint)."""
    with open(os.path.join(path, CONFIG_NAME)) as f:
        cfg = json.load(f)
    if cfg.get("quant_method") != "mbwq":
        raise ValueError(f"{path}: quant_method is {cfg.get('quant_method')!r}, expected 'mbwq'")
    if cfg.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {cfg['format_version']} is newer than this "
                         f"library ({FORMAT_VERSION})")
    return cfg


def load_quantized(model_skeleton_or_factory: Union[nn.Module, Callable[[], nn.Module]],
                   path: Union[str, os.PathLike], device=None, strict: bool = True) -> nn.Module:
    """Restore a model saved by :func:`save_quantized` into ``model_skeleton_or_factory`` (a
    module with the original structure -- its ``nn.Linear`` layers are replaced -- or a callable
    returning one). Layers are prepared and moved to ``device`` (default: CPU)."""
    from safetensors.torch import load_file

    cfg = read_config(path)
    model = (model_skeleton_or_factory() if not isinstance(model_skeleton_or_factory, nn.Module)
             and callable(model_skeleton_or_factory) else model_skeleton_or_factory)
    if any(p.device.type == "meta" for p in model.parameters()):
        model = model.to_empty(device="cpu")
    for name, lc in cfg["layers"].items():
        layer = MBWQLinear(**layer_ctor(lc))
        K, N = layer.in_channels, layer.out_channels
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"load_quantized: the skeleton has no module {name!r}") from e
        if isinstance(old, nn.Linear) and (old.in_features, old.out_features) != (K, N):
            raise ValueError(f"load_quantized: {name} is {old.in_features}->{old.out_features} in "
                             f"the skeleton but {K}->{N} in the checkpoint")
        set_module(model, name, layer)
    sd = load_file(os.path.join(path, WEIGHTS_NAME))
    for alias, target in cfg.get("aliases", {}).items():
        sd[alias] = sd[target]
    # assign=True: parameters take the checkpoint's dtype (a float32 skeleton restores a bf16
    # model exactly) and tied tensors stay tied.
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if strict and (missing or unexpected):
        raise ValueError(f"load_quantized: missing keys {missing}, unexpected keys {unexpected}")
    for alias, target in cfg.get("aliases", {}).items():  # re-tie shared parameters
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        t_param = getattr(model.get_submodule(t_mod), t_name, None)
        if isinstance(t_param, nn.Parameter):
            setattr(model.get_submodule(a_mod), a_name, t_param)
    if device is not None:
        model.to(device)
    try:
        return prepare_model(model)
    except ValueError as e:
        raise ValueError(f"load_quantized: {e}") from e

