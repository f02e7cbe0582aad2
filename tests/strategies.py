"""Hypothesis strategies for random valid MBWQ layers (built by tests/layers.py) and inputs.

A drawn spec is a handful of small parameters plus a seed, so failures shrink to short,
readable examples: K, N, mode, width set, group sizes, q_perm kind, bias.
"""
import random

import torch
from hypothesis import strategies as st

from mbwq_ops import format as fmt

from layers import LayerSpec

M_VALUES = (0, 1, 2, 3, 5, 17, 32, 33, 64, 118)
UNIFORM_GROUP_SIZES = (32, 64, 96, 128, 160, 256, 1024)  # 96/160: wrong in the original


def dtypes_for(device):
    return (torch.float16, torch.bfloat16) + ((torch.float32,) if device == "cpu" else ())


def mixed_rows(rng, in_features, n_widths):
    """Split in_features into groups of 32-row multiples; at least n_widths groups if possible."""
    blocks = in_features // 32
    n = min(blocks, max(n_widths, rng.randint(1, min(blocks, 24))))
    cuts = sorted(rng.sample(range(1, blocks), n - 1)) if n > 1 else []
    edges = [0] + cuts + [blocks]
    return [32 * (b - a) for a, b in zip(edges, edges[1:])]


@st.composite
def layer_specs(draw, max_k_blocks=128, max_n=72, mode=None):
    seed = draw(st.integers(0, 2**31 - 1))
    use_mbw = draw(st.booleans()) if mode is None else mode == "mixed"
    k_blocks = draw(st.one_of(st.integers(1, 16), st.integers(1, max_k_blocks)))
    K = 32 * k_blocks
    N = draw(st.integers(1, max_n))
    bias = draw(st.booleans())
    kinds = ["random", "identity"] + ([] if use_mbw else ["zeros"])
    perm = draw(st.sampled_from(kinds))
    if use_mbw:
        widths = sorted(draw(st.sets(st.sampled_from(fmt.WIDTHS), min_size=1)), key=fmt.WIDTHS.index)
        rng = random.Random(seed)
        rows = mixed_rows(rng, K, len(widths))
        # every drawn width appears when there are enough groups, the rest at random; sorted 8 -> 2
        ws = list(widths[: len(rows)]) + [rng.choice(widths) for _ in range(len(rows) - len(widths))]
        ws.sort(key=fmt.WIDTHS.index)
        return LayerSpec(K, N, True, ws, rows, perm=perm, bias=bias, seed=seed)
    w_bit = draw(st.sampled_from((2, 4)))
    gs = draw(st.one_of(st.sampled_from(UNIFORM_GROUP_SIZES), st.integers(1, k_blocks).map(lambda b: 32 * b)))
    return LayerSpec(K, N, False, w_bit=w_bit, group_size=gs, perm=perm, bias=bias, seed=seed)


def random_x(shape, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)
