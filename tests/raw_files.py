"""Reading a checkpoint folder's tensors without the library's loaders (the tests' ground truth)."""
import os
from typing import Dict

from safetensors import safe_open
from torch import Tensor


def raw_tensors(folder: str) -> Dict[str, Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``folder``, by name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out
