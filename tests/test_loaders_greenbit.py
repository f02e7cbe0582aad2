"""GreenBitAI checkpoints (tests/fixtures/greenbit, made by scripts/make_greenbit_fixtures.py):
read, converted to MBWQ layers, dequantized against the fp64 reference read straight from the
files, and refused with the layer, tensor and shapes named when they disagree with the strategy.
"""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mbwq_ops import loaders
from mbwq_ops.loaders import greenbit
from mbwq_ops.reference import dequant_reference, error_scale, gemm_reference
from raw_files import raw_tensors

HERE = os.path.dirname(__file__)
LLAMA = os.path.join(HERE, "fixtures", "greenbit", "llama-channel-mix")
QWEN = os.path.join(HERE, "fixtures", "greenbit", "qwen2-layer-mix")
PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJ]


def strategy_of(folder):
    with open(os.path.join(folder, "quant_strategy.json")) as f:
        return json.load(f)["measurement"]


def copy(folder, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_detect():
    assert loaders.detect(LLAMA) == "greenbit" and loaders.detect(QWEN) == "greenbit"
    assert loaders.detect(HERE) is None
    assert loaders.detect(os.path.join(HERE, "no-such-folder")) is None


def test_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"not a quantized checkpoint this library reads"):
        loaders.read_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        loaders.read_checkpoint(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"source must be one of"):
        loaders.read_checkpoint(LLAMA, source="awq")


@pytest.mark.parametrize("folder", [LLAMA, QWEN], ids=["llama-channel-mix", "qwen2-layer-mix"])
def test_layers_equal_the_fp64_reference(folder):
    ck = loaders.read_checkpoint(folder, progress=False)
    raw = raw_tensors(folder)
    strategy = strategy_of(folder)
    assert ck.source == "greenbit" and ck.config["model_type"] in ("llama", "qwen2")
    assert sorted(ck.layers) == sorted(LAYERS)
    mixed = folder == LLAMA
    gen = torch.Generator().manual_seed(0)
    for name, e in ck.layers.items():
        assert e["ctor"]["use_mbw"] == mixed
        block, proj = name.rsplit(".", 2)[0], name.split(".")[-1]
        entry = strategy[block][proj]
        p = name + "."
        K = e["ctor"]["in_channels"]
        q_perm = raw.get(p + "q_perm", torch.zeros(K, dtype=torch.int16))
        gs = None if mixed else entry["group_size"][str(entry["bits"][0])]
        W = dequant_reference(raw[p + "qweight"], raw[p + "scales"], raw[p + "zeros"], q_perm, K,
                              use_mbw=mixed, q_groups=raw.get(p + "q_groups"), group_size=gs)
        layer = loaders.build_layer(e)
        assert torch.equal(layer.dequantized_weight(), W), name
        # forward against the fp64 reference, bias and channel_scale included
        x = torch.randn(3, K, generator=gen).half()
        cs = raw.get(p + "channel_scale")
        y_ref = gemm_reference(x, W, cs, raw.get(p + "bias"))
        err = (layer(x).double() - y_ref).abs()
        assert bool((err <= 4 * 2.0 ** -11 * error_scale(x, W, cs, raw.get(p + "bias")) + 1e-6).all()), name


def test_stored_keys_only_and_legacy_keys_dropped():
    raw = raw_tensors(LLAMA)
    assert "model.layers.0.self_attn.q_proj.qstatistic" in raw  # the fixture carries them
    ck = loaders.read_checkpoint(LLAMA, progress=False)
    for name, e in ck.layers.items():
        assert set(e["state"]) == {"qweight", "scales", "zeros", "q_perm", "q_groups",
                                   "channel_scale"}, name
    # every other tensor is kept as stored, and nothing of a layer leaks into them
    assert sorted(ck.tensors) == sorted(k for k in raw if not any(
        k.startswith(n + ".") for n in LAYERS))
    assert torch.equal(ck.tensors["lm_head.weight"], raw["lm_head.weight"])
    assert ck.tie_word_embeddings is False and ck.info["mixed_layers"] == 14


def test_qwen2_bias_ties_and_defaults():
    ck = loaders.read_checkpoint(QWEN, progress=False)
    raw = raw_tensors(QWEN)
    for name, e in ck.layers.items():
        has_bias = name.split(".")[-1] in ("q_proj", "k_proj", "v_proj")
        assert ("bias" in e["state"]) == has_bias and e["ctor"]["disable_bias"] == (not has_bias)
        if has_bias:
            assert torch.equal(e["state"]["bias"], raw[name + ".bias"])
    assert ck.tie_word_embeddings is True and "lm_head.weight" not in ck.tensors
    # the layer stored without q_perm and channel_scale gets identity and ones
    e = ck.layers["model.layers.1.self_attn.o_proj"]
    assert "model.layers.1.self_attn.o_proj.q_perm" not in raw
    assert torch.equal(e["state"]["q_perm"].long(), torch.arange(128))
    assert torch.equal(e["state"]["channel_scale"], torch.ones(1, 1, 128, dtype=torch.float16))
    widths = {e["ctor"]["w_bit"] for e in ck.layers.values()}
    assert widths == {2, 4}


def test_dtype_applies_to_the_floating_tensors_only():
    ck = loaders.read_checkpoint(QWEN, dtype=torch.bfloat16, progress=False)
    assert all(t.dtype == torch.bfloat16 for t in ck.tensors.values())
    assert all(e["state"]["scales"].dtype == torch.float16 for e in ck.layers.values())
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        loaders.read_checkpoint(QWEN, dtype=torch.int8)


def test_sharded_equals_one_file(tmp_path):
    one = tmp_path / "one"
    shutil.copytree(QWEN, one, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(raw_tensors(QWEN), str(one / "model.safetensors"))
    a = loaders.read_checkpoint(QWEN, progress=False)
    b = loaders.read_checkpoint(one, progress=False)
    assert sorted(a.tensors) == sorted(b.tensors) and sorted(a.layers) == sorted(b.layers)
    for k in a.layers:
        assert a.layers[k]["ctor"] == b.layers[k]["ctor"]
        for t in a.layers[k]["state"]:
            assert torch.equal(a.layers[k]["state"][t], b.layers[k]["state"][t])


def test_index_naming_a_missing_shard(tmp_path):
    d = copy(QWEN, tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.index.json: names "
                                                r"model-00002-of-00002.safetensors"):
        loaders.read_checkpoint(d, progress=False)


def test_progress_bar(capsys):
    loaders.read_checkpoint(QWEN, progress=True)
    assert "GreenBitAI checkpoint" in capsys.readouterr().err


def test_mode_comes_from_the_tensors_not_the_folder_name(tmp_path):
    d = copy(LLAMA, tmp_path, "Llama-layer-mix-bpw-3.0")
    ck = loaders.read_checkpoint(d, progress=False)
    assert all(e["ctor"]["use_mbw"] for e in ck.layers.values())


def _edit_strategy(folder, fn):
    path = os.path.join(folder, "quant_strategy.json")
    with open(path) as f:
        s = json.load(f)
    fn(s["measurement"])
    with open(path, "w") as f:
        json.dump(s, f)


def test_checkpoint_disagreeing_with_its_strategy(tmp_path):
    d = copy(LLAMA, tmp_path)
    # q_proj (K = 128) stored as 96 rows at 4 bits + 32 at 2; the edit asks for 64 + 64
    _edit_strategy(d, lambda m: m["model.layers.0"]["q_proj"].update(bits_prop=[0.5, 0.5]))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj: tensor qweight "
                                         r"has shape \[14, 128\] in the checkpoint, expected "
                                         r"\[12, 128\]"):
        loaders.read_checkpoint(d, progress=False)
    d = copy(QWEN, tmp_path, "q2")
    # a 4-bit layer of 32-row groups read as 64-row groups
    _edit_strategy(d, lambda m: m["model.layers.0"]["o_proj"].update(group_size={"4": 64}))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.o_proj: tensor scales has "
                                         r"shape \[4, 128\] in the checkpoint, expected \[2, 128\]"):
        loaders.read_checkpoint(d, progress=False)
    d = copy(QWEN, tmp_path, "q3")
    _edit_strategy(d, lambda m: m["model.layers.0"]["o_proj"].update(bits=[4, 2], bits_prop=[0.5, 0.5],
                                                                     group_size={"4": 32, "2": 32}))
    with pytest.raises(ValueError, match=r"o_proj: .* gives several widths \[4, 2\] \(channel-mix\), "
                                         r"but the checkpoint has no q_groups"):
        loaders.read_checkpoint(d, progress=False)
    d = copy(QWEN, tmp_path, "q4")
    _edit_strategy(d, lambda m: m["model.layers.1"].pop("up_proj"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: a uniform layer .* has no "
                                         r"entry for it"):
        loaders.read_checkpoint(d, progress=False)
    d = copy(QWEN, tmp_path, "q5")
    _edit_strategy(d, lambda m: m["model.layers.1"]["up_proj"].update(group_size={"4": 64.5, "2": 64.5}))
    with pytest.raises(ValueError, match=r"quant_strategy.json: strategy: model\.layers\.1\.up_proj: "
                                         r"group_size\['4'\] must be an integer number of rows, got 64\.5"):
        loaders.read_checkpoint(d, progress=False)


def test_mixed_layer_widths_must_match_the_strategy(tmp_path):
    d = copy(LLAMA, tmp_path)
    # same packed rows and group count, other widths: 8-bit 32 rows + 3-bit 96 = 8 + 9 = 17 rows;
    # stored gate_proj is 8/4/3 over 32/64/32 rows (8 + 8 + 3 = 19 rows): a shape error first
    _edit_strategy(d, lambda m: m["model.layers.1"]["gate_proj"].update(
        bits=[8, 3], bits_prop=[0.25, 0.75], group_size={"8": 32, "3": 32}))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.gate_proj: tensor qweight has shape "
                                         r"\[19, 256\] in the checkpoint, expected \[17, 256\]"):
        loaders.read_checkpoint(d, progress=False)


def test_packed_info_is_green_bit_llms_rule():
    # K = 4096, 25 % at 4 bits in groups of 128, the rest at 2 bits in groups of 64
    assert greenbit.packed_info(4096, [4, 2], [0.25, 0.75], [128, 64]) == (8 + 48, 128 + 192,
                                                                           [1024, 3072])
    # a share below one group still gets one group (max(1, ...)); the last width the rest
    assert greenbit.packed_info(256, [8, 2], [0.01, 0.99], [32, 32]) == (1 + 7, 8 + 14, [32, 224])
    # int() truncation: 0.3 * 11008 = 3302.4 -> 3302 // 128 = 25 groups
    g, r, f = greenbit.packed_info(11008, [4, 3], [0.3, 0.7], [128, 128])
    assert f == [3200, 7808] and g == 25 + 61 and r == 3200 // 32 * 4 + 7808 // 32 * 3


def test_quantized_module_outside_the_blocks_is_refused(tmp_path):
    d = copy(LLAMA, tmp_path)
    raw = raw_tensors(d)
    for k in [k for k in raw if k.startswith("model.layers.0.self_attn.q_proj.")]:
        raw["lm_head" + k[len("model.layers.0.self_attn.q_proj"):]] = raw[k].clone()
    del raw["lm_head.weight"]
    save_file(raw, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"lm_head: quantized, but only the linear layers inside "
                                         r"the decoder blocks"):
        loaders.read_checkpoint(d, progress=False)


def test_model_from_a_checkpoint_matches_its_dequantized_twin():
    """The consumer's path: the built-in TinyLlama (transformers' Llama names) with the layers
    and tensors of the checkpoint gives the logits of a float model holding the dequantized
    weights."""
    from mbwq_ops.accounting import set_module
    from mbwq_ops.apps.tiny_llama import LlamaConfig, TinyLlama
    ck = loaders.read_checkpoint(LLAMA, dtype=torch.float32, progress=False)
    c = ck.config
    cfg = LlamaConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"],
                      intermediate_size=c["intermediate_size"], num_layers=c["num_hidden_layers"],
                      num_heads=c["num_attention_heads"], num_kv_heads=c["num_key_value_heads"],
                      rms_eps=c["rms_norm_eps"], rope_theta=c["rope_theta"], max_seq_len=32)
    quant, twin = TinyLlama(cfg), TinyLlama(cfg)
    for m in (quant, twin):
        missing, unexpected = m.load_state_dict(ck.tensors, strict=False)
        assert not unexpected and sorted(missing) == sorted(n + ".weight" for n in ck.layers)
    for name, e in ck.layers.items():
        layer = loaders.build_layer(e)
        set_module(quant, name, layer)
        W = layer.dequantized_weight(torch.float64)  # [K, N]; forward = (x * cs) @ W
        cs = e["state"]["channel_scale"].double().reshape(-1, 1)
        twin.get_submodule(name).weight.data = (W * cs).t().float()
    tokens = torch.randint(0, cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = quant.half()(tokens).float(), twin(tokens)
    assert a.shape == (2, 7, cfg.vocab_size)
    assert (a - b).abs().max() < 0.05 * b.abs().max()
