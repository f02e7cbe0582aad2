"""Write the GreenBitAI-format test checkpoints under tests/fixtures/greenbit/.

Two tiny decoder-only models laid out as green-bit-llm's published checkpoints are: a
transformers ``config.json`` (written here by hand, no transformers needed), a
``quant_strategy.json`` in the real files' shape (per-block entries beside the block's
``accuracy`` / ``total_bits`` numbers and the ``"scale_groups:"`` key as newer files spell it),
the layers' tensors under GreenBitAI's names (qweight, scales, zeros, q_perm, channel_scale,
q_groups, bias, plus the unused buffers of FORMAT.md §2.2) and a small word-level tokenizer.

* ``llama-channel-mix``: Llama, channel-mix (every layer mixed, q_groups stored, one layer of a
  single width too), one ``model.safetensors``, separate ``lm_head``.
* ``qwen2-layer-mix``: Qwen2, layer-mix (uniform 4-bit and 2-bit layers, all-zero q_perm, one
  layer without q_perm and channel_scale), q/k/v_proj with bias, tied embeddings (no
  ``lm_head.weight``), two shards with ``model.safetensors.index.json``.

The layers are quantized by this library (``mbwq_ops.quantize_linear``) with the strategy
entries' widths and shares; the stored format is the one green-bit-llm loads.

    python scripts/make_greenbit_fixtures.py [--out tests/fixtures/greenbit]
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file
from torch import nn

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, LAYERS = 128, 256, 4, 2, 96, 2
PROJ = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN // 2),
        "self_attn.v_proj": (HIDDEN, HIDDEN // 2), "self_attn.o_proj": (HIDDEN, HIDDEN),
        "mlp.gate_proj": (HIDDEN, INTER), "mlp.up_proj": (HIDDEN, INTER),
        "mlp.down_proj": (INTER, HIDDEN)}


def config(model_type: str, tie: bool) -> dict:
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]
    c = {"architectures": [arch], "model_type": model_type, "hidden_size": HIDDEN,
         "intermediate_size": INTER, "num_attention_heads": HEADS,
         "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS, "vocab_size": VOCAB,
         "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "hidden_act": "silu", "tie_word_embeddings": tie, "torch_dtype": "float16",
         "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.44.0"}
    if model_type == "llama":
        c.update(attention_bias=False, mlp_bias=False)
    return c


def tokenizer_files(folder: str) -> None:
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": w, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": True}
                            for i, w in enumerate(words[:3])],
           "normalizer": None, "pre_tokenizer": {"type": "Whitespace"},
           "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)},
                     "unk_token": "<unk>"}}
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        json.dump(tok, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 128}, f)


def legacy_buffers(layer) -> dict:
    """The buffers bitorch-engine's layer also saves (FORMAT.md §2.2), with their shapes."""
    K, N = layer.in_channels, layer.out_channels
    gs = layer.group_size
    G = math.ceil(K / gs)
    dq = math.ceil(N / 32)
    return {"g_idx": torch.arange(K, dtype=torch.int32) // gs,
            "wf": torch.arange(0, 32, layer.w_bit, dtype=torch.int32).unsqueeze(0),
            "qstatistic": torch.zeros(G, dq, 32, dtype=torch.uint8),
            "qzeros_zeros": torch.zeros(G, dq, 1, dtype=torch.float16),
            "qzeros_scales": torch.ones(G, dq, 1, dtype=torch.float16),
            "qscales_zeros": torch.zeros(G, dq, 1, dtype=torch.float16),
            "qscales_scales": torch.ones(G, dq, 1, dtype=torch.float16)}


def quantized(K: int, N: int, entry: dict, bias: bool, gen: torch.Generator,
              channel_mix: bool):
    import mbwq_ops  # here, so that the GPTQ script can share tokenizer_files without it

    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        # per-input-feature magnitudes spread out, as in trained models
        lin.weight.copy_(torch.randn(N, K, generator=gen) * 0.05
                         * torch.exp(0.5 * torch.randn(K, generator=gen)))
        if bias:
            lin.bias.copy_(torch.randn(N, generator=gen) * 0.1)
    bits = entry["bits"]
    gs = {int(b): g for b, g in entry["group_size"].items()}
    if channel_mix:  # strategy-driven: q_groups stored even for a single width
        layer = mbwq_ops.quantize_linear(lin, bits=list(bits), bits_prop=entry["bits_prop"],
                                         group_size=gs)
    else:
        layer = mbwq_ops.quantize_linear(lin, bits=bits[0], group_size=gs[bits[0]])
    assert layer.use_mbw == channel_mix
    with torch.no_grad():  # a non-trivial channel_scale, as GreenBitAI's layers carry
        layer.channel_scale.copy_((1 + 0.1 * torch.randn(1, 1, K, generator=gen)).half())
    return layer


def write_model(folder: str, model_type: str, entries, channel_mix: bool, tie: bool,
                shards: int, legacy: bool, seed: int, scale_groups_in_block: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors, measurement = {}, {}
    tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.5).half()
    for i in range(LAYERS):
        block = f"model.layers.{i}"
        block_entries = {}
        for proj, (K, N) in PROJ.items():
            short = proj.split(".")[1]
            e = dict(entries(i, short))
            bias = model_type == "qwen2" and short in ("q_proj", "k_proj", "v_proj")
            layer = quantized(K, N, e, bias, gen, channel_mix)
            sd = {k: v for k, v in layer.state_dict().items()}
            if not channel_mix:  # layer-mix files store the default all-zero q_perm (identity)
                assert torch.equal(sd["q_perm"].long(), torch.arange(K))
                sd["q_perm"] = torch.zeros(K, dtype=torch.int16)
                if (i, short) == (1, "o_proj"):  # and a layer without q_perm / channel_scale
                    del sd["q_perm"], sd["channel_scale"]
            if legacy:
                sd.update(legacy_buffers(layer))
            for k, v in sd.items():
                tensors[f"{block}.{proj}.{k}"] = v.contiguous()
            if not scale_groups_in_block:
                e["scale_groups:"] = 32
            e["scale_bits"] = 4
            block_entries[short] = e
        block_entries["accuracy"] = round(0.9 + 0.01 * i, 4)
        block_entries["total_bits"] = int(sum(
            K * N * sum(b * p for b, p in zip(entries(i, s.split('.')[1])["bits"],
                                              entries(i, s.split('.')[1])["bits_prop"]))
            for s, (K, N) in PROJ.items()))
        if scale_groups_in_block:
            block_entries["scale_groups:"] = 32
        measurement[block] = block_entries
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{block}.{norm}.weight"] = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
    tensors["model.norm.weight"] = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
    if not tie:
        tensors["lm_head.weight"] = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05).half()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config(model_type, tie), f, indent=2)
    with open(os.path.join(folder, "quant_strategy.json"), "w") as f:
        json.dump({"measurement": measurement}, f, indent=1)
    tokenizer_files(folder)
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[s * per:(s + 1) * per]}
        save_file(part, os.path.join(folder, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)


def channel_mix_entries(i: int, proj: str) -> dict:
    if proj == "down_proj":  # K = 256: three widths, groups of 64 and 32 rows
        return {"bits": [4, 3, 2], "bits_prop": [0.25, 0.5, 0.25],
                "group_size": {"4": 64, "3": 32, "2": 32}}
    if proj == "v_proj" and i == 1:  # one width, still stored as a mixed layer
        return {"bits": [4], "bits_prop": [1.0], "group_size": {"4": 64}}
    if proj in ("gate_proj", "up_proj"):
        return {"bits": [8, 4, 3], "bits_prop": [0.25, 0.5, 0.25],
                "group_size": {"8": 32, "4": 32, "3": 32}}
    return {"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size": {"4": 32, "2": 32}}


def layer_mix_entries(i: int, proj: str) -> dict:
    if (i + len(proj)) % 2:
        return {"bits": [2], "bits_prop": [1.0], "group_size": {"2": 64}}
    return {"bits": [4], "bits_prop": [1.0], "group_size": {"4": 32}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                 "fixtures", "greenbit"))
    a = p.parse_args()
    write_model(os.path.join(a.out, "llama-channel-mix"), "llama", channel_mix_entries,
                channel_mix=True, tie=False, shards=1, legacy=True, seed=1,
                scale_groups_in_block=True)
    write_model(os.path.join(a.out, "qwen2-layer-mix"), "qwen2", layer_mix_entries,
                channel_mix=False, tie=True, shards=2, legacy=False, seed=2,
                scale_groups_in_block=False)
    print(f"wrote {os.path.abspath(a.out)}")


if __name__ == "__main__":
    main()
