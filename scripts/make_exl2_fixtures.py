"""Write the EXL2 test checkpoint under tests/fixtures/exl2/.

exllamav2's quantizer and kernels need CUDA, so this script writes the layout its loader reads
(exllamav2 0.3.2: conversion/adaptivegptq.py ``pack``, ext.py ``make_q_matrix``,
cuda/q_matrix.cu and quant/qdq_*.cuh), quantizing a tiny random Llama by rounding to nearest:

* ``config.json`` with ``"quantization_config": {"quant_method": "exl2", ...}`` as
  exllamav2's compile step writes it;
* ``output-00001-of-00002.safetensors`` / ``output-00002-of-00002.safetensors`` (no index, as
  exllamav2 shards);
* per layer ``q_weight`` (groups sorted 8 -> 2, little-endian bit strings), ``q_groups``,
  ``q_invperm`` (an importance order), ``q_scale`` (4-bit, 8 columns per word), ``q_scale_max``
  and ``bias`` (the attention projections: ``attention_bias`` is on);
* a quantized ``lm_head`` (6 bits, ``head_bits``) whose columns are padded from the vocabulary of
  80 to 96, as exllamav2 pads to a multiple of 32;
* one layer with small weights, so that ``q_scale_max / 256`` falls below fp16's normal range
  and rounds.

    python scripts/make_exl2_fixtures.py [--out tests/fixtures/exl2]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))
from make_greenbit_fixtures import tokenizer_files  # noqa: E402

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 256, 2, 4, 2, 80
# (bits, rows) per group, widths sorted 8 -> 2 as exllamav2 stores them
SPECS = {
    "self_attn.q_proj": [(6, 32), (4, 64), (3, 32)],
    "self_attn.k_proj": [(8, 32), (4, 32), (3, 32), (3, 32)],
    "self_attn.v_proj": [(5, 32), (4, 96)],
    "self_attn.o_proj": [(4, 32), (3, 64), (2, 32)],
    "mlp.gate_proj": [(4, 64), (3, 64)],
    "mlp.up_proj": [(3, 128)],
    "mlp.down_proj": [(5, 64), (4, 128), (2, 64)],
}
SHAPES = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN // 2),
          "self_attn.v_proj": (HIDDEN, HIDDEN // 2), "self_attn.o_proj": (HIDDEN, HIDDEN),
          "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
          "mlp.down_proj": (INTER, HIDDEN)}
HEAD = [(6, 32)] * 4  # lm_head: head_bits = 6, K = HIDDEN


def to_int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [rows, N] (rows a multiple of 32) into one little-endian bit string per column."""
    rows, N = codes.shape
    string = torch.stack([(codes >> i) & 1 for i in range(bits)], 1).reshape(rows * bits, N)
    words = string.reshape(-1, 32, N)
    return to_int32(sum(words[:, i] << i for i in range(32)))


def fp16_scale(qs: torch.Tensor, q_scale_max: torch.Tensor) -> torch.Tensor:
    """exllamav2's scale, in its own fp16 steps (torch fp16 products round once)."""
    top = q_scale_max * (1 / 256)  # fp16 tensor op, as ext.make_q_matrix
    return ((qs + 1) ** 2).to(torch.float16) * top.unsqueeze(1)


def quantize(W: torch.Tensor, spec, n_pad: int, gen: torch.Generator) -> dict:
    """Round-to-nearest EXL2 of ``W [N, K]`` (nn.Linear layout) with groups ``spec``."""
    N, K = W.shape
    Wt = torch.zeros(K, n_pad, dtype=torch.float64)
    Wt[:, :N] = W.t().double()
    importance = Wt.pow(2).sum(1) * (1 + 0.1 * torch.rand(K, generator=gen, dtype=torch.float64))
    perm = torch.argsort(importance, descending=True)  # stored row k = input perm[k]
    Ws = Wt[perm]
    words, scale_codes, maxima, q_groups, first, start = [], [], [], [], 0, 0
    for bits, rows in spec:
        block = Ws[first:first + rows]
        mid = 1 << (bits - 1)
        target = block.abs().amax(0).clamp_min(1e-8) / (mid - 0.5)  # per column
        q_max = target.max().half()
        qs = torch.ceil(torch.sqrt(target / (q_max.double() / 256))).sub(1).clamp(0, 15).long()
        scale = fp16_scale(qs, q_max.reshape(1))[0].double()
        codes = torch.clamp(torch.round(block / scale) + mid, 0, 2 * mid - 1).long()
        words.append(pack_rows(codes, bits))
        scale_codes.append(qs)
        maxima.append(q_max)
        q_groups += [bits, start]
        first += rows
        start += rows * bits // 32
    assert first == K, (first, K)
    qs = torch.stack(scale_codes)  # [G, n_pad]
    q_scale = to_int32(sum(qs.reshape(len(spec), -1, 8)[:, :, i] << (4 * i) for i in range(8)))
    return {"q_weight": torch.cat(words), "q_groups": torch.tensor(q_groups, dtype=torch.int16),
            "q_invperm": torch.argsort(perm).to(torch.int32), "q_scale": q_scale,
            "q_scale_max": torch.stack(maxima).to(torch.float16)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                 "fixtures", "exl2"))
    a = p.parse_args()
    folder = os.path.join(a.out, "llama-exl2")
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(5)
    t = {"model.embed_tokens.weight": (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).half(),
         "model.norm.weight": (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()}
    for i in range(LAYERS):
        for proj, (K, N) in SHAPES.items():
            W = torch.randn(N, K, generator=gen) * 0.05 * torch.exp(0.5 * torch.randn(K, generator=gen))
            if (i, proj) == (1, "self_attn.o_proj"):
                W *= 0.002  # q_scale_max / 256 below 2^-14: a subnormal fp16 that rounds
            for k, v in quantize(W, SPECS[proj], N, gen).items():
                t[f"model.layers.{i}.{proj}.{k}"] = v
            if proj.startswith("self_attn"):
                t[f"model.layers.{i}.{proj}.bias"] = (torch.randn(N, generator=gen) * 0.1).half()
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
    pad = math.ceil(VOCAB / 32) * 32
    for k, v in quantize(torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05, HEAD, pad, gen).items():
        t[f"lm_head.{k}"] = v
    keys = sorted(t)
    half = len(keys) // 2
    for n, part in enumerate((keys[:half], keys[half:])):
        save_file({k: t[k].contiguous() for k in part},
                  os.path.join(folder, f"output-{n + 1:05}-of-00002.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "intermediate_size": INTER, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "hidden_act": "silu", "attention_bias": True, "tie_word_embeddings": False,
              "torch_dtype": "float16", "bos_token_id": 1, "eos_token_id": 2,
              "quantization_config": {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0,
                                      "head_bits": 6, "calibration": {
                                          "rows": 115, "length": 2048, "dataset": "(default)"}}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=4)
    tokenizer_files(folder)
    print(f"wrote {os.path.abspath(folder)}")


if __name__ == "__main__":
    main()
