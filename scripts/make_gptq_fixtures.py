"""Write the GPTQ test checkpoints under tests/fixtures/gptq/ with GPTQModel itself.

Run in its own virtualenv (CI never needs it)::

    python3 -m venv /work/venv-gptq
    /work/venv-gptq/bin/pip install torch==2.13.0          # CPU build
    /work/venv-gptq/bin/pip install gptqmodel==7.6.0        # 7.7 needs a newer torch
    GPTQMODEL_CPU_WORKERS=2 /work/venv-gptq/bin/python scripts/make_gptq_fixtures.py

A tiny random Llama (2 layers, hidden 256) is quantized on the CPU with a few random
calibration sequences, once per setting below, and saved in GPTQModel's default checkpoint
format ("gptq", i.e. v1: stored zero-point = z - 1). Beside each checkpoint the script stores
what GPTQModel itself computes from it, so the tests can compare without GPTQModel:
``<name>.reference.safetensors`` (beside the folder, so that it is no part of the checkpoint)
with

* ``<layer>.sha256`` -- no tensor, a uint8 digest of ``dequantize_weight()``'s fp16 bytes for
  every quantized layer (``[N, K]`` row-major, i.e. ``nn.Linear.weight`` layout);
* ``<layer>.weight`` -- the fp16 ``dequantize_weight()`` result itself for two layers;
* ``input_ids`` and ``logits`` -- GPTQModel's torch backend on a fixed batch (fp16 model,
  logits as fp32).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_greenbit_fixtures import tokenizer_files  # noqa: E402  (one tiny tokenizer for all)

HIDDEN, INTER, LAYERS, HEADS, VOCAB = 256, 512, 2, 4, 96
SETTINGS = {
    # name: QuantizeConfig arguments
    "llama-4bit-sym-actorder": dict(bits=4, group_size=64, sym=True, desc_act=True),
    "llama-4bit-asym": dict(bits=4, group_size=64, sym=False, desc_act=False),
    "llama-3bit-sym-actorder": dict(bits=3, group_size=32, sym=True, desc_act=True),
    "llama-2bit-asym-actorder": dict(bits=2, group_size=128, sym=False, desc_act=True),
}
FULL_WEIGHTS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
SHARDED = "llama-4bit-asym"  # saved in shards with an index


def tiny_llama(folder: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=HEADS, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread per-input-feature magnitudes, as trained models have
        for name, p in model.named_parameters():
            if p.dim() == 2 and "layers" in name:
                p.mul_(torch.exp(0.5 * torch.randn(p.shape[1])))
    model.to(torch.float16).save_pretrained(folder)
    tokenizer_files(folder)


def calibration(n: int = 16, length: int = 64):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, VOCAB, (length,), generator=g).tolist(),
             "attention_mask": [1] * length} for _ in range(n)]


def quantize(src: str, dst: str, setting: dict, sharded: bool) -> None:
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(src, QuantizeConfig(**setting), device="cpu")
    model.quantize(calibration(), batch_size=4)
    model.save(dst, **({"max_shard_size": "400KB"} if sharded else {}))


def reference_outputs(dst: str) -> None:
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import save_file

    # fp16 explicitly: on the CPU GPTQModel loads in bf16 by default, which rounds the
    # dequantized weights (and the logits) differently from the checkpoint's fp16 arithmetic
    model = GPTQModel.load(dst, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    out = {}
    for name, m in model.model.named_modules():
        if hasattr(m, "dequantize_weight") and hasattr(m, "qweight"):
            W = m.dequantize_weight().to(torch.float16).t().contiguous()  # [N, K]
            digest = hashlib.sha256(W.numpy().tobytes()).digest()
            out[f"{name}.sha256"] = torch.tensor(list(digest), dtype=torch.uint8)
            if name in FULL_WEIGHTS:
                out[f"{name}.weight"] = W
    assert sum(k.endswith(".sha256") for k in out) == 7 * LAYERS, sorted(out)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model.model(input_ids=ids).logits.float()
    out["input_ids"], out["logits"] = ids, logits
    save_file(out, dst.rstrip(os.sep) + ".reference.safetensors")


def main() -> None:
    import gptqmodel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                 "fixtures", "gptq"))
    p.add_argument("--only", nargs="*", default=sorted(SETTINGS))
    p.add_argument("--reference-only", action="store_true",
                   help="recompute the reference outputs of existing checkpoints")
    a = p.parse_args()
    if a.reference_only:
        for name in a.only:
            reference_outputs(os.path.join(a.out, name))
        return
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "fp16")
        tiny_llama(src)
        for name in a.only:
            dst = os.path.join(a.out, name)
            shutil.rmtree(dst, ignore_errors=True)
            quantize(src, dst, SETTINGS[name], sharded=name == SHARDED)
            reference_outputs(dst)
            with open(os.path.join(dst, "fixture.json"), "w") as f:
                json.dump({"made_by": f"gptqmodel {gptqmodel.__version__}, torch "
                                      f"{torch.__version__}, scripts/make_gptq_fixtures.py",
                           "setting": SETTINGS[name]}, f, indent=1)
            print(f"wrote {os.path.abspath(dst)}")


if __name__ == "__main__":
    main()
