"""green-bit-llm strategy files as they are published: block-level numbers beside the entries,
the misspelt "scale_groups:" key, and values that are not integers named by their field."""
import json
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from mbwq_ops.quant import quantize as Q
from mbwq_ops.quant.strategy import (check_entry, load_strategy, strategy_entry,
                                     unmatched_entries)

ENTRY = {"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size": {"4": 32, "2": 32},
         "scale_bits": 4}
# The shape of a published quant_strategy.json block (values made up).
REAL_BLOCK = {"q_proj": dict(ENTRY), "k_proj": dict(ENTRY, **{"scale_groups:": 32}),
              "mlp.down_proj": {"bits": [4], "bits_prop": [1.0], "group_size": {"4": 128}},
              "accuracy": 0.9731, "total_bits": 123456789, "scale_groups:": 32}


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn()


def test_real_file_layout_loads_without_warnings(tmp_path):
    path = tmp_path / "quant_strategy.json"
    path.write_text(json.dumps({"measurement": {"model.layers.0": REAL_BLOCK,
                                                "model.layers.1": REAL_BLOCK}}))
    m = _quiet(lambda: load_strategy(str(path)))
    assert strategy_entry(m, "model.layers.1.self_attn.q_proj") == ENTRY
    assert strategy_entry(m, "model.layers.0.self_attn.k_proj")["scale_groups:"] == 32
    assert strategy_entry(m, "model.layers.0.mlp.down_proj")["bits"] == [4]
    assert strategy_entry(m, "model.layers.0.accuracy") is None  # a number is not an entry
    names = [f"model.layers.{i}.{s}" for i in (0, 1)
             for s in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj")]
    assert unmatched_entries(m, names) == []
    assert unmatched_entries(m, names[:2]) == ["model.layers.0.mlp.down_proj", "model.layers.1.q_proj",
                                               "model.layers.1.k_proj", "model.layers.1.mlp.down_proj"]


def test_a_real_file_quantizes_a_model(tmp_path):
    from mbwq_ops.apps.tiny_llama import LlamaConfig, TinyLlama
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=2, num_kv_heads=1, max_seq_len=16)
    path = tmp_path / "quant_strategy.json"
    path.write_text(json.dumps({"measurement": {"model.layers.0": REAL_BLOCK}}))
    import mbwq_ops
    model = mbwq_ops.quantize_model(TinyLlama(cfg), bits=4, strategy=str(path), verbose=False)
    q = Q.layer_bits(model.model.layers[0].self_attn.q_proj)
    assert q["rows_per_width"] == {4: 32, 2: 32}  # K = 64: 0.75 * 64 = 48 -> one 32-row group


@pytest.mark.parametrize("entry,field", [
    ({"bits": [4], "group_size": 64.5}, r"group_size must be an integer number of rows, got 64\.5"),
    ({"bits": [4], "group_size": 64.0}, r"group_size must be an integer number of rows, got 64\.0"),
    ({"bits": [4], "group_size": None}, r"group_size must be an integer number of rows, got None"),
    ({"bits": [4], "group_size": "abc"}, r"group_size must be an integer number of rows, got 'abc'"),
    ({"bits": [4], "group_size": True}, r"group_size must be an integer number of rows, got True"),
    ({"bits": [4, 2], "bits_prop": [0.5, 0.5], "group_size": {"4": 32, "2": 64.5}},
     r"group_size\['2'\] must be an integer number of rows, got 64\.5"),
    ({"bits": [4, 2], "bits_prop": [0.5, 0.5], "group_size": [32, None]},
     r"group_size\[1\] must be an integer number of rows, got None"),
    ({"bits": [4.0]}, r"bits\[0\] must be an integer width, got 4\.0"),
    ({"bits": ["4"]}, r"bits\[0\] must be an integer width, got '4'"),
    ({"bits": None}, r"bits must be a list of integer widths, got None"),
    ({"bits": [4, 2], "bits_prop": [0.5, None]}, r"bits_prop\[1\] must be a real number, got None"),
    ({"bits": [4, 2], "bits_prop": [0.5, "x"]}, r"bits_prop\[1\] must be a real number, got 'x'"),
    ({"bits": [4, 2], "bits_prop": [0.5, float("nan")]}, r"bits_prop\[1\] must be a real number, got nan"),
    ({"bits": [4, 2], "bits_prop": 0.5}, r"bits_prop must be a list of shares"),
    ({"bits": [4], "scale_bits": 4.5}, r"scale_bits must be an integer, got 4\.5"),
    ({"bits": [4], "scale_groups:": "x"}, r"scale_groups: must be an integer, got 'x'"),
])
def test_values_that_are_not_integers_are_named(entry, field):
    # in a file: the entry's key path and the field
    with pytest.raises(ValueError, match=r"strategy: model\.layers\.0\.q_proj: " + field):
        load_strategy({"measurement": {"model.layers.0": {"q_proj": entry, "accuracy": 0.5}}})
    with pytest.raises(ValueError, match=r"strategy: model\.layers\.0\.self_attn\.q_proj: " + field):
        load_strategy({"model.layers.0.self_attn.q_proj": entry})


def test_plan_from_strategy_no_longer_truncates():
    W = torch.randn(128, 16)
    ok = {"bits": [4, 2], "bits_prop": [0.5, 0.5], "group_size": {"4": 64, "2": 32}}
    assert Q.plan_from_strategy(W, None, ok).groups == [(4, 64), (2, 32), (2, 32)]
    with pytest.raises(ValueError, match=r"group_size\['4'\] must be an integer number of rows, got 64\.5"):
        Q.plan_from_strategy(W, None, dict(ok, group_size={"4": 64.5, "2": 32}))
    lin = nn.Linear(128, 16)
    with pytest.raises(ValueError, match=r"group_size\[4\] must be an integer number of rows, got 32\.5"):
        Q.quantize_linear(lin, bits=[4, 2], bits_prop=[0.5, 0.5], group_size={4: 32.5, 2: 32})


def test_a_block_entry_that_is_a_mapping_must_still_be_an_entry():
    with pytest.raises(ValueError, match=r"strategy: model\.layers\.0\.q_proj must be an entry"):
        load_strategy({"measurement": {"model.layers.0": {"q_proj": {"bit": [4]}, "accuracy": 1}}})
    # a number at the top level is not a block: still an error (a misplaced entry, say)
    with pytest.raises(ValueError, match=r"'model\.layers\.0' must be an entry"):
        load_strategy({"measurement": {"model.layers.0": 0.97}})


scalar = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(), st.none(),
                   st.text(max_size=5))


@given(extra=st.dictionaries(st.sampled_from(["accuracy", "total_bits", "scale_groups:",
                                               "loss", "bpw"]), scalar, max_size=5),
       widths=st.lists(st.sampled_from([8, 6, 5, 4, 3, 2]), min_size=1, max_size=3, unique=True),
       gs=st.sampled_from([32, 64, 128]))
def test_any_block_numbers_are_skipped(extra, widths, gs):
    e = {"bits": widths, "bits_prop": [1 / len(widths)] * len(widths),
         "group_size": {str(b): gs for b in widths}}
    m = _quiet(lambda: load_strategy({"measurement": {"model.layers.3": dict(extra, o_proj=e)}}))
    assert strategy_entry(m, "model.layers.3.self_attn.o_proj") == e
    assert unmatched_entries(m, ["model.layers.3.self_attn.o_proj"]) == []
    check_entry(e)  # a well-formed entry passes
