"""Hugging Face transformers (>= 5) integration.

Importing this package registers ``quant_method: "mbwq"`` with transformers, so that
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip models quantized by
:func:`mbwq_ops.quantize_model`; :func:`from_pretrained` reads every supported folder
(save_pretrained, save_quantized, GreenBitAI, GPTQ, EXL2) into such a model.
"""
_INSTALL = 'pip install "mbwq_ops[hf]" (or pip install "transformers>=5")'

try:
    import transformers
except ImportError as e:
    raise ImportError(f"mbwq_ops.from_pretrained and mbwq_ops.hf need transformers >= 5: "
                      f"{_INSTALL} ({e})") from e
if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"mbwq_ops.hf needs transformers >= 5, found {transformers.__version__}: "
                      f"{_INSTALL}")

from .quantizer import MbwqConfig, MbwqHfQuantizer, attach, register  # noqa: E402

register()

from .auto import detect, from_pretrained  # noqa: E402
from .build import build_model  # noqa: E402

__all__ = ["MbwqConfig", "MbwqHfQuantizer", "attach", "build_model", "detect", "from_pretrained"]
