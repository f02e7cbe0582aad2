"""MBWQLinear's module API (issue §3): constructor, buffers, load/save, preparation, static
dequantizers, attribute assignment, dtype/device moves and nesting in a parent model."""
import copy
import inspect
import io

import pytest
import torch
from hypothesis import given
from torch import nn

from mbwq_ops import MBWQLinear, MBWQLinearCuda, prepare_model, reference
from mbwq_ops import format as fmt

from layers import LayerSpec, build, device_params, error_bound, make_layer, reference_weight
from strategies import layer_specs, random_x

STORED = {"qweight", "scales", "zeros", "q_perm", "channel_scale", "q_groups", "bias"}
MIXED = LayerSpec(256, 24, True, (8, 4, 3), (64, 96, 96), bias=True, seed=11)
UNIFORM = LayerSpec(320, 13, False, w_bit=2, group_size=96, perm="zeros", seed=12)


def assert_forward_matches(layer, spec, t, x, W=None):
    W = reference_weight(spec, t) if W is None else W
    y = layer(x)
    ref = reference.gemm_reference(x.reshape(-1, spec.in_features), W, t["channel_scale"], t.get("bias"))
    S = reference.error_scale(x.reshape(-1, spec.in_features), W, t["channel_scale"], t.get("bias"))
    err = (y.reshape(ref.shape).detach().cpu().double() - ref).abs()
    assert (err <= error_bound(y.dtype, ref, S)).all()
    return y


def new_layer(spec, **kw):
    return MBWQLinear(spec.in_features, spec.out_features, w_bit=spec.w_bit, group_size=spec.group_size,
                      use_mbw=spec.use_mbw, disable_bias=not spec.bias, **kw)


# ----------------------------------------------------------------------------- constructor
def test_constructor_signature_matches_original():
    params = inspect.signature(MBWQLinear.__init__).parameters
    want = dict(a_bit=16, w_bit=4, dtype=torch.half, group_size=-1, use_gba_quant=True,
                dq_group_size=-1, dq_mode=2, disable_bias=True, asym=False, requires_grad=True,
                use_mbw=True, groups=64, rows_packed=64)
    assert list(params)[1:] == ["in_channels", "out_channels", *want]
    for name, default in want.items():
        assert params[name].default == default, name
    assert MBWQLinearCuda is MBWQLinear
    assert issubclass(MBWQLinear, nn.Module)


def test_fresh_mixed_layer_buffers():
    layer = MBWQLinear(128, 12)  # use_mbw=True by default: groups=64, rows_packed=64
    bufs = dict(layer.named_buffers())
    assert tuple(bufs["qweight"].shape) == (64, 12) and bufs["qweight"].dtype == torch.int32
    for k in ("scales", "zeros"):
        assert tuple(bufs[k].shape) == (64, 12) and bufs[k].dtype == torch.float16
    assert tuple(bufs["q_groups"].shape) == (128,) and bufs["q_groups"].dtype == torch.int16
    assert tuple(bufs["q_perm"].shape) == (128,) and bufs["q_perm"].dtype == torch.int16
    assert tuple(bufs["channel_scale"].shape) == (1, 1, 128)
    assert bufs["channel_scale"].dtype == torch.float16
    # fresh-layer defaults (FORMAT.md §2.2)
    assert not layer.q_perm.any() and bool((layer.channel_scale == 1).all())
    assert bool((layer.scales == 1).all()) and not layer.zeros.any()
    assert layer.bias is None and "bias" not in layer.state_dict()
    assert set(layer.state_dict()) == STORED - {"bias"}
    assert layer.rows == [0] * 7


def test_fresh_uniform_layer_buffers():
    layer = MBWQLinear(320, 12, w_bit=2, group_size=96, use_mbw=False, disable_bias=False)
    sd = layer.state_dict()
    assert set(sd) == STORED - {"q_groups"}
    assert tuple(sd["qweight"].shape) == (20, 12)  # K * w_bit / 32
    assert tuple(sd["scales"].shape) == (4, 12)  # ceil(320 / 96)
    assert tuple(sd["bias"].shape) == (12,) and sd["bias"].dtype == torch.float16
    assert MBWQLinear(256, 8, use_mbw=False).scales.shape == (1, 8)  # group_size -1 = K


def test_constructor_accepts_original_arguments():
    # green-bit-llm's construction: dq_group_size=32, dq_mode=2, groups/rows_packed from strategy
    layer = MBWQLinear(256, 24, a_bit=16, w_bit=8, dtype=torch.half, group_size=64,
                       use_gba_quant=True, dq_group_size=32, dq_mode=2, disable_bias=False,
                       asym=False, requires_grad=False, use_mbw=True, groups=3, rows_packed=37)
    t = build(MIXED)
    layer.load_state_dict(t)
    layer.prepare_params()
    assert_forward_matches(layer, MIXED, t, random_x((3, 256), torch.float16, 0))


# ----------------------------------------------------------------------------- prepare / dequant
@pytest.mark.parametrize("device", device_params())
def test_prepare_rows_group_map_and_exl2fp(device):
    layer, t = make_layer(MIXED, device)
    assert layer.rows == [64, 64, 64, 160, 256, 256, 0b10001100]
    assert layer.q_group_map is not None
    gm = layer.q_group_map.cpu().view(-1, 2).tolist()
    assert gm[0] == [0, 64] and gm[64] == [1, 96] and gm[255] == [2, 1]
    W = MBWQLinear.exl2fp_weight(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                                 layer.q_group_map, layer.rows)
    assert W.dtype == torch.float16 and W.shape == (256, 24)
    assert torch.equal(W.cpu(), reference_weight(MIXED, t))
    # layer(x) == (x * channel_scale) @ W + bias, with the W the static method gave
    x = random_x((5, 256), torch.float16, 1, device)
    assert_forward_matches(layer, MIXED, t, x, W=W.cpu())


@pytest.mark.parametrize("device", device_params())
def test_uniform_q42fp_and_zero_perm_identity(device):
    layer, t = make_layer(UNIFORM, device)
    assert layer.rows == [0] * 7
    W = MBWQLinear.q42fp_weight(layer.qweight, layer.scales, layer.zeros, 96, 2, layer.q_perm)
    assert torch.equal(W.cpu(), reference_weight(UNIFORM, t))
    # all-zero q_perm = identity = explicit arange
    W2 = MBWQLinear.q42fp_weight(layer.qweight, layer.scales, layer.zeros, 96, 2,
                                 torch.arange(320, dtype=torch.int16, device=device))
    assert torch.equal(W, W2)
    assert_forward_matches(layer, UNIFORM, t, random_x((4, 320), torch.float16, 2, device), W=W.cpu())


def test_check_parameters():
    layer, t = make_layer(MIXED)
    layer.check_parameters()  # a valid layer passes
    layer.q_perm = torch.zeros(256, dtype=torch.int16)
    with pytest.raises(ValueError, match="q_perm"):
        layer.check_parameters()


def test_prepare_params_twice_is_harmless():
    layer, t = make_layer(MIXED)
    x = random_x((3, 256), torch.float16, 3)
    y = layer(x)
    layer.prepare_params()
    assert torch.equal(layer(x), y)
    assert layer.rows == [64, 64, 64, 160, 256, 256, 0b10001100]


def test_forward_requires_prepare():
    layer = new_layer(MIXED, groups=3, rows_packed=37)
    layer.load_state_dict(build(MIXED))
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(torch.ones(1, 256, dtype=torch.half))


# ----------------------------------------------------------------------------- setters / attributes
def test_setters_and_attribute_assignment_invalidate_preparation():
    layer, t = make_layer(MIXED)
    x = random_x((3, 256), torch.float16, 4)
    y_old = layer(x)
    # a new permutation through plain attribute assignment
    new_perm = torch.randperm(256, generator=torch.Generator().manual_seed(5)).to(torch.int16)
    layer.q_perm = new_perm
    assert layer.q_perm is new_perm and "q_perm" in dict(layer.named_buffers())
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(x)
    layer.prepare_params()
    t2 = dict(t, q_perm=new_perm)
    y_new = assert_forward_matches(layer, MIXED, t2, x)
    assert not torch.equal(y_new, y_old)
    # a whole new layout through the setters and q_groups assignment (other group count)
    spec = LayerSpec(256, 24, True, (6, 5, 2, 2), (32, 96, 64, 64), bias=True, seed=13)
    t3 = build(spec)
    layer.set_qweight_data(t3["qweight"])
    layer.set_scales(t3["scales"])
    layer.set_zeros(t3["zeros"])
    layer.q_groups = t3["q_groups"]
    layer.q_perm = t3["q_perm"]
    layer.channel_scale = t3["channel_scale"]
    layer.bias = t3["bias"]
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(x)
    layer.prepare_params()
    assert layer.rows == fmt.rows_list(fmt.mixed_groups(spec.widths, spec.group_rows))
    assert_forward_matches(layer, spec, t3, x)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in t3.items())


def test_setters_reject_wrong_dtype():
    layer, t = make_layer(MIXED)
    with pytest.raises(ValueError, match="qweight must be torch.int32.*got torch.int64"):
        layer.set_qweight_data(t["qweight"].long())
    with pytest.raises(ValueError, match="scales must be torch.float16.*got torch.float32"):
        layer.set_scales(t["scales"].float())
    with pytest.raises(ValueError, match="zeros must be torch.float16.*got torch.bfloat16"):
        layer.set_zeros(t["zeros"].bfloat16())


# ----------------------------------------------------------------------------- state dict
@pytest.mark.parametrize("spec", [MIXED, UNIFORM], ids=["mixed", "uniform"])
def test_state_dict_round_trip(spec):
    t = build(spec)
    layer = new_layer(spec)  # default groups/rows_packed: the checkpoint's shapes replace them
    layer.load_state_dict(t)
    layer.prepare_params()
    sd = layer.state_dict()
    assert set(sd) == set(t)
    for k in t:
        assert sd[k].dtype == t[k].dtype and torch.equal(sd[k], t[k]), k
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = new_layer(spec)
    fresh.load_state_dict(torch.load(buf))
    fresh.prepare_params()
    x = random_x((6, spec.in_features), torch.float16, 6)
    assert torch.equal(fresh(x), layer(x))


@given(spec=layer_specs(max_k_blocks=32, max_n=24))
def test_state_dict_round_trip_random_layers(spec):
    t = build(spec)
    layer = new_layer(spec)  # constructor defaults; every checkpoint shape replaces them
    layer.load_state_dict(t)
    layer.prepare_params()
    sd = layer.state_dict()
    assert set(sd) == set(t) and all(sd[k].dtype == t[k].dtype and torch.equal(sd[k], t[k]) for k in t)
    fresh = new_layer(spec)
    fresh.load_state_dict({k: v.clone() for k, v in sd.items()})
    fresh.prepare_params()
    assert fresh.rows == layer.rows
    x = random_x((3, spec.in_features), torch.float16, spec.seed)
    assert torch.equal(fresh(x), layer(x))
    assert_forward_matches(fresh, spec, t, x)


def test_load_missing_keys_keep_values_and_strict_false():
    t = build(MIXED)
    layer = new_layer(MIXED)
    partial = {k: v for k, v in t.items() if k not in ("channel_scale", "bias")}
    layer.load_state_dict(partial)  # missing keys are fine
    assert bool((layer.channel_scale == 1).all()) and not layer.bias.any()
    res = layer.load_state_dict(dict(t, extra_key=torch.ones(2)), strict=False)
    assert list(res.unexpected_keys) == ["extra_key"]
    layer.prepare_params()
    assert_forward_matches(layer, MIXED, t, random_x((2, 256), torch.float16, 7))


def test_load_into_prepared_layer_needs_prepare_again():
    layer, t = make_layer(MIXED)
    t2 = build(LayerSpec(256, 24, True, (4, 2), (128, 128), bias=True, seed=14))
    layer.load_state_dict(t2)
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(torch.ones(1, 256, dtype=torch.half))


class Parent(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.proj = nn.Linear(8, spec.in_features).half()
        self.q = new_layer(spec)  # default shapes (groups=64, rows_packed=64)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.q(self.proj(x)))


def test_nested_model_load_state_dict():
    t = build(MIXED)
    src = Parent(MIXED)
    sd = {"proj.weight": torch.randn(256, 8).half(), "proj.bias": torch.randn(256).half()}
    sd.update({"q." + k: v for k, v in t.items()})
    # legacy buffers of the original are accepted and dropped
    sd["q.g_idx"] = torch.zeros(256, dtype=torch.int32)
    sd["q.wf"] = torch.arange(0, 32, 4, dtype=torch.int32).view(1, -1)
    sd["q.qscales_scales"] = torch.ones(1, 1, 1).half()
    res = src.load_state_dict(sd)
    assert not res.missing_keys and not res.unexpected_keys
    src.q.prepare_params()
    assert src.q.qweight.shape == t["qweight"].shape
    assert torch.equal(src.q.dequantized_weight(), reference_weight(MIXED, t))
    # the parent's state_dict holds the stored format and reloads
    out = src.state_dict()
    assert {k for k in out if k.startswith("q.")} == {"q." + k for k in t}
    dst = Parent(MIXED)
    dst.load_state_dict(out)
    with pytest.raises(RuntimeError, match=r"mbwq_ops.prepare_model\(model\)"):
        dst(torch.randn(3, 8).half())
    assert prepare_model(dst) is dst
    x = torch.randn(3, 8).half()
    assert torch.equal(dst(x), src(x))
    with pytest.raises(RuntimeError, match="q.unknown"):
        Parent(MIXED).load_state_dict(dict(out, **{"q.unknown": torch.ones(1)}))


def test_prepare_model_names_the_bad_layer():
    t = build(MIXED)
    model = Parent(MIXED)
    model.load_state_dict({"proj.weight": torch.randn(256, 8).half(),
                           "proj.bias": torch.randn(256).half(),
                           **{"q." + k: v for k, v in t.items()}})
    with torch.no_grad():
        model.q.q_perm[5] = model.q.q_perm[6]  # in place: not caught at load time
    with pytest.raises(ValueError, match="layer q: q_perm is not a permutation"):
        prepare_model(model)


def test_prepare_model_needs_mbwq_layers():
    with pytest.raises(ValueError, match="prepare_model: Sequential has no MBWQLinear layer"):
        prepare_model(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="prepare_model needs an nn.Module, got str"):
        prepare_model("model")


def test_nested_load_rejects_wrong_dtype():
    t = build(MIXED)
    sd = {"proj.weight": torch.randn(256, 8).half(), "proj.bias": torch.randn(256).half()}
    sd.update({"q." + k: v for k, v in t.items()})
    sd["q.channel_scale"] = sd["q.channel_scale"].float()
    with pytest.raises(ValueError, match="channel_scale must be torch.float16.*torch.float32"):
        Parent(MIXED).load_state_dict(sd)


# ----------------------------------------------------------------------------- dtype / device
@pytest.mark.parametrize("device", device_params())
def test_bfloat16_and_to_keep_stored_tensors(device):
    layer, t = make_layer(MIXED)  # prepared on the CPU
    model = nn.Sequential(layer, nn.Linear(24, 4)).to(device).bfloat16()
    assert model[1].weight.dtype == torch.bfloat16
    for k, v in layer.state_dict().items():
        assert v.dtype == t[k].dtype and v.device.type == device, k
        assert torch.equal(v.cpu(), t[k]), k
    x = random_x((3, 256), torch.bfloat16, 8, device)
    y = assert_forward_matches(layer, MIXED, t, x)
    assert y.dtype == torch.bfloat16 and y.device.type == device
    assert model(x).dtype == torch.bfloat16
    layer.to(torch.float32).half()
    assert all(v.dtype == t[k].dtype for k, v in layer.state_dict().items())
    assert layer.to("cpu")(x.cpu()).device.type == "cpu"


def test_forward_dtypes_and_shapes_cpu():
    layer, t = make_layer(MIXED)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for shape in ((5, 256), (2, 3, 256), (256,), (0, 256), (2, 0, 256)):
            x = random_x(shape, dtype, len(shape))
            y = assert_forward_matches(layer, MIXED, t, x)
            assert y.shape == (*shape[:-1], 24) and y.dtype == dtype


@pytest.mark.parametrize("device", device_params())
def test_forward_non_contiguous_input(device):
    layer, t = make_layer(MIXED, device)
    base = random_x((256, 10), torch.float16, 9, device)
    x = base.t()  # [10, 256], strides (1, 10)
    assert not x.is_contiguous()
    assert torch.equal(layer(x), layer(x.contiguous()))
    sliced = random_x((4, 512), torch.float16, 10, device)[:, ::2]
    assert torch.equal(layer(sliced), layer(sliced.contiguous()))
    assert_forward_matches(layer, MIXED, t, sliced)


def test_deepcopy_and_buffers_without_grad():
    layer, t = make_layer(MIXED)
    clone = copy.deepcopy(layer)
    x = random_x((3, 256), torch.float16, 11)
    assert torch.equal(clone(x), layer(x))
    assert not list(layer.parameters())
    assert "mixed" in repr(layer) and "in_channels=256" in repr(layer)
