"""A small Llama-style decoder, built in the package (no download, no transformers).

Real attention (rotary embeddings, grouped-query attention, a preallocated KV cache) and a
SwiGLU MLP, with module names as in Hugging Face Llama checkpoints
(``model.layers.0.self_attn.q_proj``, ``...mlp.down_proj``, ``lm_head``), so strategy files
written for Llama models apply unchanged.

Weights are random but seeded and *shaped like a trained model's*: every input feature of every
linear layer gets a log-normal magnitude, so a few channels are much larger than the rest. That
is what makes bit allocation matter (uniform widths waste bits on quiet channels).

Decoding is written for ``torch.compile(fullgraph=True)`` and CUDA graphs: one decode step has
static shapes (batch ``B``, one token), reads the position from a device tensor, writes the KV
cache in place with ``index_copy_`` and attends over the whole preallocated cache with a mask,
so the step never syncs the host and never reallocates.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusion import fuse_linears, fusion_problem
from ..layer import MBWQLinear

__all__ = ["LlamaConfig", "TinyLlama", "Generator", "PRESETS", "fuse_projections"]


@dataclass
class LlamaConfig:
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    outlier_sigma: float = 0.8  # spread (log-normal sigma) of per-input-channel magnitudes
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> Dict:
        return asdict(self)


PRESETS: Dict[str, LlamaConfig] = {
    # CI-sized: a few seconds for everything on two CPU cores.
    "tiny": LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_seq_len=64),
    # Default on CPU: ~20 M parameters.
    "cpu": LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_layers=4,
                       num_heads=8, num_kv_heads=4, max_seq_len=128),
    # Default on CUDA: ~0.9 B parameters, big enough that decoding is bound by weight bytes.
    "cuda": LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=16,
                        num_heads=16, num_kv_heads=4, max_seq_len=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [B, H, T, D]; cos/sin [T, D/2]: rotate pairs (x1, x2) of the two halves.
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[None, None].to(x.dtype), sin[None, None].to(x.dtype)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        # Preallocated by TinyLlama.setup_cache (non-persistent: never saved).
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor,
                mask: Tensor) -> Tensor:
        cfg = self.cfg
        B, T, _ = x.shape
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        if hasattr(self, "qkv_proj"):  # fuse_projections: one GEMM for the three
            q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, nh, hd).transpose(1, 2)
        k = k.reshape(B, T, nkv, hd).transpose(1, 2)
        v = v.reshape(B, T, nkv, hd).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if self.k_cache is not None:  # write this step's keys/values, attend over the cache
            self.k_cache.index_copy_(2, positions, k.to(self.k_cache.dtype))
            self.v_cache.index_copy_(2, positions, v.to(self.v_cache.dtype))
            k, v = self.k_cache, self.v_cache
        rep = nh // nkv
        if rep > 1:
            S = k.shape[2]
            k = k[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nh, S, hd)
            v = v[:, :, None].expand(B, nkv, rep, S, hd).reshape(B, nh, S, hd)
        o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * hd))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if hasattr(self, "gate_up_proj"):  # fuse_projections: one GEMM for the two
            gate, up = self.gate_up_proj(x).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Body(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)


class TinyLlama(nn.Module):
    """``forward(tokens [B, T], positions [T]) -> logits [B, T, vocab]``.

    Without a cache (:meth:`setup_cache` not called, or after :meth:`drop_cache`) it is a plain
    causal LM over ``tokens`` (``positions`` defaults to ``0..T-1``). With a cache, ``positions``
    are the absolute positions of ``tokens`` and keys/values accumulate in the cache.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = _Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim)
        ang = torch.arange(cfg.max_seq_len).float()[:, None] * inv[None]
        self.register_buffer("rope_cos", ang.cos(), persistent=False)
        self.register_buffer("rope_sin", ang.sin(), persistent=False)
        self._cached = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Seeded weights with log-normal per-input-channel magnitudes (see module doc)."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # linear [out, in]
                out_f, in_f = p.shape
                col = torch.exp(cfg.outlier_sigma * torch.randn(in_f, generator=g))
                col = col / col.pow(2).mean().sqrt()
                std = 1.0 / math.sqrt(in_f)
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * cfg.num_layers)  # residual branches: keep depth stable
                p.copy_(torch.randn(p.shape, generator=g) * col[None] * std)

    # ------------------------------------------------------------------ cache
    def setup_cache(self, batch_size: int, dtype: Optional[torch.dtype] = None,
                    device=None) -> None:
        """Preallocate the KV cache ``[B, kv_heads, max_seq_len, head_dim]`` of every layer."""
        cfg = self.config
        ref = self.model.embed_tokens.weight
        dtype = dtype or ref.dtype
        device = device or ref.device
        for layer in self.model.layers:
            a = layer.self_attn.cfg  # its own heads (a tensor-parallel rank holds a share)
            shape = (batch_size, a.num_kv_heads, cfg.max_seq_len, a.head_dim)
            layer.self_attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            layer.self_attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self._cached = True

    def drop_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.k_cache = layer.self_attn.v_cache = None
        self._cached = False

    # ------------------------------------------------------------------ compute
    def forward(self, tokens: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        T = tokens.shape[1]
        if positions is None:
            positions = torch.arange(T, device=tokens.device)
        h = self.model.embed_tokens(tokens)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if self._cached:
            keys = torch.arange(self.config.max_seq_len, device=tokens.device)
        else:
            keys = positions
        mask = keys[None, :] <= positions[:, None]  # [T, S] causal over absolute positions
        for layer in self.model.layers:
            h = layer(h, cos, sin, positions, mask)
        return self.lm_head(self.model.norm(h))

    def decode_step(self, token: Tensor, position: Tensor) -> Tensor:
        """One greedy step: ``token [B, 1]`` at ``position [1]`` -> next token ``[B, 1]``."""
        logits = self.forward(token, position)
        return logits[:, -1].argmax(-1, keepdim=True)


# ============================================================================ generation
class Generator:
    """Greedy generation with a preallocated cache in one of four modes:

    * ``eager``: the decode step as plain PyTorch;
    * ``compile``: ``torch.compile(decode_step, fullgraph=True)``;
    * ``cudagraph``: the eager step captured once in a CUDA graph and replayed (CUDA only);
    * ``compile+cudagraph``: the compiled step captured in a CUDA graph (CUDA only).

    The prompt (prefill) always runs eagerly; timing covers the decode steps only.
    """

    MODES = ("eager", "compile", "cudagraph", "compile+cudagraph")

    def __init__(self, model: TinyLlama, batch_size: int = 1, mode: str = "eager",
                 compile_mode: Optional[str] = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        ref = model.model.embed_tokens.weight
        self.device = ref.device
        if "cudagraph" in mode and self.device.type != "cuda":
            raise ValueError(f"mode {mode!r} needs the model on a CUDA device, it is on {self.device}")
        self.model, self.mode, self.batch_size = model, mode, batch_size
        model.setup_cache(batch_size)
        step = model.decode_step
        if "compile" in mode:
            step = torch.compile(step, fullgraph=True, dynamic=False, mode=compile_mode)
        self.step = step
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.next = torch.zeros_like(self.token)
        self.graph = None

    def _capture(self) -> None:
        # Warm up on a side stream (lazy init, autotuning, compilation), then capture.
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self.next.copy_(self.step(self.token, self.position))
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next.copy_(self.step(self.token, self.position))

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> None:
        P = prompt.shape[1]
        logits = self.model(prompt.to(self.device), torch.arange(P, device=self.device))
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.fill_(P)

    @torch.no_grad()
    def warmup(self, prompt: Tensor) -> None:
        """Compile / capture now (so that :meth:`generate` times steady-state decoding)."""
        self.prefill(prompt)
        if "cudagraph" in self.mode:
            if self.graph is None:
                self._capture()
        else:
            for _ in range(2):
                self.next.copy_(self.step(self.token, self.position))

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int) -> Dict:
        """Greedy continuation of ``prompt [B, P]``; returns tokens ``[B, max_new_tokens]``,
        decode seconds and tokens/s (batch included)."""
        P = prompt.shape[1]
        if P + max_new_tokens > self.model.config.max_seq_len:
            raise ValueError(f"prompt ({P}) + new tokens ({max_new_tokens}) exceed max_seq_len "
                             f"{self.model.config.max_seq_len}")
        if "cudagraph" in self.mode and self.graph is None:
            self.warmup(prompt)
        for layer in self.model.model.layers:  # stale entries are masked, but start clean
            layer.self_attn.k_cache.zero_()
            layer.self_attn.v_cache.zero_()
        out = torch.empty(self.batch_size, max_new_tokens, dtype=torch.long, device=self.device)
        self.prefill(prompt)
        _sync(self.device)
        t0 = time.perf_counter()
        out[:, 0:1].copy_(self.token)
        for i in range(1, max_new_tokens):
            if self.graph is not None:
                self.graph.replay()
            else:
                self.next.copy_(self.step(self.token, self.position))
            self.token.copy_(self.next)
            self.position.add_(1)
            out[:, i:i + 1].copy_(self.token)
        _sync(self.device)
        dt = time.perf_counter() - t0
        steps = max(1, max_new_tokens - 1)
        return {"tokens": out.cpu(), "seconds": dt,
                "tokens_per_s": steps * self.batch_size / dt if dt > 0 else float("inf"),
                "ms_per_step": 1e3 * dt / steps}


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ============================================================================ fusion
FUSED = {"qkv_proj": ("self_attn", ("q_proj", "k_proj", "v_proj")),
         "gate_up_proj": ("mlp", ("gate_proj", "up_proj"))}
# The same sets for quantize_model(shared_layout=...): one layout per set, so that they fuse.
SHARED_LAYOUT = [names for _, names in FUSED.values()]


def _fuse(layers: List[nn.Module]) -> Optional[nn.Module]:
    """One module computing ``cat([l(x) for l in layers], -1)``, or None when they differ in
    kind or input layout (dense layers: same dtype, device and bias use)."""
    if all(isinstance(lin, MBWQLinear) for lin in layers):
        return fuse_linears(layers) if fusion_problem(layers) is None else None
    if not all(type(lin) is nn.Linear for lin in layers):
        return None
    w = layers[0].weight
    if any(lin.weight.dtype != w.dtype or lin.weight.device != w.device
           or (lin.bias is None) != (layers[0].bias is None) for lin in layers):
        return None
    fused = nn.Linear(w.shape[1], sum(lin.out_features for lin in layers),
                      bias=layers[0].bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in layers]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in layers]))
    return fused


def fuse_projections(model: TinyLlama) -> Dict[str, int]:
    """Replace each block's q/k/v projections by one ``qkv_proj`` and gate/up by one
    ``gate_up_proj`` where they can be fused (dense layers always; MBWQ layers when their input
    sides match: mbwq_ops.fusion); the outputs are the same, computed in fewer, wider GEMMs.
    An inference-time change: the model's state_dict then holds the fused modules. Returns how
    many sets were fused and kept apart."""
    counts = {"fused": 0, "kept": 0}
    for block in model.model.layers:
        for fused_name, (parent_name, names) in FUSED.items():
            parent = getattr(block, parent_name)
            if hasattr(parent, fused_name):
                continue
            fused = _fuse([getattr(parent, n) for n in names])
            if fused is None:
                counts["kept"] += 1
                continue
            for n in names:
                delattr(parent, n)
            setattr(parent, fused_name, fused)
            counts["fused"] += 1
    return counts


def build(preset_or_config="cpu", dtype: torch.dtype = torch.float32, device="cpu") -> TinyLlama:
    """A seeded :class:`TinyLlama` from a preset name, a :class:`LlamaConfig` or a dict."""
    if isinstance(preset_or_config, str):
        cfg = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, dict):
        cfg = LlamaConfig(**preset_or_config)
    else:
        cfg = preset_or_config
    return TinyLlama(cfg).to(device=device, dtype=dtype).eval()
