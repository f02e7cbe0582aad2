"""GPTQ checkpoints: fixtures made by GPTQModel 7.6 (scripts/make_gptq_fixtures.py) with its own
fp16 dequantized weights and logits, an fp64 reference decoded here straight from the published
layout, synthetic layers of every width, and the refusals."""
import hashlib
import json
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from mbwq_ops import loaders
from mbwq_ops.loaders import gptq
from mbwq_ops.reference import round_to_fp16
from raw_files import raw_tensors

HERE = os.path.join(os.path.dirname(__file__), "fixtures", "gptq")
FIXTURES = ["llama-4bit-sym-actorder", "llama-4bit-asym", "llama-3bit-sym-actorder",
            "llama-2bit-asym-actorder"]


# --------------------------------------------------------------- an independent GPTQ decoder
def bits_of(words, bits, count):
    """``count`` codes of ``bits`` bits from a little-endian bit string of int32 words
    (dim 0), read one bit at a time."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    string = torch.stack([(w >> i) & 1 for i in range(32)], 1).reshape(-1, *w.shape[1:])
    string = string[:count * bits].reshape(count, bits, *w.shape[1:])
    return sum(string[:, i] << i for i in range(bits))


def gptq_exact(raw, name, bits, v1):
    """fp64 ``W [K, N] = scale * (code - z)`` and ``scale * z`` per element, from the stored
    tensors as GPTQ publishes them."""
    qweight, qzeros, scales = raw[name + ".qweight"], raw[name + ".qzeros"], raw[name + ".scales"]
    g = raw[name + ".g_idx"].long()
    K, N = g.numel(), qweight.shape[1]
    codes = bits_of(qweight, bits, K)
    z = bits_of(qzeros.t(), bits, N).t()
    if v1:
        z = (z + 1) % (1 << bits)
    s = scales.double()[g]
    return s * (codes.double() - z[g].double()), s * z[g].double()


def ulp16(x):
    """The spacing of fp16 numbers at |x| (normal range; 2^-24 below it)."""
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -14)))
    return torch.pow(2.0, e - 10)


def digest(W):
    return torch.tensor(list(hashlib.sha256(W.numpy().tobytes()).digest()), dtype=torch.uint8)


# --------------------------------------------------------------- the GPTQModel fixtures
@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_against_gptqmodel_and_the_fp64_reference(name):
    folder = os.path.join(HERE, name)
    assert loaders.detect(folder) == "gptq"
    ck = loaders.read_checkpoint(folder, progress=False)
    ref = load_file(folder + ".reference.safetensors")
    raw = raw_tensors(folder)
    bits, sym = ck.info["bits"], ck.info["sym"]
    assert ck.info["checkpoint_format"] == "gptq" and len(ck.layers) == 14
    exact_layers = 0
    for layer_name, e in ck.layers.items():
        assert e["ctor"]["use_mbw"] == (bits in (3, 8)), layer_name  # 2/4: uniform
        layer = loaders.build_layer(e)
        W = layer.dequantized_weight()  # [K, N], original input order
        exact, sz = gptq_exact(raw, layer_name, bits, v1=True)
        theirs = round_to_fp16(exact)  # GPTQ's fp16(scale * (code - z)), one rounding
        if sym:  # bit-exact, and equal to GPTQModel's own dequantize_weight()
            assert torch.equal(W, theirs), layer_name
            assert torch.equal(digest(W.t().contiguous()), ref[layer_name + ".sha256"]), layer_name
        else:  # within one fp16 rounding of scale * z, plus the final roundings
            bound = 0.5 * ulp16(sz) + 0.5 * ulp16(exact) + 0.5 * ulp16(W.double())
            assert bool(((W.double() - exact).abs() <= bound).all()), layer_name
        exact_layers += torch.equal(digest(W.t().contiguous()), ref[layer_name + ".sha256"])
        if layer_name + ".weight" in ref:  # GPTQModel's fp16 weights themselves
            theirs_stored = ref[layer_name + ".weight"].t()
            assert torch.equal(theirs_stored, theirs), layer_name
    if sym:
        assert exact_layers == 14
    # act-order checkpoints: q_perm is the stable sort of g_idx
    e = ck.layers["model.layers.0.mlp.up_proj"]
    g = raw["model.layers.0.mlp.up_proj.g_idx"].long()
    assert torch.equal(e["state"]["q_perm"].long() & 0xFFFF, torch.argsort(g, stable=True))
    if "actorder" in name:
        assert not torch.equal(e["state"]["q_perm"].long(), torch.arange(g.numel()))


def _tiny_llama(ck):
    from mbwq_ops.accounting import set_module
    from mbwq_ops.apps.tiny_llama import LlamaConfig, TinyLlama
    c = ck.config
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                      rms_eps=c["rms_norm_eps"], rope_theta=c.get("rope_theta", 10000.0),
                      max_seq_len=32)
    model = TinyLlama(cfg)
    _, unexpected = model.load_state_dict(ck.tensors, strict=False)
    assert not unexpected
    for name, e in ck.layers.items():
        set_module(model, name, loaders.build_layer(e))
    return model.half()


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_gptqmodels_torch_backend(name):
    ck = loaders.read_checkpoint(os.path.join(HERE, name), progress=False)
    ref = load_file(os.path.join(HERE, name) + ".reference.safetensors")
    model = _tiny_llama(ck)
    with torch.no_grad():
        ours = model(ref["input_ids"]).float()
    theirs = ref["logits"]
    # same weights bit for bit; what differs is fp16 arithmetic order (attention, norms)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 0.005 * theirs.abs().max()  # measured: <= 0.0022
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.95


def test_sharded_fixture_has_an_index():
    folder = os.path.join(HERE, "llama-4bit-asym")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    ck = loaders.read_checkpoint(folder, progress=False)
    assert "lm_head.weight" in ck.tensors and not ck.tie_word_embeddings


def _copy(tmp_path, name="llama-4bit-asym"):
    dst = tmp_path / name
    shutil.copytree(os.path.join(HERE, name), dst)
    return dst


def _edit_json(path, fn):
    with open(path) as f:
        d = json.load(f)
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def test_v2_checkpoint_format_gives_the_same_layers(tmp_path):
    """gptq_v2 stores z itself: rewrite the v1 fixture's qzeros as z and say so."""
    from mbwq_ops import format as fmt
    d = _copy(tmp_path, "llama-2bit-asym-actorder")
    raw = load_file(str(d / "model.safetensors"))
    for k in [k for k in raw if k.endswith(".qzeros")]:
        N = raw[k].shape[1] * 32 // 2
        z = (fmt.unpack_codes(raw[k].t().contiguous(), 2, N) + 1) % 4
        raw[k] = fmt.pack_codes(z, 2).t().contiguous()
    save_file(raw, str(d / "model.safetensors"))
    for f in ("config.json",):
        _edit_json(d / f, lambda c: c["quantization_config"].update(checkpoint_format="gptq_v2"))
    a = loaders.read_checkpoint(os.path.join(HERE, "llama-2bit-asym-actorder"), progress=False)
    b = loaders.read_checkpoint(d, progress=False)
    assert b.info["checkpoint_format"] == "gptq_v2"
    for k in a.layers:
        for t in a.layers[k]["state"]:
            assert torch.equal(a.layers[k]["state"][t], b.layers[k]["state"][t]), (k, t)


def test_quantize_config_json_alone_is_detected(tmp_path):
    d = _copy(tmp_path, "llama-4bit-sym-actorder")
    _edit_json(d / "config.json", lambda c: c.pop("quantization_config"))
    assert loaders.detect(d) == "gptq"
    ck = loaders.read_checkpoint(d, progress=False)
    assert ck.info["bits"] == 4 and ck.info["desc_act"] is True


@pytest.mark.parametrize("edit,msg", [
    ({"bits": 5}, r"bits = 5: 5/6/7-bit GPTQ checkpoints use GPTQModel's planar 'gptq_p' layout"),
    ({"bits": 4.0}, r"bits must be an integer, got 4\.0"),
    ({"bits": None}, r"bits must be an integer, got None"),
    ({"group_size": 16}, r"group_size = 16: MBWQ groups are whole blocks of 32 rows"),
    ({"group_size": "64"}, r"group_size must be an integer, got '64'"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' cannot be read"),
    ({"pack_dtype": "int16"}, r"pack_dtype 'int16': only int32 packing is read"),
    ({"lm_head": True}, r"lm_head = true: a quantized lm_head is not converted"),
    ({"sym": "yes"}, r"sym must be true or false, got 'yes'"),
])
def test_refusals_from_the_config(tmp_path, edit, msg):
    d = _copy(tmp_path)
    _edit_json(d / "config.json", lambda c: c["quantization_config"].update(edit))
    with pytest.raises(ValueError, match=r"config\.json: quantization_config: " + msg):
        loaders.read_checkpoint(d, progress=False)


# --------------------------------------------------------------- synthetic layers
def pack_gptq(codes, bits, dim):
    """Pack codes along ``dim`` (0: qweight, 1: qzeros) into the GPTQ little-endian string,
    one bit at a time."""
    c = codes if dim == 0 else codes.t()
    rows = c.shape[0]
    string = torch.stack([(c >> i) & 1 for i in range(bits)], 1).reshape(rows * bits, -1)
    words = string.reshape(-1, 32, string.shape[1])
    w = sum(words[:, i].to(torch.int64) << i for i in range(32))
    w = torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)
    return w if dim == 0 else w.t().contiguous()


@given(bits=st.sampled_from([2, 3, 4, 8]), gs=st.sampled_from([32, 64, 128, -1]),
       blocks=st.integers(1, 8), N=st.sampled_from([32, 64, 96]), sym=st.booleans(),
       act_order=st.booleans(), v1=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_synthetic_layers_convert_exactly(bits, gs, blocks, N, sym, act_order, v1, bias, seed):
    K = 32 * blocks * (4 if gs == 128 else 2 if gs == 64 else 1)
    size = K if gs == -1 else gs
    G = -(-K // size)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (K, N), generator=gen)
    z = (torch.full((G, N), 1 << (bits - 1)) if sym
         else torch.randint(0, 1 << bits, (G, N), generator=gen))
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 1e-4).half()
    perm = torch.randperm(K, generator=gen) if act_order else torch.arange(K)
    g_idx = torch.empty(K, dtype=torch.int32)
    g_idx[perm] = (torch.arange(K) // size).to(torch.int32)  # input perm[i] is i-th in order
    stored_z = (z - 1) % (1 << bits) if v1 else z
    tensors = {"qweight": pack_gptq(codes, bits, 0), "qzeros": pack_gptq(stored_z, bits, 1),
               "scales": scales, "g_idx": g_idx}
    if bias:
        tensors["bias"] = torch.randn(N, generator=gen).half()
    settings = {"bits": bits, "group_size": gs, "sym": sym, "desc_act": act_order,
                "checkpoint_format": "gptq" if v1 else "gptq_v2", "dynamic": False}
    e = gptq.convert_layer("layer", dict(tensors), settings)
    assert e["ctor"]["use_mbw"] == (bits in (3, 8))
    W = loaders.build_layer(e).dequantized_weight().double()
    s = scales.double()[g_idx.long()]
    exact = s * (codes.double() - z[g_idx.long()].double())
    if sym:
        assert torch.equal(W, round_to_fp16(exact).double())
    else:
        sz = s * z[g_idx.long()].double()
        assert bool(((W - exact).abs() <= 0.5 * ulp16(sz) + 0.5 * ulp16(W) + 1e-12).all())
    if bias:
        assert torch.equal(e["state"]["bias"], tensors["bias"])


def test_irregular_groups_are_refused_or_mixed():
    gen = torch.Generator().manual_seed(0)
    K, N = 128, 32
    codes = torch.randint(0, 16, (K, N), generator=gen)
    base = {"qweight": pack_gptq(codes, 4, 0), "scales": torch.ones(2, N, dtype=torch.float16),
            "qzeros": pack_gptq(torch.full((2, N), 7), 4, 1)}
    settings = {"bits": 4, "group_size": 64, "sym": True, "desc_act": True,
                "checkpoint_format": "gptq", "dynamic": False}
    # 96 + 32 rows: whole blocks but not group_size runs -> a mixed layer
    g_idx = torch.cat([torch.zeros(96), torch.ones(32)]).to(torch.int32)
    e = gptq.convert_layer("m", dict(base, g_idx=g_idx), settings)
    assert e["ctor"]["use_mbw"] and e["ctor"]["groups"] == 2
    # 80 + 48 rows: not whole blocks
    g_idx = torch.cat([torch.zeros(80), torch.ones(48)]).to(torch.int32)
    with pytest.raises(ValueError, match=r"m: g_idx puts 80 inputs in group 0; MBWQ groups are "
                                         r"whole blocks of 32 rows"):
        gptq.convert_layer("m", dict(base, g_idx=g_idx), settings)
    # K not a multiple of 32
    with pytest.raises(ValueError, match=r"m: 112 inputs is not a multiple of 32"):
        gptq.convert_layer("m", dict(base, qweight=base["qweight"][:14],
                                     g_idx=torch.arange(112, dtype=torch.int32) // 64), settings)
    # qweight of another width than the config says
    with pytest.raises(ValueError, match=r"m: tensor qweight has shape \[16, 32\] in the "
                                         r"checkpoint, expected \[12, 32\]"):
        gptq.convert_layer("m", dict(base, g_idx=torch.arange(128, dtype=torch.int32) // 64),
                           dict(settings, bits=3))


@given(bits=st.sampled_from([2, 3, 4, 5, 6, 8]), blocks=st.integers(1, 4),
       N=st.integers(1, 40), seed=st.integers(0, 2 ** 31 - 1))
def test_fast_row_repacking_equals_the_format(bits, blocks, N, seed):
    """The converter's byte-wise unpack / pack against format.py's, on a random row order and
    a non-contiguous column slice."""
    from mbwq_ops import format as fmt
    from mbwq_ops.loaders import common
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (32 * blocks, N + 3), generator=gen)
    words = fmt.pack_codes(codes, bits)[:, 2:N + 2]  # a strided view
    assert torch.equal(common.unpack_rows(words, bits).long(), codes[:, 2:N + 2])
    order = torch.randperm(32 * blocks, generator=gen)
    assert torch.equal(common.pack_rows(codes[order][:, 2:N + 2], bits),
                       fmt.pack_codes(codes[order][:, 2:N + 2], bits))
