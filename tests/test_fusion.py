"""mbwq_ops.fusion: layers that read one input, fused into one GEMM, give the same columns."""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import mbwq_ops
from mbwq_ops import fusion
from mbwq_ops.reference import error_scale, gemm_reference

from layers import LayerSpec, build, device_params, error_bound, random_mixed_spec, reference_weight


def shared_layout_layers(spec: LayerSpec, outs, device, seed):
    """Layers of one input side (spec's groups, one q_perm, one channel_scale) and their own
    codes, scales, zeros and bias, with out_features ``outs``."""
    layers, tensors = [], []
    first = None
    for i, n in enumerate(outs):
        s = LayerSpec(**{**spec.__dict__, "out_features": n, "seed": seed + i})
        t = build(s, device)
        if first is None:
            first = t
        t["q_perm"], t["channel_scale"] = first["q_perm"], first["channel_scale"]
        layer = mbwq_ops.MBWQLinear(s.in_features, n, w_bit=s.w_bit, group_size=s.group_size,
                                    use_mbw=s.use_mbw, disable_bias=not s.bias,
                                    groups=len(s.widths) or 1, rows_packed=t["qweight"].shape[0])
        layer.load_state_dict(t)
        layer.to(device).prepare_params()
        layers.append(layer)
        tensors.append((s, t))
    return layers, tensors


def random_spec(rng: random.Random, K: int) -> LayerSpec:
    if rng.random() < 0.5:
        return LayerSpec(K, 8, False, w_bit=rng.choice([2, 4]), group_size=rng.choice([32, 64, 128]),
                         perm=rng.choice(["random", "zeros"]), bias=rng.random() < 0.5)
    return random_mixed_spec(rng, K, 8, bias=rng.random() < 0.5)


@pytest.mark.parametrize("device", device_params())
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 30), M=st.integers(1, 40),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), transposed=st.booleans())
def test_fused_columns_equal_the_layers(device, seed, M, dtype, transposed):
    rng = random.Random(seed)
    K = 32 * rng.randint(1, 8)
    outs = [8 * rng.randint(1, 12) for _ in range(rng.randint(2, 3))]
    layers, tensors = shared_layout_layers(random_spec(rng, K), outs, device, seed)
    fused = mbwq_ops.fuse_linears(layers)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(K, M, generator=g).to(device, dtype).t() if transposed else \
        torch.randn(M, K, generator=g).to(device, dtype)  # a transposed view, or contiguous
    parts = fused(x).split(fusion.output_sizes(layers), -1)
    for layer, (spec, t), y in zip(layers, tensors, parts):
        alone = layer(x)
        if device == "cpu":
            assert torch.equal(y, alone)  # every column computed as it is alone
        else:  # another grid may add the fp32 partial sums of a column in another order
            W = reference_weight(spec, {k: v.cpu() for k, v in t.items()})
            cs, bias = t["channel_scale"].reshape(-1), t.get("bias")
            ref = gemm_reference(x, W, cs, bias)
            bound = error_bound(dtype, ref, error_scale(x, W, cs, bias))
            assert ((y.double().cpu() - ref).abs() <= bound).all()
            assert ((alone.double().cpu() - ref).abs() <= bound).all()


def test_fused_layer_is_a_stored_format_layer():
    rng = random.Random(3)
    layers, _ = shared_layout_layers(random_mixed_spec(rng, 256, 8, bias=True), [64, 16, 16],
                                     "cpu", 11)
    fused = mbwq_ops.fuse_linears(layers)
    again = mbwq_ops.MBWQLinear(256, 96, use_mbw=True, groups=fused.scales.shape[0],
                                rows_packed=fused.qweight.shape[0], disable_bias=False)
    again.load_state_dict(fused.state_dict())
    again.prepare_params()
    x = torch.randn(5, 256)
    assert torch.equal(again(x), fused(x))
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], -1))


def _pair():
    layers, _ = shared_layout_layers(LayerSpec(128, 16, False, w_bit=4, group_size=64),
                                     [16, 24], "cpu", 7)
    return layers


@pytest.mark.parametrize("change, match", [
    ("perm", r"layer 1 stores its input features in another order \(q_perm\)"),
    ("channel_scale", "layer 1 has another channel_scale"),
    ("bias", "layer 1 has a bias, layer 0 does not"),
    ("width", r"other groups \(widths or sizes\)"),
    ("in_features", "layer 1 has 256 input features, layer 0 128"),
    ("dense", "layer 1 is a Linear, not an MBWQLinear"),
])
def test_layers_that_cannot_fuse_say_why(change, match):
    a, b = _pair()
    if change == "perm":
        b.q_perm = b.q_perm.roll(1)
    elif change == "channel_scale":
        b.channel_scale = b.channel_scale * 2
    elif change == "bias":
        (b,), _ = shared_layout_layers(LayerSpec(128, 16, False, w_bit=4, group_size=64,
                                                 bias=True), [24], "cpu", 9)
        b.q_perm, b.channel_scale = a.q_perm.clone(), a.channel_scale.clone()
    elif change == "width":
        (b,), _ = shared_layout_layers(LayerSpec(128, 16, False, w_bit=2, group_size=64),
                                       [24], "cpu", 9)
    elif change == "in_features":
        (b,), _ = shared_layout_layers(LayerSpec(256, 16, False, w_bit=4, group_size=64),
                                       [24], "cpu", 9)
    else:
        b = nn.Linear(128, 24)
    assert fusion.fusion_problem([a, b]) is not None
    with pytest.raises(ValueError, match=match):
        mbwq_ops.fuse_linears([a, b])


def test_one_layer_is_not_a_fusion():
    a, _b = _pair()
    with pytest.raises(ValueError, match="at least two layers, got 1"):
        mbwq_ops.fuse_linears([a])


def test_quantized_projections_of_one_input_fuse():
    # uniform quantization (RTN and GPTQ with act-order) gives layers of one input one layout
    from mbwq_ops.apps.tiny_llama import build as build_llama

    for calibration in (None, [torch.randint(0, 512, (8, 64))]):
        model = build_llama("tiny")
        mbwq_ops.quantize_model(model, bits=4, calibration=calibration, verbose=False)
        attn = model.model.layers[0].self_attn
        assert fusion.fusion_problem([attn.q_proj, attn.k_proj, attn.v_proj]) is None


@pytest.mark.parametrize("name", ["llama-4bit-sym-actorder", "llama-2bit-asym-actorder",
                                  "llama-3bit-sym-actorder", "llama-4bit-asym"])
def test_gptq_checkpoints_fuse(name):
    # checkpoints made by gptqmodel (tests/fixtures/gptq, scripts/make_gptq_fixtures.py): act-order
    # orders the inputs by the Hessian, which q/k/v (and gate/up) share, so their layouts match
    import os

    from mbwq_ops import loaders

    folder = os.path.join(os.path.dirname(__file__), "fixtures", "gptq", name)
    ck = loaders.read_checkpoint(folder, progress=False)
    x = torch.randn(3, ck.config["hidden_size"], generator=torch.Generator().manual_seed(4))
    for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")),
                          ("mlp", ("gate_proj", "up_proj"))):
        layers = [loaders.build_layer(ck.layers[f"model.layers.0.{parent}.{n}"]) for n in names]
        fused = mbwq_ops.fuse_linears(layers)
        assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], -1))
