import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # tests/layers.py

# "ci" (default): quick; "thorough": many more examples, e.g. on the GPU machine.
settings.register_profile("ci", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def knobs():
    """Kernel-choice knobs (csrc/plan.h: Knobs) for one test: ``knobs.set("MBWQ_TILE_MIN_M", 1)``;
    every knob goes back to its environment value afterwards."""
    import torch
    import mbwq_ops  # noqa: F401  (registers torch.ops.mbwq)

    class Knobs:
        @staticmethod
        def set(name, value):
            torch.ops.mbwq.set_knob(name, int(value))

    yield Knobs()
    torch.ops.mbwq.reset_knobs()
