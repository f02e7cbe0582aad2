"""GPTQ checkpoints (AutoGPTQ / GPTQModel)."""
from __future__ import annotations

import os
from typing import Optional

import torch

QUANTIZE_CONFIG_FILE = "quantize_config.json"


def matches(folder: str, config: dict) -> bool:
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc.get("quant_method") == "gptq"
    return os.path.isfile(os.path.join(folder, QUANTIZE_CONFIG_FILE))


def read(folder: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    raise NotImplementedError("GPTQ conversion: not written yet")
