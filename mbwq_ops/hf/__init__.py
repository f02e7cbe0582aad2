"""Hugging Face transformers (>= 5) integration.

Importing this package registers ``quant_method: "mbwq"`` with transformers, so that
``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` round-trip models quantized by
:func:`mbwq_ops.quantize_model`. :func:`from_pretrained` reads every supported folder.
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError('mbwq_ops.hf needs transformers >= 5: pip install "mbwq_ops[hf]" '
                      f'(or pip install "transformers>=5") ({e})') from e

from .quantizer import MbwqConfig, MbwqHfQuantizer, attach, register  # noqa: E402

register()

__all__ = ["MbwqConfig", "MbwqHfQuantizer", "attach"]
