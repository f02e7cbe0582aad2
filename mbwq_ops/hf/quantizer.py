"""``quant_method: "mbwq"`` for transformers >= 5: a quantization config and an ``HfQuantizer``.

``config.json`` of a saved model carries the per-layer layout (the record of
:func:`mbwq_ops.checkpoint.layer_record`: mode, in/out features, w_bit, group_size, bias,
groups ``[[bits, rows], ...]``)::

    "quantization_config": {"quant_method": "mbwq", "format_version": 1, "bpw": 3.0,
                            "layers": {"model.layers.0.mlp.down_proj": {"mode": "mixed", ...}}}

so that ``from_pretrained`` can put an ``MBWQLinear`` with buffers of the stored shapes in place
of each named ``nn.Linear`` *before* the weights load; the stored tensors then load unchanged
and keep their format dtypes whatever ``dtype=`` asks for (it applies to the other weights).
The layers are prepared (kernel tables built) after loading.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..accounting import bits_per_weight, set_module
from ..checkpoint import FORMAT_VERSION, layer_ctor, layer_records
from ..layer import STORED_DTYPES, MBWQLinear, prepare_model

__all__ = ["QUANT_METHOD", "MbwqConfig", "MbwqHfQuantizer", "attach", "dense_linear", "layer_records"]

QUANT_METHOD = "mbwq"
WHERE = "config.json quantization_config"  # how errors name the field


class MbwqConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of an MBWQ model: ``layers`` maps each quantized module's name
    to its record; ``bpw`` (informative) is the model's bits per weight."""

    def __init__(self, layers: Optional[Dict[str, Dict]] = None, bpw: Optional[float] = None,
                 format_version: int = FORMAT_VERSION, quant_method: str = QUANT_METHOD,
                 **kwargs) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{WHERE}.quant_method: expected {QUANT_METHOD!r}, got {quant_method!r}")
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(f"{WHERE}.format_version: {format_version!r} is newer than this "
                             f"library ({FORMAT_VERSION}); upgrade mbwq_ops")
        if not isinstance(layers, dict) or not layers:
            raise ValueError(f"{WHERE}.layers: expected a non-empty object of layer records, got "
                             f"{layers!r:.80}")
        for name, record in layers.items():
            ctor_of(name, record)  # validate now: a bad record is named before any model is built
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.bpw = bpw
        self.layers = dict(layers)
        # keys written by a newer version (e.g. "bpw_with_metadata") are kept, not interpreted
        for k, v in kwargs.items():
            setattr(self, k, v)


def ctor_of(name: str, record) -> Dict:
    """``MBWQLinear`` keyword arguments for the record of layer ``name``; ValueError names the
    field when the record is malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"{WHERE}.layers[{name!r}]: expected an object, got {record!r:.80}")
    try:
        return layer_ctor(record)
    except KeyError as e:
        raise ValueError(f"{WHERE}.layers[{name!r}]: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ValueError(f"{WHERE}.layers[{name!r}]: malformed record ({e})") from None


class MbwqHfQuantizer(HfQuantizer):
    """Loads and saves pre-quantized MBWQ models (quantize them with ``mbwq_ops.quantize_model``;
    quantizing on load is not offered)."""

    requires_calibration = True  # pre-quantized checkpoints only
    quantization_config: MbwqConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        # Runs on the meta-device skeleton: each recorded Linear becomes an MBWQLinear whose
        # buffers have the stored shapes and dtypes, so the loader neither reshapes nor casts them.
        for name, record in self.quantization_config.layers.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{WHERE}.layers: {type(model).__name__} has no module "
                                 f"{name!r}") from None
            layer = MBWQLinear(**ctor_of(name, record))
            check_replaces(name, old, layer)
            set_module(model, name, layer)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_loaded(model)
        return prepare_model(model)

    def _dequantize(self, model, dtype=None):
        # model.dequantize(): every MBWQ layer becomes the nn.Linear it stands for
        for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, MBWQLinear)]:
            set_module(model, name, dense_linear(layer, dtype or torch.float16))
        return model

    def get_state_dict_and_metadata(self, model):
        # save_pretrained asks this before it writes config.json: record the layers as they are
        # now (they may have been requantized or replaced since loading).
        self.quantization_config.layers = layer_records(model)
        self.quantization_config.bpw = bits_per_weight(model)
        model.config.quantization_config = self.quantization_config
        return None, {}

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def dense_linear(layer: MBWQLinear, dtype: torch.dtype) -> nn.Linear:
    """The ``nn.Linear`` (weights in ``dtype``) that computes what ``layer`` does:
    ``weight = (channel_scale * W)^T`` with the dequantized ``W [K, N]``."""
    W = layer.dequantized_weight(torch.float32) * layer.channel_scale.float().reshape(-1, 1)
    lin = nn.Linear(layer.in_channels, layer.out_channels, bias=layer.bias is not None,
                    device=W.device, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(W.t())
        if layer.bias is not None:
            lin.bias.copy_(layer.bias)
    return lin


def check_replaces(name: str, old: nn.Module, layer: MBWQLinear) -> None:
    if isinstance(old, MBWQLinear):
        return
    if not isinstance(old, nn.Linear):
        raise ValueError(f"{WHERE}.layers[{name!r}]: the model's {name} is a "
                         f"{type(old).__name__}, not an nn.Linear")
    if (old.in_features, old.out_features) != (layer.in_channels, layer.out_channels):
        raise ValueError(f"{WHERE}.layers[{name!r}]: the model's {name} is {old.in_features}->"
                         f"{old.out_features}, the record says {layer.in_channels}->"
                         f"{layer.out_channels}")


def check_loaded(model: nn.Module) -> None:
    # transformers fills a tensor the checkpoint lacks with uninitialised memory and only warns;
    # for a quantized layer that is garbage weights, so a missing stored tensor is an error.
    # (The loader marks each tensor it loads with _is_hf_initialized.)
    missing = [f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, MBWQLinear)
               for k in STORED_DTYPES if getattr(m, k, None) is not None
               and not getattr(getattr(m, k), "_is_hf_initialized", False)]
    if missing:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise ValueError(f"the checkpoint lacks stored tensors of MBWQ layers: {shown}")


def attach(model) -> None:
    """Record ``model``'s MBWQ layers as its ``quantization_config`` and give it the quantizer,
    so that ``save_pretrained`` writes a folder ``from_pretrained`` restores. Called by
    ``quantize_model`` on transformers models; call it after replacing layers by hand."""
    layers = layer_records(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MBWQLinear layer (quantize it first)")
    _untie_quantized_output(model)
    quantizer = MbwqHfQuantizer(MbwqConfig(layers=layers, bpw=bits_per_weight(model)),
                                pre_quantized=True)
    model.hf_quantizer = quantizer
    model.quantization_method = QUANT_METHOD
    model.config.quantization_config = quantizer.quantization_config
    model.config._is_quantized = True  # as from_pretrained leaves a quantized model
    prepare_model(model)


def _untie_quantized_output(model) -> None:
    # A quantized lm_head no longer shares the embedding's weight: a config that still says
    # "tied" would make from_pretrained tie a Linear that is not there.
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(out, MBWQLinear):
        for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            if getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


def register() -> None:
    """Make ``quant_method: "mbwq"`` known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MbwqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MbwqHfQuantizer)
