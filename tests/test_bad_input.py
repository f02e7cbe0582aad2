"""Bad input (issue §3): every case raises the documented exception with a message that names
the problem. Malformed layers fail in the constructor, load_state_dict() or prepare_params()
with ValueError (unknown keys: KeyError) before any kernel runs; bad calls of the ops fail with
RuntimeError from the C++ wrapper and, identically, from the fake kernel under FakeTensorMode."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mbwq_ops
from mbwq_ops import MBWQLinear

from layers import LayerSpec, build, device_params, make_layer

MIXED = LayerSpec(256, 12, True, (8, 4, 3), (64, 96, 96), bias=True, seed=21)  # q_groups [8,0,4,16,3,28]
UNIFORM = LayerSpec(256, 12, False, w_bit=4, group_size=64, perm="random", seed=22)


def i16(*v):
    return torch.tensor(v, dtype=torch.int16)


# ----------------------------------------------------------------------------- constructor
@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=100, out_channels=8), "in_features must be a positive multiple of 32.*got 100"),
    (dict(in_channels=0, out_channels=8), "in_features .* got 0"),
    (dict(in_channels=65568, out_channels=8), "at most 65536, got 65568"),
    (dict(in_channels=64.0, out_channels=8), "in_channels must be an int, got 64.0"),
    (dict(in_channels=64, out_channels=0), "out_channels must be positive, got 0"),
    (dict(in_channels=64, out_channels=1.5), "out_channels must be an int, got 1.5"),
    (dict(in_channels=64, out_channels=8, use_mbw=False, w_bit=3), "w_bit must be 4 or 2.*got 3"),
    (dict(in_channels=64, out_channels=8, use_mbw=False, w_bit=8), "w_bit must be 4 or 2.*got 8"),
    (dict(in_channels=64, out_channels=8, w_bit=7), r"w_bit must be one of \(8, 6, 5, 4, 3, 2\), got 7"),
    (dict(in_channels=64, out_channels=8, use_mbw=False, group_size=48), "group_size must be a positive multiple of 32, got 48"),
    (dict(in_channels=64, out_channels=8, use_mbw=False, group_size=0), "group_size .* got 0"),
    (dict(in_channels=64, out_channels=8, a_bit=8), "a_bit must be 16.*got 8"),
    (dict(in_channels=64, out_channels=8, dtype=torch.float32), "dtype must be torch.float16.*got torch.float32"),
    (dict(in_channels=64, out_channels=8, asym=True), "asym=False.*asym=True"),
    (dict(in_channels=64, out_channels=8, use_gba_quant=False), "use_gba_quant=True.*use_gba_quant=False"),
    (dict(in_channels=64, out_channels=8, groups=0), "groups must be positive, got 0"),
    (dict(in_channels=64, out_channels=8, rows_packed=-1), "rows_packed must be positive, got -1"),
])
def test_constructor_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MBWQLinear(**kwargs)


# ----------------------------------------------------------------------------- malformed layers
def load(spec, **changes):
    """Load the spec's stored tensors with ``changes`` applied (None deletes a key), then prepare."""
    sd = build(spec)
    sd.update(changes)
    sd = {k: v for k, v in sd.items() if v is not None}
    layer = MBWQLinear(spec.in_features, spec.out_features, w_bit=spec.w_bit,
                       group_size=spec.group_size, use_mbw=spec.use_mbw,
                       disable_bias=not spec.bias)
    layer.load_state_dict(sd)
    layer.prepare_params()
    return layer


def test_valid_layers_load():  # the baseline every case below changes one thing of
    load(MIXED)
    load(UNIFORM)


T_MIXED = build(MIXED)
T_UNIFORM = build(UNIFORM)
K = 256

MIXED_CASES = {
    "bits 7": (dict(q_groups=i16(7, 0, 4, 16, 3, 28)), "q_groups: group 0 has bits=7"),
    "bits 1": (dict(q_groups=i16(8, 0, 4, 16, 1, 28)), "q_groups: group 2 has bits=1"),
    "bits 0": (dict(q_groups=i16(8, 0, 4, 16, 0, 28)), "q_groups: group 2 has bits=0"),
    "unsorted": (dict(q_groups=i16(4, 0, 8, 12, 3, 28)),
                 r"q_groups: groups must be sorted .* group 0 \(4-bit\) comes before group 1 \(8-bit\)"),
    "unsorted 2 before 3": (dict(q_groups=i16(8, 0, 2, 16, 3, 22)), r"group 1 \(2-bit\) comes before group 2 \(3-bit\)"),
    "first start": (dict(q_groups=i16(8, 8, 4, 16, 3, 28)), "q_groups: group 0 must start at packed row 0, got 8"),
    "not 32 rows": (dict(q_groups=i16(8, 0, 4, 18, 3, 28)),
                    r"q_groups: group 0 \(8-bit\) spans 18 packed rows .* multiple of 8"),
    "descending start": (dict(q_groups=i16(8, 0, 4, 16, 3, 12)), r"q_groups: group 1 \(4-bit\) spans -4 packed rows"),
    "rows vs qweight": (dict(qweight=T_MIXED["qweight"][:36]), "q_groups describe 37 packed rows .* qweight has 36"),
    "too many rows": (dict(q_groups=i16(8, 0, 4, 64)), "leaving 0 for the last group of in_features=256"),
    "odd q_groups": (dict(q_groups=i16(8, 0, 4)), r"q_groups must be 1-D with an even, non-zero length, got shape \(3,\)"),
    "2-D q_groups": (dict(q_groups=i16(8, 0, 4, 16, 3, 28).view(3, 2)), r"q_groups must be 1-D .* got shape \(3, 2\)"),
    "perm all zeros": (dict(q_perm=torch.zeros(K, dtype=torch.int16)),
                       "q_perm is not a permutation of 0..255: feature 0 appears 256 times .*all-zero"),
    "perm duplicate": (dict(q_perm=torch.arange(K).index_fill(0, torch.tensor([9]), 3).to(torch.int16)),
                       "q_perm is not a permutation of 0..255: feature 3 appears 2 times"),
    "perm out of range": (dict(q_perm=torch.arange(1, K + 1).to(torch.int16)),
                          r"q_perm is not a permutation of 0..255: q_perm\[255\] = 256"),
    "perm negative": (dict(q_perm=torch.arange(K).index_fill(0, torch.tensor([4]), -1).to(torch.int16)),
                      r"q_perm\[4\] = 65535"),
    "perm length": (dict(q_perm=torch.arange(128).to(torch.int16)), r"q_perm must have shape \[256\], got \(128,\)"),
    "qweight dtype": (dict(qweight=T_MIXED["qweight"].long()), "qweight must be torch.int32.*got torch.int64"),
    "scales dtype": (dict(scales=T_MIXED["scales"].float()), "scales must be torch.float16.*got torch.float32"),
    "zeros dtype": (dict(zeros=T_MIXED["zeros"].bfloat16()), "zeros must be torch.float16.*got torch.bfloat16"),
    "q_groups dtype": (dict(q_groups=T_MIXED["q_groups"].int()), "q_groups must be torch.int16.*got torch.int32"),
    "q_perm dtype": (dict(q_perm=T_MIXED["q_perm"].long()), "q_perm must be torch.int16.*got torch.int64"),
    "channel_scale dtype": (dict(channel_scale=T_MIXED["channel_scale"].float()), "channel_scale must be torch.float16.*torch.float32"),
    "bias dtype": (dict(bias=T_MIXED["bias"].float()), "bias must be torch.float16.*torch.float32"),
    "scales rows": (dict(scales=T_MIXED["scales"][:2]), r"scales must have shape \[3, 12\] \(3 groups\), got \(2, 12\)"),
    "zeros columns": (dict(zeros=T_MIXED["zeros"][:, :5]), r"zeros must have shape \[3, 12\] \(3 groups\), got \(3, 5\)"),
    "qweight columns": (dict(qweight=T_MIXED["qweight"][:, :11]), r"qweight must have shape \[rows, 12\], got \(37, 11\)"),
    "channel_scale shape": (dict(channel_scale=torch.ones(1, 1, 128).half()), r"channel_scale must have shape \(1, 1, 256\), got \(1, 1, 128\)"),
    "bias shape": (dict(bias=torch.ones(13).half()), r"bias must have shape \(12,\), got \(13,\)"),
}


@pytest.mark.parametrize("case", MIXED_CASES)
def test_malformed_mixed_layer(case):
    changes, match = MIXED_CASES[case]
    with pytest.raises(ValueError, match=match):
        load(MIXED, **changes)


UNIFORM_CASES = {
    "qweight rows": (dict(qweight=T_UNIFORM["qweight"][:16]),
                     r"qweight must have shape \[32, 12\] for 4-bit uniform weights, got \(16, 12\)"),
    "scales rows": (dict(scales=T_UNIFORM["scales"][:3]), r"scales must have shape \[4, 12\] \(4 groups\), got \(3, 12\)"),
    "perm duplicate": (dict(q_perm=torch.ones(K, dtype=torch.int16)), "q_perm is not a permutation of 0..255"),
    "perm partly zero": (dict(q_perm=torch.arange(K).index_fill(0, torch.tensor([7]), 0).to(torch.int16)),
                         "q_perm is not a permutation of 0..255: feature 0 appears 2 times"),
    "qweight dtype": (dict(qweight=T_UNIFORM["qweight"].to(torch.int16)), "qweight must be torch.int32"),
}


@pytest.mark.parametrize("case", UNIFORM_CASES)
def test_malformed_uniform_layer(case):
    changes, match = UNIFORM_CASES[case]
    with pytest.raises(ValueError, match=match):
        load(UNIFORM, **changes)


def test_q_groups_inconsistent_with_in_features():
    # the stored tensors of a K=256 layer in a K=288 layer (q_perm/channel_scale made to fit)
    sd = dict(T_MIXED, q_perm=torch.randperm(288).to(torch.int16), channel_scale=torch.ones(1, 1, 288).half())
    layer = MBWQLinear(288, 12, disable_bias=False)
    with pytest.raises(ValueError, match=r"q_groups describe 40 packed rows \(for in_features=288\) but qweight has 37"):
        layer.load_state_dict(sd)


def test_rejected_at_load_time_not_at_forward():
    layer = MBWQLinear(256, 12, disable_bias=False)
    with pytest.raises(ValueError, match="q_perm"):
        layer.load_state_dict(dict(T_MIXED, q_perm=torch.zeros(K, dtype=torch.int16)))


def test_fresh_mixed_layer_cannot_be_prepared():
    # q_groups of a fresh layer hold no layout (and q_perm is all zeros)
    with pytest.raises(ValueError, match="q_groups: group 0 has bits=0"):
        MBWQLinear(256, 12).prepare_params()


def test_attribute_assignment_is_validated_by_prepare():
    layer, _ = make_layer(MIXED)
    layer.q_groups = i16(4, 0, 8, 12, 3, 28)
    with pytest.raises(ValueError, match="sorted"):
        layer.prepare_params()
    with pytest.raises(RuntimeError, match="prepare_params"):
        layer(torch.ones(1, K, dtype=torch.half))
    layer.q_groups = T_MIXED["q_groups"]
    layer.q_perm = T_MIXED["q_perm"].long()
    with pytest.raises(ValueError, match="q_perm must be torch.int16, got torch.int64"):
        layer.prepare_params()
    with pytest.raises(ValueError, match="q_perm must be torch.int16, got torch.int64"):
        layer.check_parameters()


def test_unknown_keys_raise_key_error():
    layer = MBWQLinear(256, 12, disable_bias=False)
    with pytest.raises(KeyError, match="unexpected keys.*'not_a_buffer'"):
        layer.load_state_dict(dict(T_MIXED, not_a_buffer=torch.ones(1)))
    uniform = MBWQLinear(256, 12, use_mbw=False, group_size=64)
    with pytest.raises(KeyError, match="q_groups"):  # a uniform layer has no q_groups
        uniform.load_state_dict(dict(T_UNIFORM, q_groups=T_MIXED["q_groups"]))


# ----------------------------------------------------------------------------- static dequantizers
def test_static_dequantizers_reject():
    layer, t = make_layer(MIXED)
    args = (layer.qweight, layer.scales, layer.zeros, layer.q_perm)
    with pytest.raises(ValueError, match="rows must have 7 entries"):
        MBWQLinear.exl2fp_weight(*args, layer.q_group_map, layer.rows[:6])
    with pytest.raises(ValueError, match="describe 37 packed rows but qweight has 36"):
        MBWQLinear.exl2fp_weight(layer.qweight[:36], *args[1:], layer.q_group_map, layer.rows)
    with pytest.raises(ValueError, match=r"scales must have one row per group \(3\), got shape \(2, 12\)"):
        MBWQLinear.exl2fp_weight(layer.qweight, layer.scales[:2], layer.zeros[:2], layer.q_perm,
                                 layer.q_group_map, layer.rows)
    with pytest.raises(ValueError, match="q_perm is not a permutation"):
        MBWQLinear.exl2fp_weight(*args[:3], torch.zeros(K, dtype=torch.int16), layer.q_group_map, layer.rows)
    u, tu = make_layer(UNIFORM)
    with pytest.raises(ValueError, match="bits must be 4 or 2 for q42fp_weight, got 3"):
        MBWQLinear.q42fp_weight(u.qweight, u.scales, u.zeros, 64, 3, u.q_perm)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32, got 48"):
        MBWQLinear.q42fp_weight(u.qweight, u.scales, u.zeros, 48, 4, u.q_perm)
    with pytest.raises(ValueError, match=r"scales must have one row per group \(4\), got shape \(2, 12\)"):
        MBWQLinear.q42fp_weight(u.qweight, u.scales[:2], u.zeros[:2], 64, 4, u.q_perm)
    with pytest.raises(ValueError, match="scales and zeros must have qweight's 12 columns"):
        MBWQLinear.q42fp_weight(u.qweight, u.scales, u.zeros[:, :4], 64, 4, u.q_perm)
    with pytest.raises(ValueError, match="scales must be torch.float16"):
        MBWQLinear.q42fp_weight(u.qweight, u.scales.float(), u.zeros, 64, 4, u.q_perm)


# ----------------------------------------------------------------------------- bad x
@pytest.mark.parametrize("device", device_params())
def test_forward_rejects_bad_x(device):
    layer, _ = make_layer(MIXED, device)
    with pytest.raises(ValueError, match=r"input has 255 features \(shape \(2, 255\)\), the layer expects 256"):
        layer(torch.ones(2, 255, dtype=torch.half, device=device))
    with pytest.raises(ValueError, match="input has 1 features"):
        layer(torch.ones(256, 1, dtype=torch.half, device=device))
    with pytest.raises(ValueError, match="feature dimension of 256, got a 0-D tensor"):
        layer(torch.tensor(1.0, dtype=torch.half, device=device))
    for dtype, name in ((torch.float64, "Double"), (torch.int32, "Int"), (torch.float8_e4m3fn, "Float8")):
        with pytest.raises(RuntimeError, match=f"x must be float16, bfloat16 or float32, got {name}"):
            layer(torch.ones(2, 256, device=device).to(dtype))
    other = "meta" if device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match=f"x is on {other} but the weights are on {device}"):
        layer(torch.ones(2, 256, dtype=torch.half, device=other))


# ----------------------------------------------------------------------------- op arguments
def op_cases(layer):
    q, s, z, b, p = layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm
    x = torch.ones(3, 256, dtype=torch.half, device=q.device)
    cs, bias = layer.channel_scale.reshape(-1), layer.bias
    g, d = torch.ops.mbwq.gemm.default, torch.ops.mbwq.dequant.default
    return {
        "x 1-D": (g, (x[0], q, s, z, b, p, cs, bias), r"x must be 2-D \[M, K\], got 1-D"),
        "x 3-D": (g, (x[None], q, s, z, b, p, cs, bias), "x must be 2-D"),
        "x features": (g, (x[:, :128], q, s, z, b, p, cs, bias), "x has 128 features but the layer has 256"),
        "x dtype": (g, (x.double(), q, s, z, b, p, cs, bias), "x must be float16, bfloat16 or float32, got (Double|torch.float64)"),
        "qweight dtype": (g, (x, q.float(), s, z, b, p, cs, bias), "qweight must be a 2-D int32 tensor"),
        "scales dtype": (g, (x, q, s.float(), z, b, p, cs, bias), "scales must be a 2-D float16 tensor"),
        "zeros shape": (g, (x, q, s, z[:2], b, p, cs, bias), "zeros must be float16 with the shape of scales"),
        "scales columns": (d, (q, s[:, :5], z[:, :5], b, p, torch.half), "scales has 5 columns but qweight has 12"),
        "blocks shape": (d, (q, s, z, b[:, :2], p, torch.half), r"blocks must be int32 \[K/32, 3\]"),
        "blocks dtype": (d, (q, s, z, b.long(), p, torch.half), r"blocks must be int32 \[K/32, 3\]"),
        "perm length": (d, (q, s, z, b, p[:100], torch.half),
                        r"perm has 100 entries but blocks covers K = 256 input features \(8 blocks"),
        "blocks short": (d, (q, s, z, b[:4], p, torch.half),
                         r"perm has 256 entries but blocks covers K = 128 input features \(4 blocks"),
        "perm dtype": (d, (q, s, z, b, p.long(), torch.half), "perm must be a 1-D int32 tensor, got 1-D"),
        "dequant dtype": (d, (q, s, z, b, p, torch.int32),
                          "dequant dtype must be a floating type, got (Int|torch.int32)"),
        "channel_scale": (g, (x, q, s, z, b, p, cs[:10], bias), r"channel_scale must be a floating \[256\] tensor"),
        "bias": (g, (x, q, s, z, b, p, cs, bias[:3]), r"bias must be a floating \[12\] tensor"),
    }


@pytest.mark.parametrize("fake", [False, True], ids=["kernel", "fake"])
@pytest.mark.parametrize("device", device_params())
def test_op_argument_checks(device, fake):
    layer, _ = make_layer(MIXED, device)
    cases = op_cases(layer)
    for name, (op, args, match) in cases.items():
        if fake:
            mode = FakeTensorMode()
            args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
            with mode, pytest.raises(RuntimeError, match=match):
                op(*args)
        else:
            with pytest.raises(RuntimeError, match=match):
                op(*args)


def test_op_value_checks_cpu():
    # On the CPU the kernels also check the values of blocks and perm (no device sync there).
    layer, _ = make_layer(MIXED)
    q, s, z, b, p = layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm
    bad_bits = b.clone()
    bad_bits[1, 0] = 7
    with pytest.raises(RuntimeError, match=r"blocks\[1\] has bits=7"):
        mbwq_ops.dequant(q, s, z, bad_bits, p)
    bad_word = b.clone()
    bad_word[7, 1] = 35
    with pytest.raises(RuntimeError, match=r"blocks\[7\] reads qweight rows 35..37 but qweight has 37 rows"):
        mbwq_ops.dequant(q, s, z, bad_word, p)
    bad_group = b.clone()
    bad_group[0, 2] = 3
    with pytest.raises(RuntimeError, match=r"blocks\[0\] has group=3 but scales has 3 groups"):
        mbwq_ops.gemm(torch.ones(1, 256).half(), q, s, z, bad_group, p)
    bad_perm = p.clone()
    bad_perm[5] = bad_perm[6]
    with pytest.raises(RuntimeError, match="perm is not a permutation of 0..255"):
        mbwq_ops.gemm(torch.ones(1, 256).half(), q, s, z, b, bad_perm)


def test_decoder_self_check_names_its_device_and_shape():
    # mbwq.decode_mismatches checks the CUDA decoder (test_cuda.py runs it); elsewhere it says so
    with pytest.raises(ValueError, match="CUDA decoder.*got cpu"):
        torch.ops.mbwq.decode_mismatches(torch.randint(0, 9, (4, 2), dtype=torch.int32))
    with FakeTensorMode():
        with pytest.raises(RuntimeError, match=r"int32 \[n, 2\]"):
            torch.ops.mbwq.decode_mismatches(torch.empty(4, 3, dtype=torch.int32))
