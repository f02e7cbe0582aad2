"""mbwq_ops: mixed-bit-width quantized (MBWQ) linear layers as PyTorch custom ops.

``torch.ops.mbwq.gemm`` / ``torch.ops.mbwq.dequant`` are dispatcher ops with CPU and CUDA
kernels, fake kernels and autograd, so models compile with ``fullgraph=True`` and capture in
CUDA graphs. :class:`MBWQLinear` (alias ``MBWQLinearCuda``) is a drop-in for bitorch-engine's
layer and reads its checkpoints unchanged (docs/FORMAT.md describes the stored format).

The package is the library (ops, format, layer, reference, checkpoint, accounting); the
quantizers live in :mod:`mbwq_ops.quant` and the ``mbwq`` command, the demo and its models in
:mod:`mbwq_ops.apps`. Both load on first use, so ``import mbwq_ops`` stays light.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

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
from .accounting import bits_per_weight, layer_bits  # noqa: E402,F401
from .checkpoint import load_quantized, save_quantized  # noqa: E402,F401
from .fusion import fuse_linears  # noqa: E402,F401
from .layer import MBWQLinear, MBWQLinearCuda, prepare_model  # noqa: E402,F401
from .ops import dequant, gemm, plan  # noqa: E402,F401

# Public names served by the quantizer package, imported when first asked for.
_LAZY = {name: "mbwq_ops.quant" for name in (
    "quantize_linear", "quantize_model", "collect_hessians", "load_strategy",
    "strategy_from_model")}
_LAZY["from_pretrained"] = "mbwq_ops.hf"  # needs transformers (the [hf] extra)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mbwq_ops' has no attribute {name!r}")


# transformers learns quant_method "mbwq" only when mbwq_ops.hf runs register(); without it a
# saved MBWQ model would load as a plain one with random Linear weights (transformers merely
# warns about an unknown quantization type). So once mbwq_ops is imported, importing
# transformers (before or after) registers it too; mbwq_ops itself never imports transformers.
class _RegisterWithTransformers(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once; and find the real spec without us
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_hf()

        spec.loader.exec_module = exec_module
        return spec


def _register_hf():
    try:
        importlib.import_module("mbwq_ops.hf")
    except Exception as e:  # an old or broken transformers must not break its own import
        warnings.warn(f"mbwq_ops: could not register quant_method 'mbwq' with transformers: {e}")


if "transformers" in sys.modules:
    _register_hf()
elif not any(isinstance(f, _RegisterWithTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithTransformers())


__all__ = ["MBWQLinear", "MBWQLinearCuda", "prepare_model", "dequant", "gemm", "plan", "format", "ops",
           "reference", "bits_per_weight", "layer_bits", "save_quantized", "load_quantized",
           "fuse_linears", *_LAZY]
