"""Quantizer grids: the fp16 range edge cases, the integer zero point, the clipping search."""
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mbwq_ops
from mbwq_ops.quant import quantizers as QZ
from mbwq_ops.reference import dequant_reference

# The "mse" search compares candidates on float32 values that are not rounded to fp16
# (quantizers.py: rtn_grid), the error here uses the stored fp16 weights: between two
# candidates that nearly tie, that rounding (2^-11 relative per weight) can pick the one that
# is worse by a few parts in 10^5 once rounded (hypothesis found 3e-5 at 8 bits).
MSE_SEARCH_SLACK = 1e-3

FP16_MAX = 65504.0


def _ref_weight(layer):
    return dequant_reference(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                             layer.in_channels, use_mbw=layer.use_mbw,
                             q_groups=layer.q_groups if layer.use_mbw else None,
                             group_size=layer.group_size).double()


def _random_group(seed, rows, cols, shift=0.0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * spread + shift
    return w


def _deq(w, bits, grid, row_weight=None):
    s, z = QZ.rtn_grid(w, bits, grid, row_weight)
    _, q = QZ.quantize_to_grid(w, s.unsqueeze(-2), z.unsqueeze(-2), bits)
    return s, z, q


# ----------------------------------------------------------------------------- fp16 range
@pytest.mark.parametrize("grid", QZ.GRIDS)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_fp16_extremes_quantize_to_finite_weights(grid, bits):
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight.normal_(generator=torch.Generator().manual_seed(bits))
        lin.weight[0, 0], lin.weight[1, 0], lin.weight[2, 40] = FP16_MAX, -FP16_MAX, FP16_MAX
        lin.weight[3, 40] = -FP16_MAX
        lin.weight[4, 41] = FP16_MAX  # a column whose range is [normal, 65504]
    lin = lin.half()
    layer = mbwq_ops.quantize_linear(lin, bits=bits, group_size=32, grid=grid)
    assert bool(torch.isfinite(layer.scales).all()) and bool(torch.isfinite(layer.zeros).all())
    W = _ref_weight(layer)
    assert bool(torch.isfinite(W).all())
    # the extreme values come back within one step of their group (they set its range)
    step = layer.scales.double().max()
    err = (W - lin.weight.detach().t().double()).abs()
    if grid != "mse":  # (the clipping search may clip them, to lower the group's error)
        for o, i in [(0, 0), (1, 0), (2, 40), (3, 40), (4, 41)]:
            assert float(err[i, o]) <= float(step), (o, i, float(err[i, o]))
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).half() / 64
    exact = x.double() @ W
    assert bool(exact.abs().max() < 60000)
    assert bool(torch.isfinite(layer(x)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [1e30, -1e30, 1e5, -1e5, 65536.0])
def test_weights_beyond_fp16_are_refused_with_layer_and_value(dtype, value):
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        lin.weight[5, 7] = value
    lin = lin.to(dtype)
    shown = re.escape(f"{float(lin.weight.detach()[5, 7]):g}")
    with pytest.raises(ValueError, match=rf"nn\.Linear\(64, 16\) has 1 value\(s\) beyond the "
                                         rf"fp16 range .*weight\[5, 7\] = {shown}"):
        mbwq_ops.quantize_linear(lin, bits=4)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), lin)
    with pytest.raises(ValueError, match=rf"weight of layer '2' has 1 value\(s\) beyond the fp16 "
                                         rf"range .*= {shown}"):
        mbwq_ops.quantize_model(model, bpw=3.0, verbose=False)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], mbwq_ops.MBWQLinear)


def test_fp32_weights_just_inside_fp16_range_quantize():
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight.normal_(generator=torch.Generator().manual_seed(1))
        lin.weight[0, :4] = torch.tensor([FP16_MAX, -FP16_MAX, 65000.5, -1234.25])
    W0 = lin.weight.detach().t().double()
    for bits in (2, 4):
        err = {}
        for grid in QZ.GRIDS:
            layer = mbwq_ops.quantize_linear(lin, bits=bits, group_size=32, grid=grid)
            W = _ref_weight(layer)
            assert bool(torch.isfinite(W).all())
            err[grid] = float((W - W0).pow(2).sum())
            if grid != "mse":  # grids that never clip: within one step of the value
                assert float((W[:4, 0] - W0[:4, 0]).abs().max()) \
                    <= float(layer.scales.double().max())
        # the clipping search may clip +-65504 (2 bits, one outlier pair) but only to lower
        # the group's total error
        assert err["mse"] <= err["zero-point"]


def test_gptq_with_extreme_weights_stays_finite():
    K, N = 128, 16
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.normal_(generator=torch.Generator().manual_seed(2))
        lin.weight[:, 0] = FP16_MAX
        lin.weight[:, 1] = -FP16_MAX
    x = torch.randn(512, K, generator=torch.Generator().manual_seed(3))
    layer = mbwq_ops.quantize_linear(lin.half(), bits=4, group_size=32, calibration=x)
    assert bool(torch.isfinite(_ref_weight(layer)).all())


# ----------------------------------------------------------------------------- zero point
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 5, 6, 8]),
       rows=st.sampled_from([32, 64, 128]), shift=st.floats(-0.9, 0.9),
       spread=st.floats(1e-3, 1e3))
def test_zero_point_grid_holds_a_real_zero(seed, bits, rows, shift, spread):
    # groups whose range straddles 0 (shift is a fraction of the spread)
    w = _random_group(seed, rows, 24, 0.0, spread)
    w = w - shift * spread
    w[0] = -spread * 3  # make sure both signs occur
    w[1] = spread * 3
    s, z = QZ.rtn_grid(w, bits, "zero-point")
    zc = torch.round(z.double() / s.double())  # the integer zero point
    assert bool(((zc >= 0) & (zc <= (1 << bits) - 1)).all())
    codes, q = QZ.quantize_to_grid(torch.zeros(1, 24, dtype=torch.float64), s, z, bits)
    # a real 0 dequantizes to 0, up to the fp16 rounding of zero (half an ulp of |zero|)
    half_ulp = z.double().abs() * 2.0 ** -11 + 2.0 ** -25
    assert bool((q.abs() <= half_ulp).all()), float((q.abs() / half_ulp).max())
    # ... which is a tiny share of a step: at most (2^b - 1) * 2^-11 of it (0.7 % at 4 bits; the
    # old grid was off by up to half a step)
    assert bool((q.abs() <= ((1 << bits) - 1) * 2.0 ** -11 * s.double() + 2.0 ** -25).all())
    # and round-to-nearest still errs by at most half a step (+ the fp16 roundings)
    _, _, qw = _deq(w, bits, "zero-point")
    bound = s.double() / 2 + 2.0 ** -11 * (qw.abs() + z.double().abs()) + 2.0 ** -24
    assert bool(((qw - w).abs() <= bound).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]),
       rows=st.sampled_from([32, 128]), heavy=st.booleans())
def test_new_grids_never_worse_than_minmax_on_random_data(seed, bits, rows, heavy):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, rows, 32, generator=g, dtype=torch.float64)
    if heavy:  # heavy tails, like real weight groups with an outlier or two
        w = w * torch.exp(torch.randn(8, rows, 32, generator=g, dtype=torch.float64))
    hw = torch.rand(8, rows, generator=g, dtype=torch.float64) + 0.1
    err = {}
    for grid in QZ.GRIDS:
        _, _, q = _deq(w, bits, grid, hw if grid == "mse" else None)
        err[grid] = float(((q - w).pow(2) * hw[..., None]).sum())
    # the search tries both other grids (p = 1 is the zero-point grid): never worse than either
    assert err["mse"] <= min(err["zero-point"], err["minmax"]) * (1 + MSE_SEARCH_SLACK)
    # (the plain zero-point grid alone is not: on dense symmetric groups with no weight at 0 its
    # shift of up to half a step costs a few per cent; see the test below for where it wins)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from([2, 3, 4, 8]),
       sparsity=st.floats(0.2, 0.8))
def test_zero_point_grid_wins_when_zeros_are_common(seed, bits, sparsity):
    # pruned or near-zero weights: the old grid rounds every exact 0 off by up to half a step
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 64, 32, generator=g, dtype=torch.float64)
    w = w * (torch.rand(4, 64, 32, generator=g, dtype=torch.float64) > sparsity)
    w[:, 0], w[:, 1] = -3.0, 3.5  # both signs in every column
    err = {grid: float((_deq(w, bits, grid)[2] - w).pow(2).sum()) for grid in QZ.GRIDS}
    assert err["zero-point"] < err["minmax"]
    assert err["mse"] <= err["zero-point"] * (1 + MSE_SEARCH_SLACK)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_grid_clips_heavy_tails(bits):
    # Student-t weights (3 degrees of freedom): a few large values stretch every min/max grid
    torch.manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((128, 16)).double()
    s_zp, _, q_zp = _deq(w, bits, "zero-point")
    s_mse, _, q_mse = _deq(w, bits, "mse")
    assert bool((s_mse <= s_zp).all()) and bool((s_mse < s_zp).any())  # it clipped
    assert float((q_mse - w).pow(2).sum()) < 0.95 * float((q_zp - w).pow(2).sum())


def test_grid_argument_is_checked_and_used():
    lin = nn.Linear(128, 16)
    with torch.no_grad():
        lin.weight.normal_(generator=torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=r"grid must be one of .*'nearest'"):
        mbwq_ops.quantize_linear(lin, bits=4, grid="nearest")
    with pytest.raises(ValueError, match=r"grid must be one of"):
        mbwq_ops.quantize_model(nn.Sequential(lin), bits=4, grid="x", verbose=False)
    W = lin.weight.detach().t().double()
    errs = {g: float((_ref_weight(mbwq_ops.quantize_linear(lin, bits=3, group_size=32, grid=g))
                      - W).pow(2).sum()) for g in QZ.GRIDS}
    assert errs["mse"] < errs["minmax"] and len(set(errs.values())) == 3


@pytest.mark.parametrize("static", [False, True])
def test_gptq_static_groups_is_a_valid_layer_close_to_the_weights(static):
    K, N = 256, 32
    lin = nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.normal_(generator=torch.Generator().manual_seed(5))
    x = torch.randn(1024, K, generator=torch.Generator().manual_seed(6))
    layer = mbwq_ops.quantize_linear(lin, bits=4, group_size=64, calibration=x,
                                     static_groups=static)
    rtn = mbwq_ops.quantize_linear(lin, bits=4, group_size=64, method="rtn")
    ref = lin(x).detach()
    e = float((layer(x) - ref).norm())
    assert e <= float((rtn(x) - ref).norm()) * 1.05
    assert math.isfinite(e)
