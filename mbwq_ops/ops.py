"""Typed wrappers, fake (meta) kernels and the autograd formula of every mbwq op.

The schemas live in csrc/ops.cpp; the argument layout (stored ``qweight`` + ``blocks`` table +
``perm``) is drawn in csrc/format.h and built by :func:`mbwq_ops.format.make_blocks`.
Each fake kernel repeats the C++ wrapper's checks with ``torch._check`` so that a bad call fails
the same way under ``torch.compile``; output shapes never depend on tensor values.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor

BLOCK_ROWS = 32  # stored rows per entry of the blocks table (csrc/format.h: kBlockRows)
BLOCK_COLS = 3  # (bits, word, group)


def dequant(
    qweight: Tensor, scales: Tensor, zeros: Tensor, blocks: Tensor, perm: Tensor,
    dtype: torch.dtype = torch.float16,
) -> Tensor:
    """Full weight ``W [K, N]`` in original input order (``y = x @ W``), as ``dtype``."""
    return torch.ops.mbwq.dequant.default(qweight, scales, zeros, blocks, perm, dtype)


def gemm(
    x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, blocks: Tensor, perm: Tensor,
    channel_scale: Optional[Tensor] = None, bias: Optional[Tensor] = None,
) -> Tensor:
    """``round(x * channel_scale) @ W + bias`` for 2-D ``x [M, K]``; output ``[M, N]`` in x's dtype."""
    return torch.ops.mbwq.gemm.default(x, qweight, scales, zeros, blocks, perm, channel_scale, bias)


PATHS = ("empty", "tile", "mma", "dequant_matmul")  # csrc/plan.h: GemmPath, in order


def plan(M: int, K: int, N: int, dtype: torch.dtype = torch.float16, *, bits: float = 4,
         qweight_rows: Optional[int] = None, device=None, sm_count: Optional[int] = None,
         wgmma: Optional[bool] = None, aligned: bool = True) -> Dict:
    """Which CUDA kernel ``gemm`` runs for ``x [M, K] @ W [K, N]``, and on what grid: the
    answer of csrc/plan.h (``torch.ops.mbwq.plan``), the one place that decides.

    The device is the current CUDA device (or ``device``); on a machine without one, name it
    with ``sm_count`` and ``wgmma`` (e.g. 132 and True for an H100 / H200). ``qweight_rows``
    (default ``K * bits / 32``) only changes the mma.sync grid's cost model. Returns ``path``
    (one of ``PATHS``), ``tile_tokens``, ``mma_config`` (index into plan.h's kMmaConfigs),
    ``chunk_rows`` and the first kernel's ``grid`` (``wc``, ``tiles``, ``splits``,
    ``blocks_per_split``; the mma.sync grid is priced for the CTAs per SM its configuration is
    sized for; ``ctas`` > 0: the tile kernel's stream-K schedule on that many CTAs instead)."""
    if sm_count is None or wgmma is None:
        dev = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else None)
        if dev is None or dev.type != "cuda":
            raise ValueError("mbwq.plan: no CUDA device here; pass sm_count= and wgmma= for the "
                             "device to plan for (e.g. sm_count=132, wgmma=True: H100 / H200)")
        props = torch.cuda.get_device_properties(dev)
        sm_count = props.multi_processor_count if sm_count is None else sm_count
        wgmma = props.major == 9 if wgmma is None else wgmma
    R = int(K * bits) // 32 if qweight_rows is None else qweight_rows
    v = torch.ops.mbwq.plan.default(M, K, N, R, dtype, sm_count, bool(wgmma), aligned)
    return {"path": PATHS[v[0]], "tile_tokens": v[1], "mma_config": v[2], "chunk_rows": v[3],
            "grid": {"wc": v[4], "tiles": v[5], "splits": v[6], "blocks_per_split": v[7],
                     "ctas": v[8]}}


def knob_settings() -> str:
    """The kernel-choice knobs in effect that are not 0, as ``"NAME=value,..."`` (``""``: the
    plan chooses everything; csrc/plan.h ``Knobs``). Benchmark records carry it."""
    return torch.ops.mbwq.knob_settings.default()


@contextlib.contextmanager
def tuning(**knobs: int) -> Iterator[None]:
    """Set kernel-choice knobs for the duration of a ``with`` block (benchmarks, tests):
    ``with mbwq_ops.ops.tuning(MBWQ_TILE_MIN_M=1): ...``. Names and meanings: csrc/plan.h
    (``Knobs``); their start values come from the same-named environment variables, read
    once. Results never depend on knobs beyond fp32 rounding (the order of fp32 additions;
    the opt-in fold row, ``MBWQ_MMA_CONFIG=7``, applies scales after the product)."""
    previous = {}
    try:
        for name, value in knobs.items():
            previous[name] = torch.ops.mbwq.set_knob.default(name, int(value))
        yield
    finally:
        for name, value in previous.items():
            torch.ops.mbwq.set_knob.default(name, value)


def _check_weight_args(qweight, scales, zeros, blocks, perm):
    torch._check(qweight.dim() == 2 and qweight.dtype == torch.int32,
                 lambda: f"mbwq: qweight must be a 2-D int32 tensor, got {qweight.dim()}-D {qweight.dtype}")
    torch._check(scales.dim() == 2 and scales.dtype == torch.float16,
                 lambda: f"mbwq: scales must be a 2-D float16 tensor, got {scales.dim()}-D {scales.dtype}")
    torch._check(zeros.shape == scales.shape and zeros.dtype == torch.float16,
                 lambda: f"mbwq: zeros must be float16 with the shape of scales {tuple(scales.shape)}, "
                         f"got {zeros.dtype} {tuple(zeros.shape)}")
    torch._check(scales.shape[1] == qweight.shape[1],
                 lambda: f"mbwq: scales has {scales.shape[1]} columns but qweight has {qweight.shape[1]}")
    torch._check(blocks.dim() == 2 and blocks.shape[1] == BLOCK_COLS and blocks.dtype == torch.int32,
                 lambda: f"mbwq: blocks must be int32 [K/32, {BLOCK_COLS}], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    K = blocks.shape[0] * BLOCK_ROWS
    torch._check(perm.dim() == 1 and perm.dtype == torch.int32,
                 lambda: f"mbwq: perm must be a 1-D int32 tensor, got {perm.dim()}-D {perm.dtype}")
    torch._check(perm.numel() == 0 or perm.numel() == K,
                 lambda: f"mbwq: perm has {perm.numel()} entries but blocks covers K = {K} input "
                         f"features ({blocks.shape[0]} blocks of {BLOCK_ROWS} rows); perm must be "
                         f"[K] or [0] (identity)")
    for t in (scales, zeros, blocks, perm):
        torch._check(t.device == qweight.device,
                     lambda: f"mbwq: all weight tensors must be on {qweight.device}, found one on {t.device}")
    return K, qweight.shape[1]


@torch.library.register_fake("mbwq::dequant")
def _dequant_fake(qweight, scales, zeros, blocks, perm, dtype):
    K, N = _check_weight_args(qweight, scales, zeros, blocks, perm)
    torch._check(dtype.is_floating_point,
                 lambda: f"mbwq: dequant dtype must be a floating type, got {dtype}")
    return qweight.new_empty((K, N), dtype=dtype)


@torch.library.register_fake("mbwq::gemm")
def _gemm_fake(x, qweight, scales, zeros, blocks, perm, channel_scale, bias):
    K, N = _check_weight_args(qweight, scales, zeros, blocks, perm)
    torch._check(x.dim() == 2, lambda: f"mbwq: x must be 2-D [M, K], got {x.dim()}-D {tuple(x.shape)}")
    torch._check(x.shape[1] == K, lambda: f"mbwq: x has {x.shape[1]} features but the layer has {K}")
    torch._check(x.dtype in (torch.float16, torch.bfloat16, torch.float32),
                 lambda: f"mbwq: x must be float16, bfloat16 or float32, got {x.dtype}")
    torch._check(x.device == qweight.device,
                 lambda: f"mbwq: x is on {x.device} but the weights are on {qweight.device}")
    if channel_scale is not None:
        torch._check(channel_scale.dim() == 1 and channel_scale.numel() == K
                     and channel_scale.dtype.is_floating_point,
                     lambda: f"mbwq: channel_scale must be a floating [{K}] tensor, got "
                             f"{channel_scale.dtype} {tuple(channel_scale.shape)}")
        torch._check(channel_scale.device == x.device,
                     lambda: f"mbwq: channel_scale is on {channel_scale.device} but x is on {x.device}")
    if bias is not None:
        torch._check(bias.dim() == 1 and bias.numel() == N and bias.dtype.is_floating_point,
                     lambda: f"mbwq: bias must be a floating [{N}] tensor, got {bias.dtype} "
                             f"{tuple(bias.shape)}")
        torch._check(bias.device == x.device,
                     lambda: f"mbwq: bias is on {bias.device} but x is on {x.device}")
    return x.new_empty((x.shape[0], N))


@torch.library.register_fake("mbwq::decode_mismatches")
def _decode_mismatches_fake(words):
    torch._check(words.dim() == 2 and words.shape[1] == 2 and words.dtype == torch.int32,
                 lambda: f"mbwq.decode_mismatches: words must be int32 [n, 2], got {words.dtype} "
                         f"{tuple(words.shape)}")
    return words.new_empty((), dtype=torch.int64)


# Autograd: y = xs @ W with xs = x * channel_scale, so dL/dx = (dL/dy @ W^T) * channel_scale.
# The quantized weights, scales, zeros and bias are buffers and get no gradient.
def _gemm_setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, blocks, perm, channel_scale, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros, blocks, perm, channel_scale)
    ctx.x_dtype = x.dtype


def _gemm_backward(ctx, grad_y):
    qweight, scales, zeros, blocks, perm, channel_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        W = dequant(qweight, scales, zeros, blocks, perm, torch.float32)
        grad_x = grad_y.float() @ W.t()
        if channel_scale is not None:
            grad_x = grad_x * channel_scale.float()
        grad_x = grad_x.to(ctx.x_dtype)
    return grad_x, None, None, None, None, None, None, None


torch.library.register_autograd("mbwq::gemm", _gemm_backward, setup_context=_gemm_setup_context)
