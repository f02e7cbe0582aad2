"""Random prepared MBWQ layers for the device scripts (bench.py, sanitize_paths.py and the
experiments), built through the library's public API only.

Codes are uniform over all 2^b values without packing them: every group holds a multiple of
32 rows, so its packed words carry no padding bits, and uniformly random int32 words ARE
uniformly random codes for every width (docs/FORMAT.md §4). Scales, zeros and channel scales
are random and never zero; q_perm is a random permutation unless asked otherwise. The tensors
are drawn on the target device, so that layers of 2^28 weights build in milliseconds.
(The tests have their own builder, tests/layers.py, which packs explicit codes.)
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

import torch

import mbwq_ops
from mbwq_ops import format as fmt

FORMATS = ["q4_g128", "q2_g64", "mixed_2.5", "mixed_3.0"]
# mixed formats: probability of each width per group (4/3/2-bit), groups of 32..128 rows
MIXES = {"mixed_2.5": {4: 0.1, 3: 0.3, 2: 0.6}, "mixed_3.0": {4: 0.3, 3: 0.4, 2: 0.3}}


def random_mixed_groups(rng: random.Random, K: int, widths: dict | Sequence[int]
                        ) -> List[fmt.Group]:
    """K rows in groups of 32..128 rows, each group's width drawn from `widths` (a sequence,
    or a dict width -> probability), sorted 8 -> 2 as the format requires (§6.2)."""
    choices = list(widths)
    weights = list(widths.values()) if isinstance(widths, dict) else None
    rows, ws, left = [], [], K
    while left:
        r = min(left, 32 * rng.randint(1, 4))
        rows.append(r)
        ws.append(rng.choices(choices, weights=weights)[0])
        left -= r
    order = sorted(range(len(rows)), key=lambda i: fmt.WIDTHS.index(ws[i]))
    return fmt.mixed_groups([ws[i] for i in order], [rows[i] for i in order])


def format_groups(fmt_name: str, K: int, rng: random.Random) -> List[fmt.Group]:
    """The groups of one of the benchmark FORMATS."""
    if fmt_name == "q4_g128":
        return fmt.uniform_groups(K, 4, 128)
    if fmt_name == "q2_g64":
        return fmt.uniform_groups(K, 2, 64)
    return random_mixed_groups(rng, K, MIXES[fmt_name])


def random_layer(groups: Sequence[fmt.Group], K: int, N: int, *, use_mbw: bool,
                 perm: str = "random", bias: bool = False, seed: int = 0,
                 device: str = "cuda") -> Tuple[mbwq_ops.MBWQLinear, int]:
    """A prepared MBWQLinear on `device` with random stored tensors, and its weight bytes
    (qweight + scales + zeros). `perm`: "random", "identity" or "zeros" (the all-zero q_perm,
    which means identity in uniform mode only, §3). The same seed gives the same tensors on
    the same device type."""
    gen = torch.Generator(device=device).manual_seed(seed)
    R = groups[-1].start + groups[-1].packed_rows
    G = len(groups)
    qweight = torch.randint(-(2 ** 31), 2 ** 31 - 1, (R, N), dtype=torch.int32, device=device,
                            generator=gen)
    scales = (torch.rand(G, N, device=device, generator=gen) * 0.02 + 0.001).half()
    max_code = torch.tensor([float((1 << g.bits) - 1) for g in groups], device=device)
    zeros = (scales.float() * max_code.view(G, 1)
             * (0.3 + 0.4 * torch.rand(G, N, device=device, generator=gen))).half()
    if perm == "random":
        q_perm = torch.randperm(K, device=device, generator=gen)
    elif perm == "identity":
        q_perm = torch.arange(K, device=device)
    elif perm == "zeros":
        q_perm = torch.zeros(K, dtype=torch.int64, device=device)
    else:
        raise ValueError(f"perm must be 'random', 'identity' or 'zeros', got {perm!r}")
    sd = {"qweight": qweight, "scales": scales, "zeros": zeros, "q_perm": fmt.as_int16(q_perm),
          "channel_scale": (0.5 + torch.rand(1, 1, K, device=device, generator=gen)).half()}
    if use_mbw:
        sd["q_groups"] = fmt.q_groups_tensor(groups).to(device)
    if bias:
        sd["bias"] = torch.randn(N, device=device, generator=gen).half()
    layer = mbwq_ops.MBWQLinear(K, N, w_bit=groups[0].bits, group_size=groups[0].rows,
                                use_mbw=use_mbw, groups=G, rows_packed=R,
                                disable_bias=not bias).to(device)
    layer.load_state_dict(sd)
    layer.prepare_params()
    return layer, qweight.numel() * 4 + scales.numel() * 2 + zeros.numel() * 2


def make_layer(fmt_name: str, K: int, N: int, seed: int = 0, device: str = "cuda"):
    """(prepared layer, weight bytes) of a benchmark format on an LLM shape."""
    groups = format_groups(fmt_name, K, random.Random(seed))
    return random_layer(groups, K, N, use_mbw=fmt_name.startswith("mixed"), seed=seed,
                        device=device)


def op_args(layer):
    """The layer's arguments to torch.ops.mbwq.gemm after x."""
    return (layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm,
            layer.channel_scale.reshape(-1), layer.bias)
