"""EXL2 checkpoints (exllamav2)."""
from __future__ import annotations

import glob
import os
from typing import Optional

import torch


def matches(folder: str, config: dict) -> bool:
    qc = config.get("quantization_config")
    if isinstance(qc, dict):
        return qc.get("quant_method") == "exl2"
    return bool(glob.glob(os.path.join(folder, "output*.safetensors")))


def read(folder: str, *, dtype: Optional[torch.dtype] = None, progress: bool = True):
    raise NotImplementedError("EXL2 conversion: not written yet")
