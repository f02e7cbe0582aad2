"""Quantizers: turn ``nn.Linear`` layers and whole models into MBWQ layers.

``quantize.py`` builds layers and runs the pipeline (one layer, a model); ``layout.py`` holds
the row order, units and bit costs of a layer's plan; ``measure.py`` the calibration, error
measurement and width allocation; ``quantizers.py`` the per-group fp16 grids, RTN and GPTQ;
``strategy.py`` reads green-bit-llm strategy files.
Imported on demand: ``import mbwq_ops`` does not load this package.
"""
from .quantize import (  # noqa: F401
    collect_hessians, plan_from_strategy, quantize_linear, quantize_model, strategy_from_model)
from .strategy import load_strategy  # noqa: F401

__all__ = ["collect_hessians", "plan_from_strategy", "quantize_linear", "quantize_model",
           "strategy_from_model", "load_strategy"]
