"""Bad checkpoint folders: every malformed config, weights file or alias gives one
CheckpointError (a ValueError) naming the file and the field -- from read_config, load_quantized
and `mbwq inspect` / `mbwq bench DIR` (one `mbwq: ...` line, exit code 2) -- and nothing is
allocated from a size the files declare before it has been checked."""
import json
import math
import os
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import mbwq_ops
from mbwq_ops import MBWQLinear
from mbwq_ops import checkpoint as C
from mbwq_ops.apps import cli

CONFIG, WEIGHTS = C.CONFIG_NAME, C.WEIGHTS_NAME
MIXED = "block.mixed"  # names of the layers of Net below
UNIFORM = "block.uniform"


class Net(nn.Module):
    """A mixed layer with a bias, a uniform one, and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 128)
        self.block = nn.Module()
        self.block.mixed = nn.Linear(128, 48, bias=True)
        self.block.uniform = nn.Linear(48 + 80, 128, bias=False)
        self.head = nn.Linear(128, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        h = self.emb(t)
        h = torch.cat([self.block.mixed(h), h[..., :80]], -1)
        return self.head(self.block.uniform(h))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    torch.manual_seed(0)
    model = Net()
    mbwq_ops.quantize_model(model, bits=4, group_size=32, skip=("head", "mixed"), verbose=False)
    mbwq_ops.quantize_model(model, bpw=3.5, group_size=32, skip=("head",), verbose=False)
    path = tmp_path_factory.mktemp("good") / "ckpt"
    C.save_quantized(model, path)
    cfg = json.loads((path / CONFIG).read_text())
    assert len(cfg["layers"][MIXED]["groups"]) >= 3  # the group edits below need three
    assert cfg["aliases"] in ({"head.weight": "emb.weight"}, {"emb.weight": "head.weight"})
    return path


@pytest.fixture
def ckpt(good, tmp_path):
    """A fresh copy of the good checkpoint, to break."""
    path = tmp_path / "q"
    shutil.copytree(good, path)
    return path


class Whole:
    """Returned by a config change: the new config instead of the edited one."""

    def __init__(self, doc):
        self.doc = doc


def edit_config(path, change):
    cfg = json.loads((path / CONFIG).read_text())
    new = change(cfg)  # edits cfg in place; what it returns counts only if a Whole
    (path / CONFIG).write_text(json.dumps(new.doc if isinstance(new, Whole) else cfg))


def edit_weights(path, change):
    sd = load_file(path / WEIGHTS)
    change(sd)
    save_file(sd, path / WEIGHTS)


def _fails(argv, capsys):
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("mbwq: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def expect_bad(path, needles, capsys, file=CONFIG, by_config_alone=False, inspect=True):
    """load_quantized raises one CheckpointError that starts with ``file`` and names
    ``needles``; so do read_config (when the config alone shows the problem) and `mbwq
    inspect` (unless the problem is only one of fitting the model)."""
    with pytest.raises(C.CheckpointError) as e:
        mbwq_ops.load_quantized(Net, path)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and msg.startswith(f"{path / file}: "), msg
    for n in needles:
        assert n in msg, (n, msg)
    if by_config_alone:
        with pytest.raises(C.CheckpointError) as e2:
            C.read_config(path)
        assert str(e2.value) == msg
    if inspect:
        err = _fails(["inspect", path], capsys)
        assert err == f"mbwq: {msg}\n"
    return msg


def _layer(cfg, name=MIXED):
    return cfg["layers"][name]


def _set(d, key, value):
    d[key] = value


L = f'layers["{MIXED}"]'
U = f'layers["{UNIFORM}"]'

CONFIG_CASES = [  # id, change of the config dict, what the message names
    ("top level a list", lambda c: Whole([c]), ["must be a JSON object"]),
    ("quant_method", lambda c: _set(c, "quant_method", "gptq"), ["quant_method", "'gptq'"]),
    ("format_version string", lambda c: _set(c, "format_version", "1"),
     ["format_version: must be an integer", '"1"']),
    ("format_version bool", lambda c: _set(c, "format_version", True),
     ["format_version: must be an integer, got true"]),
    ("format_version zero", lambda c: _set(c, "format_version", 0),
     ["format_version: must be at least 1, got 0"]),
    ("format_version newer", lambda c: _set(c, "format_version", 2),
     ["format_version: 2 is newer"]),
    ("bpw string", lambda c: _set(c, "bpw", "3.0"), ["bpw: must be a number", '"3.0"']),
    ("bpw negative", lambda c: _set(c, "bpw", -1.0), ["bpw: must be a number >= 0, got -1.0"]),
    ("bpw_with_metadata bool", lambda c: _set(c, "bpw_with_metadata", False),
     ["bpw_with_metadata: must be a number"]),
    ("metadata a list", lambda c: _set(c, "metadata", [1]), ["metadata: must be an object"]),
    ("layers a list", lambda c: _set(c, "layers", list(c["layers"])),
     ["layers: must be an object of layer names, got ["]),
    ("layers empty", lambda c: _set(c, "layers", {}), ["layers: names no layer"]),
    ("layers missing", lambda c: c.pop("layers"), ["layers: must be an object", "got null"]),
    ("layer not an object", lambda c: _set(c["layers"], MIXED, [1, 2]),
     [f"{L}: must be an object"]),
    ("layer name empty", lambda c: _set(c["layers"], "", _layer(c)), ['layers[""]: is not a']),
    ("layer without groups", lambda c: _layer(c).pop("groups"), [f"{L}: has no 'groups'"]),
    ("mode", lambda c: _set(_layer(c), "mode", "dense"), [f"{L}.mode: must be 'mixed' or"]),
    ("in_features string", lambda c: _set(_layer(c), "in_features", "128"),
     [f"{L}.in_features: must be an integer"]),
    ("in_features negative", lambda c: _set(_layer(c), "in_features", -128),
     [f"{L}.in_features: must be at least 1, got -128"]),
    ("in_features absurd", lambda c: _set(_layer(c), "in_features", 2 ** 50),
     [f"{L}.in_features: in_features must be a positive multiple of 32 and at most 65536"]),
    ("out_features bool", lambda c: _set(_layer(c), "out_features", True),
     [f"{L}.out_features: must be an integer, got true"]),
    ("out_features float", lambda c: _set(_layer(c), "out_features", 48.0),
     [f"{L}.out_features: must be an integer, got 48.0"]),
    ("bias a string", lambda c: _set(_layer(c), "bias", "yes"),
     [f"{L}.bias: must be true or false"]),
    ("bias an int", lambda c: _set(_layer(c), "bias", 1), [f"{L}.bias: must be true or false"]),
    ("groups not a list", lambda c: _set(_layer(c), "groups", {"4": 128}),
     [f"{L}.groups: must be a list of [bits, rows] pairs"]),
    ("groups empty", lambda c: _set(_layer(c), "groups", []), [f"{L}.groups: is empty"]),
    ("group not a pair", lambda c: _set(_layer(c)["groups"], 1, [4, 32, 1]),
     [f"{L}.groups[1]: must be a [bits, rows] pair, got [4, 32, 1]"]),
    ("group bits a string", lambda c: _set(_layer(c)["groups"], 2, ["4", 32]),
     [f"{L}.groups[2][0] (bits): must be an integer"]),
    ("group bits a bool", lambda c: _set(_layer(c)["groups"], 0, [True, 32]),
     [f"{L}.groups[0][0] (bits): must be an integer, got true"]),
    ("group rows a float", lambda c: _set(_layer(c)["groups"], 0, [4, 32.0]),
     [f"{L}.groups[0][1] (rows): must be an integer, got 32.0"]),
    ("group width 7", lambda c: _set(_layer(c)["groups"], 2, [7, 32]),
     [f"{L}.groups: group 2 has width 7; allowed widths are (8, 6, 5, 4, 3, 2)"]),
    ("group rows 48", lambda c: _set(_layer(c)["groups"], 1, [_layer(c)["groups"][1][0], 48]),
     [f"{L}.groups: group 1 has 48 rows; it must be a positive multiple of 32"]),
    ("group rows negative", lambda c: _set(_layer(c)["groups"], 0, [8, -32]),
     [f"{L}.groups: group 0 has -32 rows"]),
    ("group rows absurd", lambda c: _set(_layer(c)["groups"], 0, [8, 2 ** 60]),
     [f"{L}.groups: cover"]),
    ("groups short", lambda c: _layer(c)["groups"].pop(), [f"{L}.groups: cover 96 rows, "
                                                          "in_features is 128"]),
    ("groups out of order", lambda c: _set(_layer(c), "groups", [[2, 32], [8, 96]]),
     [f"{L}.groups: groups must be sorted by width 8, 6, 5, 4, 3, 2; group 0 (2-bit)"]),
    ("mixed w_bit", lambda c: _set(_layer(c), "w_bit", 7), [f"{L}.w_bit: must be one of"]),
    ("uniform w_bit", lambda c: _set(_layer(c, UNIFORM), "w_bit", 3),
     [f"{U}: w_bit must be 4 or 2 for a uniform layer", "got 3"]),
    ("uniform group_size", lambda c: _set(_layer(c, UNIFORM), "group_size", 48),
     [f"{U}: group_size must be a positive multiple of 32, got 48"]),
    ("uniform groups", lambda c: _set(_layer(c, UNIFORM), "groups", [[4, 64], [4, 64]]),
     [f"{U}.groups: [[4, 64], [4, 64]] is not the uniform 4-bit layout"]),
    ("widths", lambda c: _set(_layer(c), "widths", {"8": 128}), [f"{L}.widths: "]),
    ("layer bytes negative", lambda c: _set(_layer(c), "bytes", -5),
     [f"{L}.bytes: must be at least 0, got -5"]),
    ("aliases a list", lambda c: _set(c, "aliases", ["x"]), ["aliases: must be an object"]),
    ("alias target not a name", lambda c: _set(c, "aliases", {"head.weight": 3}),
     ['aliases["head.weight"]: must be a tensor name, got 3']),
]


@pytest.mark.parametrize("change, needles", [pytest.param(c, n, id=i) for i, c, n in CONFIG_CASES])
def test_bad_config(ckpt, change, needles, capsys):
    edit_config(ckpt, change)
    expect_bad(ckpt, needles, capsys, by_config_alone=True)


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON (Expecting property name"),
    ("", "not valid JSON"),
    ("[" * 100000, "not valid JSON"),  # deeper than the parser's recursion
    ('{"quant_method": "mbwq", "bpw": NaN}', "not valid JSON (NaN is not a JSON number)"),
    ('{"quant_method": "mbwq", "bpw": 1' + "0" * 5000 + "}", "not valid JSON"),
], ids=["broken", "empty", "deep", "nan", "huge-int"])
def test_config_not_json(ckpt, text, needle, capsys):
    (ckpt / CONFIG).write_text(text)
    expect_bad(ckpt, [needle], capsys, by_config_alone=True)


def test_config_not_text(ckpt, capsys):
    (ckpt / CONFIG).write_bytes(b"\xff\xfe\x00garbage")
    expect_bad(ckpt, ["not UTF-8 text"], capsys, by_config_alone=True)


def test_config_missing_or_a_directory(ckpt):
    (ckpt / CONFIG).unlink()
    with pytest.raises(C.CheckpointError, match=rf"{CONFIG}: no such file") as e:
        mbwq_ops.load_quantized(Net, ckpt)
    assert isinstance(e.value, FileNotFoundError)  # as before the checks
    (ckpt / CONFIG).mkdir()
    with pytest.raises(C.CheckpointError, match=rf"{CONFIG}: is not a file"):
        C.read_config(ckpt)


# ----------------------------------------------------------------------------- the weights file
def test_truncated_or_corrupt_weights(ckpt, capsys):
    data = (ckpt / WEIGHTS).read_bytes()
    for broken, needle in ((data[:len(data) // 2], "incomplete metadata"),
                           (data[:5], "header"), (b"", "header"),
                           (os.urandom(4096), "header")):
        (ckpt / WEIGHTS).write_bytes(broken)
        expect_bad(ckpt, ["not a readable safetensors file", needle], capsys, WEIGHTS)
    (ckpt / WEIGHTS).unlink()
    expect_bad(ckpt, ["no such file"], capsys, WEIGHTS)


def test_huge_declared_shape_allocates_nothing(ckpt, monkeypatch, capsys):
    # the config asks for a 2^50-byte layer: rejected against the file's header, before any
    # layer (or any of its buffers) is built
    edit_config(ckpt, lambda c: _set(_layer(c), "out_features", 2 ** 47))

    def no_layer(*a, **k):
        raise AssertionError("a layer was built before the checks")
    monkeypatch.setattr(C, "MBWQLinear", no_layer)
    msg = expect_bad(ckpt, [f"{MIXED}.qweight: shape must be [", f"{2 ** 47}]", "got [",
                            ", 48]"], capsys, WEIGHTS)
    assert f"layers[\"{MIXED}\"] of {CONFIG}" in msg


@pytest.mark.parametrize("tensor, change, needles", [
    ("scales", lambda t: t.float(), ["dtype must be torch.float16 (the stored format), "
                                     "got torch.float32"]),
    ("qweight", lambda t: t.to(torch.int64), ["dtype must be torch.int32", "torch.int64"]),
    ("q_perm", lambda t: t.to(torch.int32), ["dtype must be torch.int16"]),
    ("qweight", lambda t: t[:-1], ["shape must be ["]),
    ("zeros", lambda t: t.reshape(-1), ["shape must be ["]),
    ("channel_scale", lambda t: t.reshape(-1), ["shape must be [1, 1, 128]", "got [128]"]),
    ("q_groups", lambda t: torch.cat([t, t]), ["shape must be ["]),
    ("bias", lambda t: t[:7], ["shape must be [48]", "got [7]"]),
    ("q_perm", None, ["is missing", f'(layers["{MIXED}"] of {CONFIG} needs it)']),
])
def test_layer_tensor_with_wrong_dtype_or_shape(ckpt, tensor, change, needles, capsys):
    key = f"{MIXED}.{tensor}"

    def edit(sd):
        if change is None:
            del sd[key]
        else:
            sd[key] = change(sd[key]).contiguous()
    edit_weights(ckpt, edit)
    expect_bad(ckpt, [key] + needles, capsys, WEIGHTS)


def test_bias_stored_but_config_says_none(ckpt, capsys):
    edit_weights(ckpt, lambda sd: _set(sd, f"{UNIFORM}.bias", torch.zeros(128, dtype=torch.half)))
    expect_bad(ckpt, [f"{UNIFORM}.bias is stored but layers[\"{UNIFORM}\"].bias is false"],
               capsys, WEIGHTS)


def test_other_tensors_must_fit_the_model(ckpt, capsys):
    stored = "emb.weight" if "emb.weight" in load_file(ckpt / WEIGHTS) else "head.weight"
    edit_weights(ckpt, lambda sd: _set(sd, stored, sd[stored][:, :64].contiguous()))
    # (inspect has no model to compare with)
    expect_bad(ckpt, [f"{stored}: shape [40, 64], but the model's is [40, 128]"], capsys,
               WEIGHTS, inspect=False)
    edit_weights(ckpt, lambda sd: _set(sd, stored, torch.zeros(40, 128, dtype=torch.int32)))
    expect_bad(ckpt, [f"{stored}: dtype torch.int32 cannot stand for the model's torch.float32"],
               capsys, WEIGHTS, inspect=False)


def test_missing_and_unexpected_tensors(ckpt, capsys):
    edit_weights(ckpt, lambda sd: (sd.pop(f"{MIXED}.qweight"), _set(sd, "extra", torch.ones(2))))
    edit_config(ckpt, lambda c: c["layers"].pop(MIXED))  # the mixed layer stays nn.Linear
    with pytest.raises(C.CheckpointError) as e:
        mbwq_ops.load_quantized(Net, ckpt)
    assert str(e.value) == (f"{ckpt / WEIGHTS}: does not fit the model: missing tensors "
                            f"{MIXED}.weight; tensors the model does not have "
                            f"{MIXED}.channel_scale, {MIXED}.q_groups, {MIXED}.q_perm, "
                            f"{MIXED}.scales, {MIXED}.zeros, extra")
    # strict=False loads what fits; the layer's own tensors are still required
    model = mbwq_ops.load_quantized(Net, ckpt, strict=False)
    assert isinstance(model.block.uniform, MBWQLinear)
    assert type(model.block.mixed) is nn.Linear


def test_alias_target_missing_or_shadowing(ckpt, capsys):
    cfg = json.loads((ckpt / CONFIG).read_text())
    (alias, target), = cfg["aliases"].items()
    edit_config(ckpt, lambda c: _set(c, "aliases", {alias: "nothing.here"}))
    expect_bad(ckpt, [f'aliases["{alias}"]: its target \'nothing.here\' is not stored in',
                      WEIGHTS], capsys)
    # an alias onto a tensor the file stores would silently replace it
    edit_config(ckpt, lambda c: _set(c, "aliases", {alias: target, f"{MIXED}.scales": target}))
    expect_bad(ckpt, [f'aliases["{MIXED}.scales"]: {MIXED}.scales is also stored in',
                      "shadow"], capsys)


def test_bad_values_are_named_with_the_file_and_leave_the_skeleton_alone(ckpt, capsys):
    def swap(sd):
        p = sd[f"{MIXED}.q_perm"]
        p[3] = p[4]
    edit_weights(ckpt, swap)
    skeleton = Net()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(C.CheckpointError, match=rf"{WEIGHTS}: layer {MIXED}: q_perm is not a "
                                               r"permutation of 0\.\.127"):
        mbwq_ops.load_quantized(skeleton, ckpt)
    after = skeleton.state_dict()
    assert type(skeleton.block.mixed) is nn.Linear and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # inspect reads no tensor values: it still shows the checkpoint
    assert cli.main(["inspect", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["name"] == MIXED


@pytest.mark.parametrize("tensor, value", [("scales", math.nan), ("zeros", math.inf),
                                           ("scales", -math.inf)])
def test_non_finite_scales_or_zeros_named_with_the_file(ckpt, tensor, value, capsys):
    def poison(sd):
        sd[f"{UNIFORM}.{tensor}"][1, 2] = value
    edit_weights(ckpt, poison)
    with pytest.raises(C.CheckpointError) as e:
        mbwq_ops.load_quantized(Net, ckpt)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt / WEIGHTS}: layer {UNIFORM}: {tensor}") and "[1, 2]" in msg


def test_good_checkpoint_still_round_trips(good):
    model = mbwq_ops.load_quantized(Net, good)
    assert model.head.weight is model.emb.weight
    assert isinstance(model.block.mixed, MBWQLinear) and model.block.mixed.bias is not None
    t = torch.randint(0, 40, (2, 5))
    again = mbwq_ops.load_quantized(Net(), good)
    with torch.no_grad():
        assert torch.equal(model(t), again(t))


def test_skeleton_mismatch_names_the_config_field(ckpt):
    class Other(Net):
        def __init__(self):
            super().__init__()
            self.block.mixed = nn.Conv1d(128, 48, 1)
    with pytest.raises(C.CheckpointError, match=rf'{CONFIG}: layers\["{MIXED}"\]: the model\'s '
                                               rf"{MIXED} is a Conv1d, not a linear layer"):
        mbwq_ops.load_quantized(Other, ckpt)
    class Fewer(Net):
        def __init__(self):
            super().__init__()
            del self.block.mixed
    with pytest.raises(C.CheckpointError, match=rf'{CONFIG}: layers\["{MIXED}"\]: the model has '
                                               rf"no module '{MIXED}'"):
        mbwq_ops.load_quantized(Fewer, ckpt)


def test_load_quantized_argument_types(good):
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        mbwq_ops.load_quantized(42, good)
    with pytest.raises(TypeError, match="the factory returned a dict"):
        mbwq_ops.load_quantized(dict, good)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_is_a_checkpoint_error_or_a_model(good, tmp_path_factory, data):
    # any bytes of either file overwritten (mostly in the safetensors header and the JSON,
    # where the structure lives), or the file cut short: a model or one CheckpointError
    path = tmp_path_factory.mktemp("fuzz") / "q"
    shutil.copytree(good, path)
    name = data.draw(st.sampled_from([CONFIG, WEIGHTS]))
    raw = bytearray((path / name).read_bytes())
    header = len(raw) if name == CONFIG else 8 + int.from_bytes(raw[:8], "little")
    if data.draw(st.booleans(), label="cut"):
        raw = raw[:data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4), label="edits")):
            at = data.draw(st.integers(0, header - 1) if data.draw(st.booleans()) else
                           st.integers(0, len(raw) - 1), label="at")
            raw[at] = data.draw(st.integers(0, 255), label="byte")
    (path / name).write_bytes(bytes(raw))
    try:
        model = mbwq_ops.load_quantized(Net, path)
    except C.CheckpointError as e:
        assert str(e).startswith(str(path)), e
    else:
        assert isinstance(model.block.mixed, MBWQLinear)


# ----------------------------------------------------------------------------- mbwq bench DIR
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "q"
    assert cli.main(["quantize", "--preset", "tiny", "--bits", "4", "--out", str(path),
                     "--quiet"]) == 0
    return path


@pytest.fixture
def llama_copy(llama, tmp_path):
    path = tmp_path / "q"
    shutil.copytree(llama, path)
    return path


def _model_config(change):
    def edit(c):
        change(c["metadata"]["model"]["config"])
    return edit


BENCH_CASES = [  # change of the config, what the message names
    (lambda c: _set(c, "layers", []), [CONFIG, "layers: must be an object"]),
    (lambda c: _set(c["layers"]["model.layers.0.mlp.up_proj"], "groups", [[4, "x"]]),
     [CONFIG, 'layers["model.layers.0.mlp.up_proj"].groups[0][1] (rows)']),
    (lambda c: _set(c["metadata"], "model", "tiny"), ["metadata.model: must be an object"]),
    (lambda c: c["metadata"]["model"].pop("config"),
     ["metadata.model.config: must be an object of LlamaConfig fields"]),
    (_model_config(lambda m: _set(m, "hidden_size", "abc")),
     ["metadata.model.config.hidden_size: must be an integer >= 1, got 'abc'"]),
    (_model_config(lambda m: _set(m, "num_layers", True)),
     ["metadata.model.config.num_layers: must be an integer >= 1, got True"]),
    (_model_config(lambda m: _set(m, "flash", 1)), ["metadata.model.config: unknown field 'flash'"]),
    (_model_config(lambda m: _set(m, "rms_eps", -1.0)),
     ["metadata.model.config.rms_eps: must be a finite number > 0"]),
    (_model_config(lambda m: _set(m, "num_kv_heads", 3)), ["num_kv_heads 3 must divide"]),
    (_model_config(lambda m: _set(m, "max_seq_len", 2 ** 40)),
     ["metadata.model.config.max_seq_len: at most 65536"]),
    # sizes that would allocate 2^50+ bytes: checked against the file on the meta device first
    (_model_config(lambda m: _set(m, "vocab_size", 2 ** 40)),
     [WEIGHTS, "model.embed_tokens.weight: shape [512, 128], but the model's is [1099511627776, "
               "128]"]),
    (_model_config(lambda m: _set(m, "hidden_size", 2 ** 62)),
     ["metadata.model.config: no model can be built from it (RuntimeError: Storage size"]),
    (_model_config(lambda m: _set(m, "num_layers", 2 ** 20)),
     ["metadata.model.config.num_layers: 1048576 layers, but model.safetensors holds only"]),
]


@pytest.mark.parametrize("change, needles", BENCH_CASES)
def test_bench_on_a_bad_checkpoint(llama_copy, change, needles, capsys):
    edit_config(llama_copy, change)
    err = _fails(["bench", llama_copy, "--modes", "eager", "--new-tokens", "1"], capsys)
    assert err.startswith(f"mbwq: {llama_copy}")
    for n in needles:
        assert n in err, (n, err)


def test_bench_on_truncated_weights(llama_copy, capsys):
    data = (llama_copy / WEIGHTS).read_bytes()
    (llama_copy / WEIGHTS).write_bytes(data[:1000])
    err = _fails(["bench", llama_copy, "--modes", "eager", "--new-tokens", "1"], capsys)
    assert err.startswith(f"mbwq: {llama_copy / WEIGHTS}: not a readable safetensors file")
