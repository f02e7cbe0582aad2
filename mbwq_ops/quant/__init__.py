"""Quantizers: turn ``nn.Linear`` layers and whole models into MBWQ layers.

``quantize.py`` orders rows, allocates widths and builds layers; ``quantizers.py`` holds the
per-group fp16 grids, RTN and GPTQ; ``strategy.py`` reads green-bit-llm strategy files.
Imported on demand: ``import mbwq_ops`` does not load this package.
"""
from .quantize import (  # noqa: F401
    collect_hessians, plan_from_strategy, quantize_linear, quantize_model, strategy_from_model)
from .strategy import load_strategy  # noqa: F401

__all__ = ["collect_hessians", "plan_from_strategy", "quantize_linear", "quantize_model",
           "strategy_from_model", "load_strategy"]
