"""One GEMM for layers that read the same input: a block's q/k/v projections, its gate/up pair.

Layers whose input features are stored the same way -- the same stored row order (``q_perm``),
the same groups of rows with the same widths, the same ``channel_scale`` -- differ only in their
output columns, so side by side they are one layer::

    x @ [W_q | W_k | W_v]      qweight, scales, zeros (and bias) concatenated along N

One call then reads the same bytes through one chain of launches instead of three, and the
wider layer keeps more of the GPU busy: at M = 1 the fixed cost of a call (x gather, GEMM,
split reduction) is paid once. Each output column is computed as it is alone (same codes,
scales and zeros, same x), so the fused layer's columns equal the separate layers' results on
the CPU bit for bit, and on CUDA up to the order of fp32 additions of a different K split.

Who qualifies: uniform layers of one width and group size with the same ``q_perm`` (GPTQ
checkpoints with or without act-order: the order comes from the input's Hessian, which layers of
one input share; ``quantize_model(bits=...)`` too), and mixed layers with identical groups and
``q_perm``. :func:`fusion_problem` says why layers do not.

The fused layer is an ordinary stored-format :class:`MBWQLinear` (its ``state_dict`` is the
format); a model that swaps its projections for one (``apps.tiny_llama.fuse_projections``)
saves it under the new module name.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import format as fmt
from .layer import MBWQLinear

__all__ = ["fusion_problem", "fuse_linears", "output_sizes"]


def _layout(layer: MBWQLinear):
    """What the stored input side of a layer is: groups (width, rows, packed rows), row order."""
    groups = [(g.bits, g.rows, g.packed_rows) for g in layer.stored_groups()]
    perm = fmt.perm_index(layer.q_perm, layer.in_channels, layer.use_mbw)
    return groups, perm


def fusion_problem(layers: Sequence[MBWQLinear]) -> Optional[str]:
    """None when :func:`fuse_linears` can fuse ``layers``, else why not (one line)."""
    if len(layers) < 2:
        return f"fusing needs at least two layers, got {len(layers)}"
    for i, layer in enumerate(layers):
        if not isinstance(layer, MBWQLinear):
            return f"layer {i} is a {type(layer).__name__}, not an MBWQLinear"
    first = layers[0]
    groups0, perm0 = _layout(first)
    for i, layer in enumerate(layers[1:], 1):
        if layer.in_channels != first.in_channels:
            return (f"layer {i} has {layer.in_channels} input features, layer 0 "
                    f"{first.in_channels}")
        if layer.use_mbw != first.use_mbw:
            return f"layer {i} is {'mixed' if layer.use_mbw else 'uniform'}, layer 0 is not"
        groups, perm = _layout(layer)
        if groups != groups0:
            return f"layer {i} stores its input rows in other groups (widths or sizes) than layer 0"
        if not torch.equal(perm, perm0):
            return f"layer {i} stores its input features in another order (q_perm) than layer 0"
        if not torch.equal(layer.channel_scale.reshape(-1).cpu(),
                           first.channel_scale.reshape(-1).cpu()):
            return f"layer {i} has another channel_scale than layer 0"
        if (layer.bias is None) != (first.bias is None):
            return f"layer {i} {'has no' if layer.bias is None else 'has a'} bias, layer 0 does not"
        if layer.qweight.device != first.qweight.device:
            return f"layer {i} is on {layer.qweight.device}, layer 0 on {first.qweight.device}"
    return None


def fuse_linears(layers: Sequence[MBWQLinear]) -> MBWQLinear:
    """One prepared :class:`MBWQLinear` computing ``torch.cat([l(x) for l in layers], -1)``.

    Its output columns are the layers' in order; split them with
    ``y.split(output_sizes(layers), -1)``. Raises ValueError (the reason from
    :func:`fusion_problem`) when the layers' input sides differ."""
    problem = fusion_problem(layers)
    if problem is not None:
        raise ValueError(f"fuse_linears: {problem}")
    first = layers[0]
    cat = {name: torch.cat([getattr(layer, name) for layer in layers], dim=-1)
           for name in ("qweight", "scales", "zeros") + (("bias",) if first.bias is not None else ())}
    state = dict(cat, q_perm=first.q_perm, channel_scale=first.channel_scale)
    if first.use_mbw:
        state["q_groups"] = first.q_groups
    fused = MBWQLinear.from_stored({k: v.detach() for k, v in state.items()}, first.in_channels,
                                   use_mbw=first.use_mbw, w_bit=first.w_bit,
                                   group_size=first.group_size)
    fused.prepare_params()
    return fused


def output_sizes(layers: Sequence[MBWQLinear]) -> List[int]:
    """The split of a fused layer's output back into the layers' outputs."""
    return [layer.out_channels for layer in layers]
