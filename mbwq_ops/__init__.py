"""mbwq_ops: mixed-bit-width quantized (MBWQ) linear layers as PyTorch custom ops.

``torch.ops.mbwq.gemm`` / ``torch.ops.mbwq.dequant`` are dispatcher ops with CPU and CUDA
kernels, fake kernels and autograd, so models compile with ``fullgraph=True`` and capture in
CUDA graphs. :class:`MBWQLinear` (alias ``MBWQLinearCuda``) is a drop-in for bitorch-engine's
layer and reads its checkpoints unchanged (see FORMAT.md for the stored format).
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from . import _C  # noqa: F401  (registers torch.ops.mbwq.*)
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "mbwq_ops: the compiled library mbwq_ops._C is missing or does not match this torch "
        f"({e}). Build it from the repository root with torch already installed:\n"
        '    pip install --no-build-isolation -e ".[test]"'
    ) from e

from . import format, ops, reference  # noqa: E402,F401
from .layer import MBWQLinear, MBWQLinearCuda, prepare_model  # noqa: E402,F401
from .ops import dequant, gemm  # noqa: E402,F401
from .quantize import (  # noqa: E402,F401
    bits_per_weight, collect_hessians, load_strategy, quantize_linear, quantize_model,
    strategy_from_model)
from .checkpoint import load_quantized, save_quantized  # noqa: E402,F401

__all__ = ["MBWQLinear", "MBWQLinearCuda", "prepare_model", "dequant", "gemm", "format", "ops",
           "reference", "quantize_linear", "quantize_model", "bits_per_weight", "collect_hessians",
           "load_strategy", "strategy_from_model", "save_quantized", "load_quantized"]
