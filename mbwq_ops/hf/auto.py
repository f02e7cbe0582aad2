"""One entry point for every quantized folder: :func:`from_pretrained`.

========================  ============================================================
source                    how a folder is recognised
========================  ============================================================
``mbwq``                  ``config.json`` with ``quantization_config.quant_method "mbwq"``
                          (``save_pretrained`` of a model quantized by this library)
``mbwq-save_quantized``   ``mbwq_config.json`` (``mbwq_ops.save_quantized``) with a
                          transformers ``config.json`` beside it
``greenbit`` / ``gptq``   as :func:`mbwq_ops.loaders.detect` says
/ ``exl2``
========================  ============================================================
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional, Union

import torch

from .. import checkpoint as C
from .build import build_model, check_loading_info, checkpoint_from_save_quantized
from .quantizer import QUANT_METHOD

__all__ = ["detect", "from_pretrained", "SAVE_QUANTIZED"]

SAVE_QUANTIZED = "mbwq-save_quantized"


def detect(folder: Union[str, os.PathLike]) -> Optional[str]:
    """The source of ``folder`` (see the module's table), or None."""
    from .. import loaders

    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    if os.path.isfile(os.path.join(folder, C.CONFIG_NAME)):  # save_pretrained never writes it
        return SAVE_QUANTIZED
    config = _read_json(os.path.join(folder, "config.json"))
    qc = (config or {}).get("quantization_config") or {}
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return QUANT_METHOD
    return loaders.detect(folder)


def from_pretrained(path: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                    device=None, progress: bool = True):
    """A transformers model with MBWQ layers, prepared and in eval mode, from a folder of any
    supported source (:func:`detect`).

    ``dtype``: floating dtype of the unquantized weights and so of the activations (default: as
    the checkpoint says); MBWQ stored tensors keep their format dtypes. ``device``: ``"cpu"``
    (default), ``"cuda"``, ... ``progress``: progress bars while reading."""
    from .. import loaders

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    source = detect(path)
    with _progress_bars(progress):
        if source == QUANT_METHOD:
            from transformers import AutoModelForCausalLM
            model, info = AutoModelForCausalLM.from_pretrained(
                path, dtype=dtype or "auto", output_loading_info=True)
            check_loading_info(info, path)
            if device is not None:
                model.to(device)
            return model.eval()
        if source == SAVE_QUANTIZED:
            ckpt = checkpoint_from_save_quantized(path, dtype=dtype)
        elif source is not None:
            ckpt = loaders.read_checkpoint(path, dtype=dtype, progress=progress, source=source)
        else:
            raise ValueError(
                f"{path}: not a quantized checkpoint this library reads: expected config.json "
                f"with quantization_config.quant_method {QUANT_METHOD!r} (save_pretrained), "
                f"{C.CONFIG_NAME} (save_quantized), or a GreenBitAI, GPTQ or EXL2 folder")
        return build_model(ckpt, dtype=dtype, device=device, progress=progress)


@contextlib.contextmanager
def _progress_bars(on: bool):
    from transformers.utils import logging as hf_logging
    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
