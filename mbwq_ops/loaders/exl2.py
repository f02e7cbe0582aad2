"""EXL2 checkpoints (exllamav2) converted to MBWQ mixed layers.

A folder holds ``config.json`` (with ``"quantization_config": {"quant_method": "exl2",
"version", "bits", "head_bits", ...}`` when the model was compiled in full) and
``output.safetensors`` or ``output-00001-of-0000N.safetensors`` (no index). A module ``m``
(K inputs, N outputs, G groups) stores::

    m.q_weight     int32 [R, N]    codes, MBWQ's packing exactly (FORMAT.md §4): groups of one
                                   width each, sorted 8, 6, 5, 4, 3, 2
    m.q_groups     int16 [2G]      (bits, first packed row) per group, as MBWQ's q_groups
    m.q_invperm    int32 [K]       input feature p sits in stored row q_invperm[p]
    m.q_scale      int32 [G, N/8]  4-bit scale codes, column n at bits 4*(n % 8) of word n / 8
    m.q_scale_max  fp16  [G]
    m.bias         fp16  [N]       optional

and exllamav2 dequantizes (q_matrix.cu, qdq_util.cuh) with fp16 operations::

    max   = fp16(q_scale_max / 256)                      (when the matrix is made, in torch)
    scale = fp16(fp16((q_scale + 1)^2) * max)            (dq_scale: an exact integer, one rounding)
    W     = fp16((code - 2^(b-1)) * scale)               (dq_ns: an exact integer, one rounding)

Conversion: ``q_weight`` and ``q_groups`` are copied, ``q_perm = argsort(q_invperm)``, ``scales``
are the fp16 values above and ``zeros = scale * 2^(b-1)``, which is exact in fp16 (a power of
two), so MBWQ's ``fp16(code * scale - zero)`` is exllamav2's weight bit for bit. exllamav2
quantizes ``lm_head`` too (``head_bits``): it becomes an MBWQ layer named ``lm_head``, its
columns cut back to ``vocab_size`` when the quantizer padded them to a multiple of 32.
"""
from __future__ import annotations

import glob
import os
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import format as fmt
from ..reference import round_to_fp16
from . import common

PATTERN = "output*.safetensors"
KEYS = ("q_weight", "q_groups", "q_invperm", "q_perm", "q_scale", "q_scale_max", "bias")


def matches(folder: str, config: dict) -> bool:
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc.get("quant_method") == "exl2"
    return bool(glob.glob(os.path.join(folder, PATTERN)))


def read(folder: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    from . import QuantizedCheckpoint

    config = common.read_json(folder, common.CONFIG_FILE)
    qc = config.get("quantization_config") or {}
    patterns = (PATTERN,) if glob.glob(os.path.join(folder, PATTERN)) else ("*.safetensors",)

    def convert(name: str, stored: Dict[str, Tensor]) -> dict:
        n_out = config.get("vocab_size") if name.split(".")[-1] == "lm_head" else None
        return convert_layer(name, stored, out_features=n_out)

    with common.Shards(folder, patterns, progress=progress, desc="EXL2 checkpoint") as shards:
        layers, tensors = common.read_modules(shards, "q_weight", KEYS, convert, dtype=dtype,
                                              none_found="no EXL2 layer",
                                              not_part_of="an EXL2 layer")
    # exllamav2 quantizes lm_head as a layer of its own; only without one is it tied
    tie = "lm_head" not in layers and "lm_head.weight" not in tensors
    return QuantizedCheckpoint(
        source="exl2", config=config, layers=layers, tensors=tensors, tie_word_embeddings=tie,
        info={k: qc[k] for k in ("version", "bits", "head_bits") if k in qc})


def exl2_scales(q_scale: Tensor, q_scale_max: Tensor, N: int) -> Tensor:
    """exllamav2's fp16 scales ``[G, N]`` from the packed 4-bit codes and the group maxima."""
    qs = fmt.unpack_codes(q_scale.t().contiguous(), 4, rows=N).t().double()  # [G, N]
    top = round_to_fp16(q_scale_max.double() / 256).double()  # may be subnormal: rounds
    return round_to_fp16((qs + 1) ** 2 * top.unsqueeze(1))


def convert_layer(name: str, stored: Dict[str, Tensor], out_features: Optional[int] = None
                  ) -> dict:
    """One EXL2 module's tensors -> a ``QuantizedCheckpoint.layers`` entry."""
    for k in ("q_weight", "q_groups", "q_scale", "q_scale_max"):
        if k not in stored:
            raise ValueError(f"{name}: tensor {k} is missing from the checkpoint")
    if "q_invperm" not in stored and "q_perm" not in stored:
        raise ValueError(f"{name}: tensor q_invperm is missing from the checkpoint")
    q_weight, q_scale, q_scale_max = stored["q_weight"], stored["q_scale"], stored["q_scale_max"]
    common.check_dtype(name, "q_weight", q_weight, torch.int32)
    common.check_dtype(name, "q_scale", q_scale, torch.int32)
    common.check_dtype(name, "q_scale_max", q_scale_max, torch.float16)
    if q_weight.dim() != 2:
        raise ValueError(f"{name}: tensor q_weight must be 2-D, got shape {list(q_weight.shape)}")
    R, N = q_weight.shape
    if "q_invperm" in stored:
        q_perm = torch.argsort(stored["q_invperm"].to(torch.int64) & 0xFFFF)
    else:
        q_perm = stored["q_perm"].to(torch.int64) & 0xFFFF
    K = q_perm.numel()
    q_groups = stored["q_groups"]
    if q_groups.dtype != torch.int16:
        q_groups = fmt.as_int16(q_groups)
    try:
        groups = fmt.parse_q_groups(q_groups, K, R)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    G = len(groups)
    common.check_shape(name, "q_scale", q_scale, [G, -(-N // 8)], f"{G} groups of 4-bit scales")
    common.check_shape(name, "q_scale_max", q_scale_max, [G])
    scales = exl2_scales(q_scale, q_scale_max, N)
    mid = torch.tensor([float(1 << (g.bits - 1)) for g in groups], dtype=torch.float64)
    zeros = round_to_fp16(scales.double() * mid.unsqueeze(1))
    if not bool(torch.isfinite(zeros).all()):
        g = int((~torch.isfinite(zeros)).any(1).nonzero()[0])
        raise ValueError(f"{name}: group {g}'s scale times its mid-point {int(mid[g])} overflows "
                         f"fp16 (scales up to {float(scales[g].abs().max())})")
    qweight = q_weight
    bias = stored.get("bias")
    if out_features is not None and out_features < N:  # columns padded to a multiple of 32
        qweight, scales, zeros = (t[:, :out_features] for t in (q_weight, scales, zeros))
        bias = None if bias is None else bias[:out_features]
        N = out_features
    state = {"qweight": qweight, "scales": scales, "zeros": zeros, "q_perm": fmt.as_int16(q_perm),
             "q_groups": q_groups, "channel_scale": torch.ones(1, 1, K, dtype=torch.float16)}
    if bias is not None:
        state["bias"] = bias.to(torch.float16)
    return common.entry(name, common.mixed_ctor(K, N, groups, bias is not None), state)
