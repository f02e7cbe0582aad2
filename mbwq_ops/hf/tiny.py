"""Tiny random transformers models and tokenizers, built in code (no download), for examples
and tests: a checkpoint folder in a second, on CPU.

    folder = mbwq_ops.hf.tiny.save_tiny_checkpoint("/tmp/tiny-q3", bpw=3.0)
    model = mbwq_ops.from_pretrained(folder)
"""
from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["tiny_llama", "tiny_tokenizer", "save_tiny_checkpoint"]


def tiny_llama(seed: int = 0, vocab_size: int = 96, hidden_size: int = 128,
               intermediate_size: int = 256, num_hidden_layers: int = 2,
               tie_word_embeddings: bool = False, **config):
    """A random ``LlamaForCausalLM`` (fp32, eval mode) of the given size."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                      intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
                      num_attention_heads=config.pop("num_attention_heads", 4),
                      num_key_value_heads=config.pop("num_key_value_heads", 2),
                      max_position_embeddings=config.pop("max_position_embeddings", 128),
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
                      **config)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer(vocab_size: int = 96):
    """A word-level tokenizer: ``<unk> <s> </s>`` then the words ``w0 w1 ...`` (whitespace-split)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def save_tiny_checkpoint(folder: str, bpw: Optional[float] = 3.0, bits: Optional[int] = None,
                         seed: int = 0, **config) -> str:
    """Quantize :func:`tiny_llama` (``bpw`` or ``bits``) and ``save_pretrained`` it with
    :func:`tiny_tokenizer` into ``folder``; returns ``folder``."""
    from .. import quantize_model
    model = tiny_llama(seed, **config)
    quantize_model(model, bpw=None if bits else bpw, bits=bits, verbose=False)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder
