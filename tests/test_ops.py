"""torch.ops.mbwq.gemm / dequant against the independent reference (mbwq_ops.reference), over
random valid layers (hypothesis), plus opcheck and the autograd formula.

Tolerances: dequant is bit-exact fp16; a gemm result in dtype d must satisfy
|y - ref| <= tolerance(d) * (|ref| + S), S = reference.error_scale (the size of the terms).
"""
import pytest
import torch
from hypothesis import given, strategies as st

import mbwq_ops
from mbwq_ops import MBWQLinear, reference
from mbwq_ops import format as fmt

from layers import LayerSpec, device_params, error_bound, make_layer, reference_weight, tolerance
from strategies import M_VALUES, dtypes_for, layer_specs, random_x


def weight_args(layer):
    return layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm


def assert_close_to_reference(y, x, W, channel_scale, bias, what=""):
    ref = reference.gemm_reference(x, W, channel_scale, bias)
    S = reference.error_scale(x, W, channel_scale, bias)
    err = (y.detach().cpu().double() - ref).abs()
    bound = error_bound(y.dtype, ref, S)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off; worst "
                           f"{(err / (ref.abs() + S)).max().item():.3g} of |ref|+S "
                           f"(tolerance {tolerance(y.dtype):.3g})")


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("device", device_params())
@given(spec=layer_specs())
def test_dequant_equals_reference(device, spec):
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    got = mbwq_ops.dequant(*weight_args(layer))
    assert got.dtype == torch.float16 and got.shape == (spec.in_features, spec.out_features)
    assert got.device.type == device
    assert torch.equal(got.cpu(), W)  # bit-exact fp16
    for dt in (torch.float32, torch.bfloat16):  # other dtypes: the fp16 values converted
        assert torch.equal(mbwq_ops.dequant(*weight_args(layer), dt).cpu(), W.to(dt))
    # the original's static dequantizers give the same W
    if spec.use_mbw:
        W2 = MBWQLinear.exl2fp_weight(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                                      layer.q_group_map, layer.rows)
    else:
        W2 = MBWQLinear.q42fp_weight(layer.qweight, layer.scales, layer.zeros, spec.group_size,
                                     spec.w_bit, layer.q_perm)
    assert torch.equal(W2.cpu(), W)


@pytest.mark.parametrize("device", device_params())
@given(spec=layer_specs(), M=st.sampled_from(M_VALUES), data=st.data(),
       use_cs=st.booleans())
def test_gemm_equals_reference(device, spec, M, data, use_cs):
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    x = random_x((M, spec.in_features), dtype, spec.seed + 1, device)
    cs = t["channel_scale"].reshape(-1) if use_cs else None
    bias = t.get("bias")
    y = mbwq_ops.gemm(x, *weight_args(layer), cs, bias)
    assert y.dtype == dtype and y.shape == (M, spec.out_features) and y.device.type == device
    assert_close_to_reference(y, x, W, cs, bias, "gemm")
    # deterministic: the same call gives the same bits
    assert torch.equal(mbwq_ops.gemm(x, *weight_args(layer), cs, bias), y)


@pytest.mark.parametrize("device", device_params())
@given(spec=layer_specs(max_k_blocks=64), M=st.sampled_from(M_VALUES), data=st.data(),
       lead=st.sampled_from(["2d", "3d", "1d"]))
def test_forward_equals_reference(device, spec, M, data, lead):
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    K, N = spec.in_features, spec.out_features
    shape = {"2d": (M, K), "3d": (2, M, K), "1d": (K,)}[lead]
    x = random_x(shape, dtype, spec.seed + 2, device)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], N) and y.device.type == device
    assert_close_to_reference(y.reshape(-1, N), x.reshape(-1, K), W, t["channel_scale"],
                              t.get("bias"), "forward")


@pytest.mark.parametrize("device", device_params())
@given(spec=layer_specs(max_k_blocks=32, max_n=40), M=st.sampled_from((1, 3, 17)), data=st.data())
def test_grad_x_equals_reference(device, spec, M, data):
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t).double()
    x = random_x((M, spec.in_features), dtype, spec.seed + 3, device).requires_grad_()
    g = random_x((M, spec.out_features), dtype, spec.seed + 4, device)
    layer(x).backward(g)
    assert x.grad.dtype == dtype and x.grad.shape == x.shape
    # y = (x * cs) @ W  =>  dL/dx = (g @ W^T) * cs
    cs = t["channel_scale"].reshape(-1).cpu().double()
    ref = (g.cpu().double() @ W.t()) * cs
    S = (g.cpu().double().abs() @ W.abs().t()) * cs.abs()
    err = (x.grad.cpu().double() - ref).abs()
    assert (err <= error_bound(dtype, ref, S)).all(), (err / (ref.abs() + S)).max()
    # buffers get no gradient and stay out of autograd
    assert all(not b.requires_grad for b in layer.buffers())


# ----------------------------------------------------------------------------- fixed cases
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("widths", [(8, 2), (6, 5, 3), (8, 6, 5, 4, 3, 2), (5,), (3,), (6,), (8, 3)])
def test_any_width_combination(device, widths):
    # the original fused only 21 width sets (and refused e.g. {8, 2} for M <= 32)
    rows = [64] * len(widths)
    spec = LayerSpec(64 * len(widths), 20, True, widths, rows, seed=len(widths))
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    assert torch.equal(layer.dequantized_weight().cpu(), W)
    for M in (1, 7, 33):
        x = random_x((M, spec.in_features), torch.float16, M, device)
        assert_close_to_reference(layer(x), x, W, t["channel_scale"], None, f"widths {widths} M {M}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("w_bit,gs", [(4, 96), (2, 96), (4, 160), (2, 160), (4, 224)])
def test_uniform_group_sizes_the_original_got_wrong(device, w_bit, gs):
    spec = LayerSpec(512, 36, False, w_bit=w_bit, group_size=gs, seed=gs + w_bit)
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    assert t["scales"].shape[0] == -(-512 // gs)
    assert torch.equal(layer.dequantized_weight().cpu(), W)
    x = random_x((5, 512), torch.float16, 0, device)
    assert_close_to_reference(layer(x), x, W, t["channel_scale"], None, f"gs {gs}")


@pytest.mark.parametrize("device", device_params())
def test_large_k_uint16_perm(device):
    # K = 40960: q_perm entries >= 32768 are negative in the int16 buffer (read as uint16)
    spec = LayerSpec(40960, 4, True, (4, 3, 2), (8192, 16384, 16384), seed=7)
    layer, t = make_layer(spec, device)
    assert int(t["q_perm"].min()) < 0
    W = reference_weight(spec, t)
    assert torch.equal(layer.dequantized_weight().cpu(), W)
    x = random_x((2, 40960), torch.float16, 1, device)
    assert_close_to_reference(layer(x), x, W, t["channel_scale"], None, "K=40960")


# ----------------------------------------------------------------------------- opcheck
def opcheck_layers(device):
    specs = [
        LayerSpec(256, 20, True, (8, 4, 3), (64, 96, 96), bias=True, seed=1),
        LayerSpec(128, 9, False, w_bit=4, group_size=96, perm="zeros", seed=2),
        LayerSpec(96, 5, True, (6, 5, 2), (32, 32, 32), perm="identity", seed=3),
        LayerSpec(192, 12, False, w_bit=2, group_size=64, bias=True, seed=4),
    ]
    return [(spec, *make_layer(spec, device)) for spec in specs]


@pytest.mark.parametrize("device", device_params())
def test_opcheck_gemm(device):
    samples = []
    for i, (spec, layer, t) in enumerate(opcheck_layers(device)):
        for j, (M, dtype) in enumerate([(3, torch.float16), (0, torch.bfloat16), (17, torch.float16),
                                        (1, dtypes_for(device)[-1])]):
            x = random_x((M, spec.in_features), dtype, i * 10 + j, device)
            cs = t["channel_scale"].reshape(-1) if j % 2 == 0 else None
            bias = t.get("bias") if j < 2 else None
            samples.append(((x.requires_grad_(j != 1),) + weight_args(layer) + (cs, bias)))
    assert len(samples) >= 8
    for args in samples:
        torch.library.opcheck(torch.ops.mbwq.gemm.default, args)


@pytest.mark.parametrize("device", device_params())
def test_opcheck_dequant(device):
    samples = []
    for spec, layer, t in opcheck_layers(device):
        for dtype in (torch.float16, torch.float32, torch.bfloat16):
            samples.append(weight_args(layer) + (dtype,))
    for args in samples:
        torch.library.opcheck(torch.ops.mbwq.dequant.default, args)


def test_fake_kernels_compute_shapes_without_values():
    spec = LayerSpec(256, 20, True, (8, 4, 3), (64, 96, 96), seed=1)
    layer, t = make_layer(spec)
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        args = [mode.from_tensor(a) for a in weight_args(layer)]
        x = mode.from_tensor(torch.randn(7, 256).bfloat16())
        y = torch.ops.mbwq.gemm(x, *args, None, None)
        W = torch.ops.mbwq.dequant(*args, torch.float32)
    assert y.shape == (7, 20) and y.dtype == torch.bfloat16
    assert W.shape == (256, 20) and W.dtype == torch.float32


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("use_mbw", [False, True], ids=["uniform", "mixed"])
def test_dequant_single_rounding(device, use_mbw):
    # code * scale lands on (or next to) an fp16 half-way point and |zero| is tiny: rounding
    # code*scale - zero once (as the original's fp16 FMA does) differs from rounding it to
    # float32 first. FORMAT.md §9.
    spec = (LayerSpec(256, 8, True, (8, 6, 5, 3), (64, 64, 64, 64), perm="identity", seed=41) if use_mbw
            else LayerSpec(256, 8, False, w_bit=4, group_size=64, perm="zeros", seed=41))
    t = {k: v.cpu() for k, v in make_layer(spec)[1].items()}
    G = t["scales"].shape[0]
    scale = torch.tensor([1 + 2.0 ** -10, 1 + 3 * 2.0 ** -10, 0.5 + 2.0 ** -11, 3 * 2.0 ** -4 + 2.0 ** -13])
    t["scales"] = scale.repeat(2).view(1, 8).expand(G, 8).half().contiguous()
    t["zeros"] = torch.tensor([2.0 ** -24, -(2.0 ** -24)] * 4).view(1, 8).expand(G, 8).half().contiguous()
    layer = MBWQLinear(256, 8, w_bit=spec.w_bit, group_size=spec.group_size, use_mbw=use_mbw,
                       groups=G, rows_packed=t["qweight"].shape[0]).to(device)
    layer.load_state_dict(t)
    layer.prepare_params()
    W = reference_weight(spec, t)
    assert torch.equal(mbwq_ops.dequant(*weight_args(layer)).cpu(), W)
    # the case has teeth: a float32 computation rounds some of these values differently
    groups = (fmt.mixed_groups(spec.widths, spec.group_rows) if use_mbw
              else fmt.uniform_groups(256, 4, 64))
    codes = torch.cat([fmt.unpack_codes(t["qweight"][g.start:g.start + g.packed_rows], g.bits)
                       for g in groups]).float()
    naive = (codes * t["scales"][:1].float() - t["zeros"][:1].float()).half()
    assert (naive != W).any()
