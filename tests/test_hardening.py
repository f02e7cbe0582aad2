"""Regression tests for hostile but legal inputs at the op and layer boundary, one per
finding: non-contiguous x, large finite and infinite activations on the small-M path, stale
kernel tables after in-place edits, non-finite stored scales / zeros. (Hostile block tables and
perms, and random layouts / magnitudes in bulk: tests/test_fuzz.py.)"""
import math

import pytest
import torch

import mbwq_ops
from mbwq_ops import reference

from layers import LayerSpec, device_params, make_layer, reference_weight


def quantized(K=256, N=64, bits=4, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(K, N)
    return mbwq_ops.quantize_linear(lin, bits=bits, group_size=128, method="rtn")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40])
def test_transposed_expanded_and_sliced_x_equal_their_contiguous_copies(device, M):
    q = quantized().to(device)
    g = torch.Generator().manual_seed(M)
    views = {
        "transposed": torch.randn(256, M, generator=g).to(device).t(),
        "expanded": torch.randn(1, 256, generator=g).to(device).expand(M, 256),
        "sliced": torch.randn(M, 512, generator=g).to(device)[:, ::2],
    }
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16, torch.bfloat16)
    for name, v in views.items():
        for dt in dtypes:
            x = v.to(dt)
            assert torch.equal(q(x), q(x.contiguous())), (name, dt)


def test_transposed_x_under_torch_compile():
    q = quantized()
    x = torch.randn(256, 4).t()
    cq = torch.compile(q, fullgraph=True)
    assert torch.equal(cq(x), q(x.contiguous()))


def test_expanded_x_with_large_k_does_not_crash():
    q = quantized(K=8192, N=16)
    x = torch.randn(1, 8192).expand(12, 8192)  # stride 0 over 12 rows
    y = q(x)
    assert torch.equal(y, q(x.contiguous())) and torch.equal(y[0], y[11])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_finite_x_stays_finite_on_every_path(device, dtype):
    """x ~ 1e37: the true product fits in fp32; the small-M path used to form s*sum(x*c) and
    overflow to -inf while the large-M path was finite."""
    # (fp32 x runs the dequant + cuBLAS path on CUDA: it too must stay finite)
    spec = LayerSpec(128, 24, True, [8, 4, 2], [32, 32, 64], seed=3)
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    for M in (1, 3, 16, 17, 64, 100):
        x = (torch.randn(M, 128, dtype=torch.float64) * 1e36).to(dtype).to(device)
        y = layer(x)
        ref = reference.gemm_reference(x, W, t["channel_scale"].reshape(-1))
        S = reference.error_scale(x, W, t["channel_scale"].reshape(-1))
        assert bool((S < torch.finfo(torch.float32).max / 4).all())  # the test's own premise
        assert torch.isfinite(y).all(), f"M={M}: non-finite output for a finite product"
        rel = ((y.double().cpu() - ref).abs() / (ref.abs() + S)).max()
        assert rel < 2.0 ** -6, f"M={M}: relative error {rel}"


@pytest.mark.parametrize("device", device_params())
def test_an_infinite_x_gives_infinities_not_nan(device):
    """One +inf in a row: products with non-zero weights are +-inf, and the reference gives
    +-inf per output (NaN only where both signs meet or a weight is exactly 0)."""
    spec = LayerSpec(64, 16, True, [4], [64], perm="identity", seed=11)
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    for M in (1, 4, 40, 300):
        x = torch.randn(M, 64).half().to(device)
        x[0, 5] = math.inf
        y = layer(x)
        ref = reference.gemm_reference(x, W, t["channel_scale"].reshape(-1))
        assert torch.isinf(ref[0]).any()
        got = y.double().cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), f"M={M}: NaN pattern differs"
        inf = torch.isinf(ref)
        assert torch.equal(got[inf], ref[inf]), f"M={M}"


@pytest.mark.parametrize("name", ["q_perm", "q_groups", "qweight", "scales", "zeros"])
def test_in_place_edit_after_prepare_is_refused_until_prepared_again(name):
    q = mbwq_ops.quantize_linear(torch.nn.Linear(128, 32), bits=3.0, group_size=32)
    x = torch.randn(3, 128)
    before = q(x)
    with torch.no_grad():
        t = getattr(q, name)
        if name == "q_perm":  # still a permutation: swap two entries
            a, b = t[0].clone(), t[1].clone()
            t[0], t[1] = b, a
        else:
            t.copy_(t.clone())  # same values: the version counter still moves
    with pytest.raises(RuntimeError, match=f"{name} changed in place after prepare_params"):
        q(x)
    with pytest.raises(RuntimeError, match="prepare_params"):
        q.dequantized_weight()
    q.prepare_params()
    after = q(x)
    if name != "q_perm":
        assert torch.equal(after, before)
    else:  # the new order is what the tables use now: equal to the reference of the new state
        W = q.dequantized_weight(torch.float32)
        expect = (x * q.channel_scale.reshape(-1).float()) @ W + q.bias.float()
        assert torch.allclose(after, expect, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(before, expect, rtol=1e-3, atol=1e-3)
    sd = q.state_dict()
    assert torch.equal(sd[name], getattr(q, name))


def test_moving_a_prepared_layer_keeps_it_prepared_and_a_stale_one_stale():
    q = mbwq_ops.quantize_linear(torch.nn.Linear(128, 32), bits=4, group_size=64)
    q.to(torch.bfloat16)  # a move: new tensors, new version counters, still valid tables
    q(torch.randn(2, 128, dtype=torch.bfloat16))
    with torch.no_grad():
        q.q_perm.add_(0)
    q.to(torch.float32)
    with pytest.raises(RuntimeError, match="prepare_params"):
        q(torch.randn(2, 128))


@pytest.mark.parametrize("name", ["scales", "zeros"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scales_or_zeros_rejected_at_prepare(name, bad):
    q = quantized(K=128, N=16)
    with torch.no_grad():
        getattr(q, name)[0, 7] = bad
    with pytest.raises(ValueError, match=rf"{name} must be finite, got {bad} at {name}\[0, 7\]"):
        q.prepare_params()
    model = torch.nn.Sequential(q)
    with pytest.raises(ValueError, match=rf"layer 0: {name} must be finite"):
        mbwq_ops.prepare_model(model)


def test_deep_copies_and_pickles_of_a_prepared_layer_stay_prepared():
    import copy
    import io
    q = mbwq_ops.quantize_linear(torch.nn.Linear(128, 32), bits=3.0, group_size=32)
    x = torch.randn(2, 128)
    twin = copy.deepcopy(q)
    assert torch.equal(twin(x), q(x))
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert torch.equal(loaded(x), q(x))
    with torch.no_grad():
        twin.q_perm.add_(0)  # the copy's own counters are still watched
    with pytest.raises(RuntimeError, match="q_perm changed in place"):
        twin(x)
