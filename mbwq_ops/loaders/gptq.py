"""GPTQ checkpoints (AutoGPTQ / GPTQModel) converted to MBWQ layers.

A module ``m`` of a GPTQ checkpoint stores (K inputs, N outputs, b bits, G groups)::

    m.qweight  int32 [K*b/32, N]   codes along K, the same little-endian bit string as MBWQ
                                   (FORMAT.md §4) for b = 2, 3, 4, 8, in original input order
    m.qzeros   int32 [G, N*b/32]   zero-points packed the same way, but along N
    m.scales   fp16  [G, N]
    m.g_idx    int32 [K]           group of every input feature (act-order: not k // group_size)
    m.bias     fp16  [N]           optional

and ``W[k, n] = scales[g, n] * (code[k, n] - z[g, n])`` with ``g = g_idx[k]``. In the "gptq"
(v1) checkpoint format the stored zero-point is ``z - 1`` (GPTQModel reads
``z = (stored + 1) mod 2^b``, which is what is done here); "gptq_v2" stores ``z``.

Conversion: the stored rows are the inputs sorted by group (a stable sort of ``g_idx``, so
``q_perm`` is that order), the codes are repacked in it, ``scales`` are copied and MBWQ's additive
zero is ``zeros = fp16(scale * z)`` (one rounding of the exact product). Then

    MBWQ:  fp16(code * scale - fp16(scale * z))        GPTQ:  fp16(scale * (code - z))

agree bit for bit whenever ``scale * z`` is exact in fp16 -- always for symmetric checkpoints,
where ``z = 2^(b-1)`` -- and otherwise differ by at most half an fp16 unit of ``scale * z``
before the final rounding. 2- and 4-bit layers whose groups are whole ``group_size`` runs become
uniform layers; 3- and 8-bit layers (and irregular ``g_idx`` groupings) become mixed layers of
one width.

Refused, with the reason: 5/6/7-bit (GPTQModel's planar "gptq_p" layout), other checkpoint
formats (marlin, bitblas, ...), ``pack_dtype`` other than int32, K or a group not a multiple of
32 rows, a quantized ``lm_head`` or embedding.
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch import Tensor

from .. import format as fmt
from ..reference import round_to_fp16
from . import common

QUANTIZE_CONFIG_FILE = "quantize_config.json"
GPTQ_WIDTHS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def matches(folder: str, config: dict) -> bool:
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc.get("quant_method") == "gptq"
    return os.path.isfile(os.path.join(folder, QUANTIZE_CONFIG_FILE))


def quantize_settings(folder: str, config: dict) -> dict:
    """bits, group_size, sym, desc_act, checkpoint_format of the folder, checked."""
    qc = config.get("quantization_config")
    where = os.path.join(folder, common.CONFIG_FILE) + ": quantization_config"
    if not isinstance(qc, dict):
        qc = common.read_json(folder, QUANTIZE_CONFIG_FILE)
        where = os.path.join(folder, QUANTIZE_CONFIG_FILE)
    bits = common.as_int(qc.get("bits"), f"{where}: bits")
    if bits in (5, 6, 7):
        raise ValueError(f"{where}: bits = {bits}: 5/6/7-bit GPTQ checkpoints use GPTQModel's "
                         f"planar 'gptq_p' layout, which MBWQ layers cannot hold")
    if bits not in GPTQ_WIDTHS:
        raise ValueError(f"{where}: bits must be one of {GPTQ_WIDTHS}, got {bits}")
    group_size = common.as_int(qc.get("group_size", 128), f"{where}: group_size")
    if group_size != -1 and (group_size <= 0 or group_size % fmt.BLOCK_ROWS):
        raise ValueError(f"{where}: group_size = {group_size}: MBWQ groups are whole blocks of "
                         f"{fmt.BLOCK_ROWS} rows (or -1, one group per column)")
    form = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if form not in FORMATS:
        raise ValueError(f"{where}: checkpoint_format {form!r} cannot be read; this reader "
                         f"takes {FORMATS} (re-save the model in the 'gptq' format)")
    pack = qc.get("pack_dtype", "int32")
    if pack not in ("int32", "torch.int32"):
        raise ValueError(f"{where}: pack_dtype {pack!r}: only int32 packing is read")
    if qc.get("lm_head"):
        raise ValueError(f"{where}: lm_head = true: a quantized lm_head is not converted (MBWQ "
                         f"layers here replace the decoder blocks' linear layers only)")
    for flag in ("sym", "desc_act"):
        if flag in qc and not isinstance(qc[flag], bool):
            raise ValueError(f"{where}: {flag} must be true or false, got {qc[flag]!r}")
    return {"bits": bits, "group_size": group_size, "sym": qc.get("sym", True),
            "desc_act": qc.get("desc_act", False), "checkpoint_format": form,
            "dynamic": bool(qc.get("dynamic"))}


def read(folder: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    from . import QuantizedCheckpoint

    config = common.read_json(folder, common.CONFIG_FILE)
    settings = quantize_settings(folder, config)

    def convert(name: str, stored: Dict[str, Tensor]) -> dict:
        if name.split(".")[-1] in ("lm_head", "embed_tokens"):
            raise ValueError(f"{name}: a quantized {name.split('.')[-1]} is not converted "
                             f"(only linear layers of the decoder blocks are)")
        missing = [k for k in ("qweight", "qzeros", "scales") if k not in stored]
        if missing:
            raise ValueError(f"{name}: tensors {missing} are missing from the checkpoint")
        return convert_layer(name, stored, settings)

    with common.Shards(folder, progress=progress, desc="GPTQ checkpoint") as shards:
        layers, tensors = common.read_modules(
            shards, "qweight", ("qweight", "qzeros", "scales", "g_idx", "bias"), convert,
            dtype=dtype, none_found="no quantized layer", not_part_of="a GPTQ layer")
    return QuantizedCheckpoint(
        source="gptq", config=config, layers=layers, tensors=tensors,
        tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                            "lm_head.weight" not in tensors)),
        info=dict(settings))


def convert_layer(name: str, stored: Dict[str, Tensor], settings: dict) -> dict:
    """One GPTQ module's tensors -> a ``QuantizedCheckpoint.layers`` entry."""
    qweight, qzeros, scales = stored["qweight"], stored["qzeros"], stored["scales"]
    common.check_dtype(name, "qweight", qweight, torch.int32)
    common.check_dtype(name, "qzeros", qzeros, torch.int32)
    common.check_dtype(name, "scales", scales, torch.float16)
    if qweight.dim() != 2 or scales.dim() != 2 or qzeros.dim() != 2:
        raise ValueError(f"{name}: qweight, qzeros and scales must be 2-D, got "
                         f"{list(qweight.shape)}, {list(qzeros.shape)}, {list(scales.shape)}")
    P, N = qweight.shape
    G = scales.shape[0]
    g_idx = stored.get("g_idx")
    if g_idx is not None:
        K = g_idx.numel()
        if P * 32 % K:
            raise ValueError(f"{name}: tensor qweight has {P} packed rows, which is no whole "
                             f"number of bits for the {K} inputs of g_idx")
        bits = P * 32 // K
    else:  # old checkpoints without g_idx: consecutive groups
        bits = settings["bits"]
        K = P * 32 // bits
    if bits != settings["bits"] and not settings["dynamic"]:
        raise ValueError(f"{name}: tensor qweight has shape {list(qweight.shape)} in the "
                         f"checkpoint, expected [{K * settings['bits'] // 32}, {N}] "
                         f"({K} inputs at {settings['bits']} bits)")
    if bits not in GPTQ_WIDTHS:
        raise ValueError(f"{name}: {bits}-bit codes (from qweight {list(qweight.shape)} and "
                         f"{K} inputs) cannot be converted; GPTQ widths are {GPTQ_WIDTHS}")
    if K % fmt.BLOCK_ROWS:
        raise ValueError(f"{name}: {K} inputs is not a multiple of {fmt.BLOCK_ROWS}, which "
                         f"MBWQ layers need")
    gs = settings["group_size"] if settings["group_size"] != -1 else K
    if g_idx is None:
        g_idx = torch.arange(K) // gs
    g_idx = g_idx.to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= G):
        raise ValueError(f"{name}: tensor g_idx has values in [{int(g_idx.min())}, "
                         f"{int(g_idx.max())}], but scales has {G} groups")
    common.check_shape(name, "scales", scales, [G, N])
    Nz = -(-N * bits // 32)
    common.check_shape(name, "qzeros", qzeros, [G, Nz], f"{N} zero-points at {bits} bits")
    if N * bits % 32:
        raise ValueError(f"{name}: {N} outputs at {bits} bits do not fill whole qzeros words")

    # zero-points: unpack along N (the MBWQ bit string, read across a row of words)
    z = fmt.unpack_codes(qzeros.t().contiguous(), bits, rows=N).t()  # [G, N]
    if settings["checkpoint_format"] == "gptq":  # v1 stores z - 1
        z = (z + 1) & ((1 << bits) - 1)

    order = torch.argsort(g_idx, stable=True)  # stored row k = input feature order[k]
    counts = torch.bincount(g_idx, minlength=G)
    used = counts.nonzero().flatten()  # groups no input belongs to are dropped
    rows = counts[used].tolist()
    scales_u = scales[used].contiguous()
    zeros = round_to_fp16(scales_u.double() * z[used].double())
    if torch.equal(order, torch.arange(K)):  # no act-order: the words are MBWQ's already
        qweight_mbwq = qweight
    else:  # the same bit string, rows in group order
        qweight_mbwq = common.pack_rows(common.unpack_rows(qweight, bits)[order], bits)
    bias = stored.get("bias")
    state = {"qweight": qweight_mbwq, "scales": scales_u, "zeros": zeros,
             "q_perm": fmt.as_int16(order), "channel_scale": torch.ones(1, 1, K, dtype=torch.float16)}
    if bias is not None:
        if not bias.is_floating_point():
            raise ValueError(f"{name}: tensor bias is {bias.dtype}, expected a float tensor")
        state["bias"] = bias.to(torch.float16)
    uniform = (bits in fmt.UNIFORM_WIDTHS and all(r == gs for r in rows[:-1])
               and 0 < rows[-1] <= gs)
    if uniform:
        try:
            fmt.uniform_groups(K, bits, gs)
        except ValueError:
            uniform = False
    if uniform:
        ctor = common.uniform_ctor(K, N, bits, gs, bias is not None)
    else:
        bad = [(int(g), r) for g, r in zip(used.tolist(), rows) if r % fmt.BLOCK_ROWS]
        if bad:
            g, r = bad[0]
            raise ValueError(f"{name}: g_idx puts {r} inputs in group {g}; MBWQ groups are "
                             f"whole blocks of {fmt.BLOCK_ROWS} rows")
        groups = fmt.mixed_groups([bits] * len(rows), rows)
        state["q_groups"] = fmt.q_groups_tensor(groups)
        ctor = common.mixed_ctor(K, N, groups, bias is not None)
    return common.entry(name, ctor, state)
