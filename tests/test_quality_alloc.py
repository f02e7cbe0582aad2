"""The allocation objective on small layers: GPTQ's error estimate, the output gains, and
mixed layouts against uniform ones on the model's output."""
import copy
import math

import pytest
import torch
from torch import nn

import mbwq_ops
from mbwq_ops.apps import minilm as ML
from mbwq_ops.quant import quantize as Q
from mbwq_ops.quant.quantizers import damped_hessian
from mbwq_ops.reference import dequant_reference


def _ref_weight(layer):
    return dequant_reference(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                             layer.in_channels, use_mbw=layer.use_mbw,
                             q_groups=layer.q_groups if layer.use_mbw else None,
                             group_size=layer.group_size).double()


def _linear(K, N, seed, row_sigma=0.0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=False)
    with torch.no_grad():
        rows = torch.exp(row_sigma * torch.randn(K, generator=g))
        lin.weight.copy_(torch.randn(N, K, generator=g) * rows[None] / math.sqrt(K))
    return lin


def _inputs(K, n, seed):
    mix = torch.randn(K // 4, K, generator=torch.Generator().manual_seed(99))
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(K, generator=torch.Generator().manual_seed(98)))
    low_rank = torch.randn(n, K // 4, generator=g) @ mix
    return (low_rank + 0.3 * torch.randn(n, K, generator=g)) * scale


def _out_err(W, layer, H):
    dW = _ref_weight(layer) - W
    return float((dW * (H @ dW)).sum())


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_error_estimate_tracks_gptq(bits):
    K, N = 256, 48
    lin = _linear(K, N, seed=bits, row_sigma=0.5)
    X = _inputs(K, 2048, seed=1)
    H = X.double().t() @ X.double() / X.shape[0]
    W = lin.weight.detach().t().double()
    damp = 0.1
    Hd = damped_hessian(H, damp)  # what GPTQ minimises, and what the allocation measures with
    gptq = mbwq_ops.quantize_linear(lin, bits=bits, group_size=128, calibration=H, damp=damp)
    rtn = mbwq_ops.quantize_linear(lin, bits=bits, group_size=128, method="rtn")
    actual = _out_err(W, gptq, Hd)
    assert actual < 0.6 * _out_err(W, rtn, Hd)  # correlated inputs: GPTQ removes a lot
    est_gptq = float(Q._measure(W.float(), H, K, [bits], [128], damp,
                                gptq_estimate=True).err.sum())
    est_rtn = float(Q._measure(W.float(), H, K, [bits], [128], damp).err.sum())
    # the GPTQ estimate finds what GPTQ leaves, within a factor of 1.5; the H-weighted RTN
    # error (the old measure) is several times too high
    assert actual / 1.5 <= est_gptq <= 1.5 * actual, (est_gptq, actual)
    assert est_rtn > 2.5 * actual


class _TwoBranches(nn.Module):
    """``y = a(x) + gain * b(x)``: branch b reaches the output ``gain`` times louder."""

    def __init__(self, K, N, gain):
        super().__init__()
        self.a, self.b = _linear(K, N, seed=1), _linear(K, N, seed=2)
        self.gain = gain

    def forward(self, x):
        return self.a(x) + self.gain * self.b(x)


def test_output_gains_see_what_reaches_the_output():
    K, N, gain = 128, 64, 10.0
    model = _TwoBranches(K, N, gain)
    X = [_inputs(K, 512, seed=s) for s in (1, 2)]
    H = Q.collect_hessians(model, ["a", "b"], X)
    gains = Q._output_gains(model, ["a", "b"], X, H, 3.0, Q.WIDTHS, 128, "mse", False)
    assert gains["b"] / gains["a"] == pytest.approx(gain ** 2, rel=0.02)
    # the gains measured nothing permanent: the model is unchanged
    assert torch.equal(model.a.weight, _TwoBranches(K, N, gain).a.weight)
    # a model whose output is no tensor: no gains (the per-layer objective is used)
    wrapped = nn.Sequential(model)
    wrapped.forward = lambda x: {"text": "no tensor"}  # noqa: E731
    assert Q._output_gains(wrapped, ["0.a"], X, {"0.a": H["a"]}, 3.0, Q.WIDTHS, 128, "mse",
                           False) is None


def test_output_objective_gives_the_loud_branch_more_bits():
    K, N, gain = 128, 64, 10.0
    X = [_inputs(K, 512, seed=s) for s in (1, 2)]
    Xt = _inputs(K, 512, seed=3)
    model = _TwoBranches(K, N, gain)
    ref = model(Xt).detach()
    out = {}
    for objective in ("output", "layer"):
        q = Q.quantize_model(copy.deepcopy(model), bpw=3.0, calibration=X, damp=0.1,
                             objective=objective, verbose=False)
        assert mbwq_ops.bits_per_weight(q) <= 3.0
        mean_bits = {n: sum(b * r for b, r in Q.layer_bits(getattr(q, n))["groups"]) / K
                     for n in ("a", "b")}
        out[objective] = (float((q(Xt) - ref).pow(2).mean()), mean_bits)
    err_out, bits_out = out["output"]
    err_layer, bits_layer = out["layer"]
    assert bits_out["b"] > bits_out["a"]
    assert bits_out["b"] > bits_layer["b"]
    assert err_out < 0.8 * err_layer


def test_mixed_is_at_least_as_good_as_uniform_gptq_on_the_output():
    K = 256
    model = nn.Sequential(_linear(K, 256, seed=3, row_sigma=0.8), nn.GELU(),
                          _linear(256, 128, seed=4, row_sigma=0.3))
    X = [_inputs(K, 1024, seed=s) for s in (5, 6)]
    Xt = _inputs(K, 1024, seed=7)
    ref = model(Xt).detach()
    for bits, gs in ((4, 128), (3, 128), (2, 64)):
        uni = Q.quantize_model(copy.deepcopy(model), bits=bits, group_size=gs, calibration=X,
                               damp=0.1, verbose=False)
        budget = mbwq_ops.bits_per_weight(uni)
        mix = Q.quantize_model(copy.deepcopy(model), bpw=budget, group_size=(64, 128),
                               calibration=X, damp=0.1, verbose=False)
        assert mbwq_ops.bits_per_weight(mix) <= budget
        e_uni = float((uni(Xt) - ref).pow(2).mean())
        e_mix = float((mix(Xt) - ref).pow(2).mean())
        assert e_mix <= e_uni * 1.02, (bits, gs, e_mix, e_uni)


def test_objective_is_checked():
    with pytest.raises(ValueError, match=r"objective must be 'output' or 'layer', got 'loss'"):
        Q.quantize_model(nn.Sequential(_linear(64, 8, seed=1)), bpw=3.0, objective="loss",
                         verbose=False)


def test_gptq_visits_low_widths_first_and_stores_8_to_2():
    K, N = 256, 32
    lin = _linear(K, N, seed=8, row_sigma=0.7)
    X = _inputs(K, 1024, seed=9)
    H = X.double().t() @ X.double() / X.shape[0]
    W = lin.weight.detach().t().double()
    plan = Q.LayerPlan(torch.arange(K), [(8, 64), (4, 64), (2, 128)])
    errs = {}
    for first in (True, False):
        codes, sc, ze = Q.gptq(W.float(), H, plan.groups, 0.1, low_widths_first=first)
        layer = Q._build_layer(K, plan, codes, sc, ze, None, "cpu")
        assert [b for b, _ in Q.layer_bits(layer)["groups"]] == [8, 4, 2]
        errs[first] = _out_err(W, layer, H)
    # the 2-bit rows' error is spread over the 8- and 4-bit rows: far less of it is left
    assert errs[True] < 0.8 * errs[False]


# ----------------------------------------------------------------------------- peer grids
def test_layer_on_given_grids():
    K, N, gs, bits = 128, 16, 32, 3
    lin = _linear(K, N, seed=10)
    W = lin.weight.detach().t().double()
    Wg = W.reshape(K // gs, gs, N)
    lo, hi = Wg.amin(1), Wg.amax(1)
    scales = ((hi - lo) / 7 * 0.9).half()  # a grid of its own (e.g. HQQ's): 10 % clipped
    zeros = (-lo * 0.9).half()
    layer = Q.quantize_with_grids(lin, bits, gs, scales, zeros)
    assert torch.equal(layer.scales, scales) and torch.equal(layer.zeros, zeros)
    deq = _ref_weight(layer).reshape(K // gs, gs, N)
    s, z = scales.double()[:, None], zeros.double()[:, None]
    codes = torch.clamp(torch.round((Wg + z) / s), 0, 7)
    assert torch.allclose(deq, (codes * s - z).half().double())
    with pytest.raises(ValueError, match=r"scales and zeros must have shape \[4, 16\]"):
        Q.quantize_with_grids(lin, bits, gs, scales[:3], zeros)


# ----------------------------------------------------------------------------- the table
def test_uniform_layouts_fit_the_budget():
    assert ML.uniform_layouts(4.25) == [(4, 128), (3, 32)]
    assert ML.uniform_layouts(4.0) == [(3, 32), (2, 32)]
    assert ML.uniform_layouts(3.25) == [(3, 128), (2, 32)]
    assert ML.uniform_layouts(3.0) == [(2, 32)]
    assert ML.uniform_layouts(2.5) == [(2, 64)]
    for budget in (2.5, 3.0, 3.3, 5.0, 8.5):
        for b, gs in ML.uniform_layouts(budget):
            assert b + 32 / gs <= budget


def test_quality_table_format_has_every_method_as_a_row():
    rows = [{"method": m, "budget": b, "layout": lay, "cos_mean": c, "cos_min": c - 0.1,
             "bpw": b, "seconds": t}
            for m, lay, c, t in (("RTN, min/max grid (before)", "4-bit g128", 0.9, 0.5),
                                 ("GPTQ mixed (allocated)", "mixed", 0.95, 12.0))
            for b in (4.25, 3.0)]
    layers = {"bits": 3, "group_size": 128, "methods": ["RTN MSE", "GPTQ"],
              "rows": [{"layer": "attention.self.query", "RTN MSE": 0.01, "GPTQ": 0.005}]}
    text = ML.format_quality({"model": "m", "sentences": 32, "device": "cpu",
                              "dtype": "float32", "rows": rows, "layers": layers})
    assert "| method | 4.25 bpw | 3 bpw | s |" in text
    assert "| RTN, min/max grid (before) | 0.9000 (4b g128) | 0.9000 (4b g128) | 0.5 |" in text
    assert "| GPTQ mixed (allocated) | 0.9500 | 0.9500 | 12.0 |" in text
    assert "| attention.self.query | 1.00e-02 | 5.00e-03 |" in text
