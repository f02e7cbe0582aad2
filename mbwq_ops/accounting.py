"""What a quantized model stores, counted: bits per weight and per-layer size facts.

Bit budget: every stored bit of ``qweight``, ``scales`` and ``zeros`` divided by the layer's
``K * N`` weights. ``q_perm``, ``q_groups``, ``channel_scale`` and ``bias`` are per-layer metadata
and are reported separately (``bits_per_weight(..., include_metadata=True)``). Used by the
quantizer (budgets), by checkpoints (their config) and by the applications (reports); it needs
only the layer, so loading a checkpoint never imports the quantizer.
"""
from __future__ import annotations

from typing import Dict

from torch import nn

from .layer import MBWQLinear


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) of ``model`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def layer_bits(layer: MBWQLinear) -> Dict:
    """Stored-size facts of one layer: bits of codes / scales / zeros / metadata, bpw, widths."""
    K, N = layer.in_channels, layer.out_channels
    groups = layer.stored_groups()
    code = layer.qweight.numel() * 32
    sz = (layer.scales.numel() + layer.zeros.numel()) * 16
    meta = layer.q_perm.numel() * 16 + layer.channel_scale.numel() * 16
    if layer.use_mbw:
        meta += layer.q_groups.numel() * 16
    if layer.bias is not None:
        meta += layer.bias.numel() * 16
    rows: Dict[int, int] = {}
    gsz: Dict[int, int] = {}
    for g in groups:
        rows[g.bits] = rows.get(g.bits, 0) + g.rows
        gsz[g.bits] = max(gsz.get(g.bits, 0), g.rows)
    return {"in_features": K, "out_features": N, "use_mbw": layer.use_mbw,
            "code_bits": code, "scale_zero_bits": sz, "metadata_bits": meta,
            "weights": K * N, "bpw": (code + sz) / (K * N),
            "bpw_with_metadata": (code + sz + meta) / (K * N),
            "groups": [[g.bits, g.rows] for g in groups],
            "rows_per_width": rows, "group_size_per_width": gsz,
            "bytes": (code + sz + meta) // 8}


def bits_per_weight(model_or_layer: nn.Module, include_metadata: bool = False) -> float:
    """Bits per quantized weight: every stored bit of ``qweight``, ``scales`` and ``zeros``
    (plus ``q_perm``, ``q_groups``, ``channel_scale`` and ``bias`` with ``include_metadata``)
    over all MBWQ layers, divided by their number of weights."""
    layers = [model_or_layer] if isinstance(model_or_layer, MBWQLinear) else [
        m for m in model_or_layer.modules() if isinstance(m, MBWQLinear)]
    if not layers:
        raise ValueError("no MBWQLinear layer found")
    bits = weights = 0
    for m in layers:
        info = layer_bits(m)
        bits += info["code_bits"] + info["scale_zero_bits"]
        if include_metadata:
            bits += info["metadata_bits"]
        weights += info["weights"]
    return bits / weights
