"""transformers integration: quant_method "mbwq" round trips through save_pretrained /
from_pretrained bit for bit, and mbwq_ops.from_pretrained reads every source into the same
kind of model."""
import json
import os
import pathlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

import mbwq_ops
from mbwq_ops import MBWQLinear
from mbwq_ops.checkpoint import layer_record, layer_ctor

transformers = pytest.importorskip("transformers")  # the [test] extra installs it
from transformers import AutoModelForCausalLM  # noqa: E402

import mbwq_ops.hf  # noqa: E402  (registers quant_method "mbwq")
from mbwq_ops.hf import tiny  # noqa: E402

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
GREENBIT = FIXTURES / "greenbit"


def quantized_tiny(seed=0, bpw=3.0, bits=None, **config):
    model = tiny.tiny_llama(seed, **config)
    mbwq_ops.quantize_model(model, bpw=None if bits else bpw, bits=bits, verbose=False)
    return model


def mbwq_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, MBWQLinear)}


def assert_same_model(a, b, vocab):
    la, lb = mbwq_layers(a), mbwq_layers(b)
    assert la.keys() == lb.keys() and la
    for name in la:
        sa, sb = la[name].state_dict(), lb[name].state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"
    tokens = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ya, yb = a(tokens).logits, b(tokens).logits
    assert ya.abs().max() > 0 and torch.equal(ya, yb)


def load(folder, **kw):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), bpw=st.sampled_from([2.5, 3.0, 4.0]),
       bits=st.sampled_from([None, None, 4, 2, 5]), tie=st.booleans())
def test_save_pretrained_round_trip_is_bit_exact(tmp_path_factory, seed, bpw, bits, tie):
    model = quantized_tiny(seed, bpw, bits, tie_word_embeddings=tie)
    folder = tmp_path_factory.mktemp("rt")
    model.save_pretrained(folder)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mbwq"
    # the per-layer records are the checkpoint's own (layer_record), one per MBWQ layer
    assert qc["layers"] == {n: json.loads(json.dumps(layer_record(m)))
                            for n, m in mbwq_layers(model).items()}
    back = load(folder)
    assert isinstance(back.model.layers[0].mlp.down_proj, MBWQLinear)
    assert back.config.tie_word_embeddings == tie
    if tie:
        assert back.lm_head.weight is back.model.embed_tokens.weight
    assert_same_model(model, back, model.config.vocab_size)
    assert_same_model(model, mbwq_ops.from_pretrained(folder, progress=False),
                      model.config.vocab_size)


def test_bfloat16_keeps_the_stored_dtypes(tmp_path):
    model = quantized_tiny(1)
    model.save_pretrained(tmp_path)
    back = load(tmp_path, dtype=torch.bfloat16)
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, layer in mbwq_layers(back).items():
        assert layer.qweight.dtype == torch.int32 and layer.q_perm.dtype == torch.int16
        assert layer.scales.dtype == layer.zeros.dtype == layer.channel_scale.dtype == torch.float16
        ref = mbwq_layers(model)[name]
        assert torch.equal(layer.scales, ref.scales) and torch.equal(layer.qweight, ref.qweight)
    tokens = torch.randint(0, 96, (1, 5))
    with torch.no_grad():
        y, y32 = back(tokens).logits, model(tokens).logits
    assert y.dtype == torch.bfloat16
    assert (y.float() - y32).abs().max() < 0.1 * y32.abs().max()


def test_a_missing_stored_tensor_is_an_error(tmp_path):
    quantized_tiny(2).save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.scales"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.scales"):
        mbwq_ops.from_pretrained(tmp_path, progress=False)


@pytest.mark.parametrize("edit, message", [
    (lambda qc: qc["layers"].update({"model.layers.9.mlp.up_proj": qc["layers"].pop(
        "model.layers.1.mlp.up_proj")}), r"has no module 'model\.layers\.9\.mlp\.up_proj'"),
    (lambda qc: qc["layers"]["model.layers.0.mlp.down_proj"].pop("groups"),
     r"layers\['model\.layers\.0\.mlp\.down_proj'\]: missing field 'groups'"),
    (lambda qc: qc["layers"]["model.layers.0.mlp.down_proj"].update(in_features=128),
     r"down_proj is 256->128, the record says 128->128"),
    (lambda qc: qc.update(format_version=99), r"format_version: 99 is newer"),
    (lambda qc: qc.update(layers={}), r"quantization_config\.layers: expected a non-empty"),
])
def test_a_bad_quantization_config_is_named(tmp_path, edit, message):
    quantized_tiny(3).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    edit(cfg["quantization_config"])
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_save_pretrained_records_the_layers_as_they_are_now(tmp_path):
    model = quantized_tiny(4)
    name = "model.layers.0.self_attn.o_proj"
    relayered = tiny.tiny_llama(9)  # replace one layer after quantization
    mbwq_ops.quantize_model(relayered, bits=2, verbose=False)
    mbwq_ops.accounting.set_module(model, name, relayered.get_submodule(name))
    model.save_pretrained(tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["layers"][name]["mode"] == "uniform" and qc["layers"][name]["w_bit"] == 2
    assert_same_model(model, load(tmp_path), 96)


def test_dequantize_gives_the_dense_twin(tmp_path):
    model = quantized_tiny(5)
    model.save_pretrained(tmp_path)
    back = load(tmp_path)
    dense = back.dequantize(dtype=torch.float32)
    assert not mbwq_layers(dense) and not hasattr(dense.config, "quantization_config")
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(tokens).logits, dense(tokens).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()


# ------------------------------------------------------------------ from_pretrained, every source
def checkpoint_of(model):
    """A QuantizedCheckpoint (as mbwq_ops.loaders makes them) of a quantized model."""
    layers = {n: {"ctor": layer_ctor(layer_record(m)), "state": dict(m.state_dict())}
              for n, m in mbwq_layers(model).items()}
    tensors = {k: v for k, v in model.state_dict().items()
               if not any(k.startswith(n + ".") for n in layers)}
    tie = model.config.tie_word_embeddings
    if tie:
        tensors.pop("lm_head.weight")
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    return SimpleNamespace(source="test", config=cfg, layers=layers, tensors=tensors,
                           tie_word_embeddings=tie)


@pytest.mark.parametrize("tie", [False, True])
def test_build_model_from_a_quantized_checkpoint(tmp_path, tie):
    model = quantized_tiny(6, tie_word_embeddings=tie)
    built = mbwq_ops.hf.build_model(checkpoint_of(model), progress=False)
    assert built.config.tie_word_embeddings == tie
    assert_same_model(model, built, 96)
    built.save_pretrained(tmp_path)  # a converted model saves as an MBWQ checkpoint
    assert_same_model(model, load(tmp_path), 96)


def test_build_model_refuses_a_checkpoint_with_missing_or_extra_tensors():
    ck = checkpoint_of(quantized_tiny(7))
    ck.tensors.pop("model.norm.weight")
    with pytest.raises(ValueError, match=r"missing: model\.norm\.weight"):
        mbwq_ops.hf.build_model(ck, progress=False)
    ck = checkpoint_of(quantized_tiny(7))
    ck.tensors["model.extra.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"not used by the model: model\.extra\.weight"):
        mbwq_ops.hf.build_model(ck, progress=False)
    ck = checkpoint_of(quantized_tiny(7))
    ck.layers["model.layers.0.mlp.up_proj"]["state"]["scales"] = torch.ones(3, 3)
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.mlp\.up_proj: .*scales"):
        mbwq_ops.hf.build_model(ck, progress=False)


def test_save_quantized_folder_with_a_transformers_config(tmp_path):
    model = quantized_tiny(8, tie_word_embeddings=True)
    mbwq_ops.save_quantized(model, tmp_path / "q")
    with pytest.raises(ValueError, match=r"without a transformers config\.json.*load_quantized"):
        mbwq_ops.from_pretrained(tmp_path / "q", progress=False)
    model.config.save_pretrained(tmp_path / "q")
    assert mbwq_ops.hf.detect(tmp_path / "q") == "mbwq-save_quantized"
    assert_same_model(model, mbwq_ops.from_pretrained(tmp_path / "q", progress=False), 96)


@pytest.mark.parametrize("name", ["llama-channel-mix", "qwen2-layer-mix"])
def test_greenbit_folder_end_to_end(tmp_path, name):
    """A GreenBitAI folder gives the logits of a dense model holding its dequantized weights, and
    save_pretrained of it round-trips bit for bit."""
    folder = GREENBIT / name
    assert mbwq_ops.hf.detect(folder) == "greenbit"
    model = mbwq_ops.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert len(mbwq_layers(model)) == 14
    tokens = torch.randint(0, model.config.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(2))
    dense = mbwq_ops.from_pretrained(folder, dtype=torch.float32, progress=False)
    dense.dequantize(dtype=torch.float32)
    with torch.no_grad():
        a, b = model(tokens).logits, dense(tokens).logits
    assert a.abs().max() > 0 and (a - b).abs().max() < 1e-3 * b.abs().max()
    model.save_pretrained(tmp_path)
    assert_same_model(model, load(tmp_path), model.config.vocab_size)


@pytest.mark.parametrize("name", ["llama-4bit-sym-actorder", "llama-4bit-asym",
                                  "llama-3bit-sym-actorder", "llama-2bit-asym-actorder"])
def test_gptq_folder_gives_gptqmodels_logits(tmp_path, name):
    """GPTQModel's own fp16 logits (stored beside each fixture by the script that made it)."""
    folder = FIXTURES / "gptq" / name
    ref = load_file(FIXTURES / "gptq" / f"{name}.reference.safetensors")
    assert mbwq_ops.hf.detect(folder) == "gptq"
    model = mbwq_ops.from_pretrained(folder, dtype=torch.float16, progress=False)
    assert len(mbwq_layers(model)) == 14
    with torch.no_grad():
        y = model(ref["input_ids"]).logits.float()
    assert (y - ref["logits"]).abs().max() < 1e-2 * ref["logits"].abs().max()
    model.save_pretrained(tmp_path)
    assert_same_model(model, load(tmp_path), model.config.vocab_size)


def test_exl2_folder_end_to_end(tmp_path):
    folder = FIXTURES / "exl2" / "llama-exl2"
    assert mbwq_ops.hf.detect(folder) == "exl2"
    model = mbwq_ops.from_pretrained(folder, dtype=torch.float32, progress=False)
    assert isinstance(model.lm_head, MBWQLinear) and len(mbwq_layers(model)) == 15
    dense = mbwq_ops.from_pretrained(folder, dtype=torch.float32, progress=False)
    dense.dequantize(dtype=torch.float32)
    tokens = torch.randint(0, model.config.vocab_size, (2, 7),
                           generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a, b = model(tokens).logits, dense(tokens).logits
    assert a.abs().max() > 0 and (a - b).abs().max() < 1e-3 * b.abs().max()
    model.save_pretrained(tmp_path)
    assert_same_model(model, load(tmp_path), model.config.vocab_size)


def test_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"not a quantized checkpoint this library reads"):
        mbwq_ops.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nosuch"):
        mbwq_ops.from_pretrained(tmp_path / "nosuch")
    with pytest.raises(ValueError, match="dtype must be a floating-point"):
        mbwq_ops.from_pretrained(tmp_path, dtype=torch.int8)


def test_without_transformers_from_pretrained_says_what_to_install():
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import mbwq_ops\n"
            "try:\n    mbwq_ops.from_pretrained('.')\n"
            "except ImportError as e:\n    print('IMPORTERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(__file__))
    assert "IMPORTERROR" in out.stdout and 'pip install "mbwq_ops[hf]"' in out.stdout, out


def test_import_mbwq_ops_does_not_import_transformers():
    code = "import sys, mbwq_ops; print('transformers' in sys.modules, 'mbwq_ops.hf' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out


@pytest.mark.parametrize("order", ["mbwq_ops first", "transformers first"])
def test_plain_transformers_load_never_gives_random_weights(tmp_path, order):
    """A folder written by save_pretrained loads through AutoModelForCausalLM with nothing but
    ``import mbwq_ops`` in the process, in either import order: the quantizer registers itself
    when transformers is imported, so the MBWQ layers come back, not random Linear weights."""
    folder = str(tmp_path / "ckpt")
    mbwq_ops.hf.tiny.save_tiny_checkpoint(folder, bpw=3.0)
    first, second = ("mbwq_ops", "transformers") if order == "mbwq_ops first" else (
        "transformers", "mbwq_ops")
    code = (f"import {first}, {second}, torch, sys\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({folder!r})\n"
            "n = sum(isinstance(x, mbwq_ops.MBWQLinear) for x in m.modules())\n"
            "ids = torch.arange(10).reshape(1, 10)\n"
            "torch.save(m(ids).logits, sys.argv[1]); print(n)\n")
    out = tmp_path / "logits.pt"
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) > 0
    expect = mbwq_ops.from_pretrained(folder)(torch.arange(10).reshape(1, 10)).logits
    assert torch.equal(torch.load(out), expect)
