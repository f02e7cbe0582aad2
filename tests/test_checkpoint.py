"""save_quantized / load_quantized: bit-exact round trips, config contents, errors."""
import json
import os

import pytest
import torch
from torch import nn

import mbwq_ops
from mbwq_ops import checkpoint as C
from mbwq_ops.apps.tiny_llama import LlamaConfig, TinyLlama

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_layers=2,
                  num_heads=2, num_kv_heads=1, max_seq_len=32, seed=3)


def _quantized(dtype=torch.bfloat16):
    model = TinyLlama(CFG)
    # uniform 2-bit MLPs, mixed (allocated) attention, lm_head kept in floating point
    mbwq_ops.quantize_model(model, bits=2, group_size=32, skip=("lm_head", "*self_attn*"),
                            verbose=False)
    mbwq_ops.quantize_model(model, bpw=3.5, group_size=32, verbose=False)
    return model.to(dtype)


def test_round_trip_bit_exact(tmp_path):
    model = _quantized()
    modes = {n: m.use_mbw for n, m in model.named_modules() if isinstance(m, mbwq_ops.MBWQLinear)}
    assert set(modes.values()) == {True, False}
    C.save_quantized(model, tmp_path, metadata={"note": "test"})
    # a float32 skeleton: parameters take the checkpoint's dtype
    loaded = mbwq_ops.load_quantized(lambda: TinyLlama(CFG), tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    tokens = torch.randint(0, CFG.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    assert mbwq_ops.bits_per_weight(loaded) == mbwq_ops.bits_per_weight(model)
    # a module instance works too
    again = mbwq_ops.load_quantized(TinyLlama(CFG), tmp_path)
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


def test_config_contents(tmp_path):
    model = _quantized()
    C.save_quantized(model, tmp_path, metadata={"model": {"kind": "tiny-llama"}})
    cfg = json.loads((tmp_path / C.CONFIG_NAME).read_text())
    assert cfg["quant_method"] == "mbwq" and cfg["metadata"]["model"]["kind"] == "tiny-llama"
    assert abs(cfg["bpw"] - mbwq_ops.bits_per_weight(model)) < 1e-12
    down = cfg["layers"]["model.layers.0.mlp.down_proj"]
    assert down["mode"] == "uniform" and down["w_bit"] == 2 and down["group_size"] == 32
    assert down["widths"] == {"2": 160} and len(down["groups"]) == 5
    q = cfg["layers"]["model.layers.0.self_attn.q_proj"]
    assert q["mode"] == "mixed" and sum(r for _, r in q["groups"]) == 64
    assert "lm_head" not in cfg["layers"]
    assert os.path.exists(tmp_path / C.WEIGHTS_NAME)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.proj = nn.Linear(64, 64)
        self.head = nn.Linear(64, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        return self.head(self.proj(self.emb(t)))


def test_tied_weights_stored_once_and_restored(tmp_path):
    torch.manual_seed(0)
    model = _Tied()
    mbwq_ops.quantize_model(model, bits=4, group_size=32, skip=("head",), verbose=False)
    C.save_quantized(model, tmp_path)
    cfg = C.read_config(tmp_path)
    assert cfg["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    loaded = mbwq_ops.load_quantized(_Tied, tmp_path)
    assert loaded.head.weight is loaded.emb.weight
    t = torch.randint(0, 50, (3, 4))
    with torch.no_grad():
        assert torch.equal(model(t), loaded(t))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="no MBWQLinear"):
        C.save_quantized(nn.Sequential(nn.Linear(32, 8)), tmp_path / "a")
    model = _quantized()
    C.save_quantized(model, tmp_path / "b")
    other = LlamaConfig(**{**CFG.to_dict(), "intermediate_size": 192})
    with pytest.raises(C.CheckpointError, match=r"b/mbwq_config\.json: layers\["
                       r"\"model\.layers\.0\.mlp\.gate_proj\"\]: 64->160 features, but the "
                       r"model's model\.layers\.0\.mlp\.gate_proj is 64->192"):
        mbwq_ops.load_quantized(lambda: TinyLlama(other), tmp_path / "b")
    # a corrupted layer in the weights file is named
    from safetensors.torch import load_file, save_file
    weights = tmp_path / "b" / C.WEIGHTS_NAME
    sd = load_file(weights)
    key = sorted(k for k in sd if k.endswith("q_perm"))[0]
    sd[key][5] = sd[key][6]
    save_file(sd, weights)
    with pytest.raises(ValueError, match=rf"b/model\.safetensors: layer {key[:-len('.q_perm')]}: "
                                         r"q_perm is not a permutation"):
        mbwq_ops.load_quantized(lambda: TinyLlama(CFG), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / C.CONFIG_NAME).write_text(json.dumps({"quant_method": "gptq"}))
    with pytest.raises(ValueError, match="quant_method"):
        C.read_config(tmp_path / "c")
