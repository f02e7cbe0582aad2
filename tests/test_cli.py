"""The mbwq command: --help everywhere, quantize -> inspect -> bench, strategies, JSON output,
bad input ending in a one-line message and exit code 2."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mbwq_ops.apps import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_script_declared():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["mbwq"] == "mbwq_ops.apps.cli:main"


@pytest.mark.parametrize("sub", [[], ["quantize"], ["inspect"], ["bench"], ["demo"]])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(sub + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and "--json" in out or sub == []
    if sub == ["demo"]:
        assert "--preset" in out and "--modes" in out


def test_quantize_inspect_bench(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--preset", "tiny", "--bpw", "3.0", "--out", str(out),
                     "--write-strategy", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)
    assert q["quant_method"] == "mbwq" and 2.5 < q["bpw"] <= 3.0
    assert len(q["layers"]) == 14  # 2 layers x 7 linears, lm_head skipped

    assert cli.main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bpw"] == q["bpw"] and info["file_bytes"] > info["quantized_bytes"] > 0
    assert all(sum(l["widths"].values()) == l["in"] for l in info["layers"])
    assert cli.main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "bits per weight" in text

    # the strategy written above reproduces the same layout
    out2 = tmp_path / "q2"
    assert cli.main(["quantize", "--preset", "tiny", "--out", str(out2), "--strategy",
                     str(out / "quant_strategy.json"), "--json"]) == 0
    q2 = json.loads(capsys.readouterr().out)
    assert [l["widths"] for l in q2["layers"]] == [l["widths"] for l in q["layers"]]

    assert cli.main(["bench", str(out), "--modes", "eager", "--new-tokens", "4", "--json"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert b["runs"]["eager"]["tokens_per_s"] > 0
    # options of the built-in model are not silently ignored with a checkpoint
    assert "--bpw: only for the built-in model" in _fails(["bench", str(out), "--bpw", "3"], capsys)


def test_uniform_and_subprocess(tmp_path):
    out = tmp_path / "u4"
    r = subprocess.run([sys.executable, "-m", "mbwq_ops", "quantize", "--preset", "tiny",
                        "--bits", "4", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "mbwq_ops", "inspect", str(out), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    info = json.loads(r.stdout)
    assert {l["mode"] for l in info["layers"]} == {"uniform"}
    assert 4.25 <= info["bpw"] < 4.26  # 352-row layers end with a 96-row group


def test_errors(tmp_path, capsys):
    assert cli.main(["quantize", "--model", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "mbwq: unknown model 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect"])  # missing path


def _fails(argv, capsys):
    """Run the CLI; it must stop with exit code 2 (argparse's, or main's for the library's
    errors) and a message, not an exception (which would print a traceback). Returns stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


BAD_INPUT = [  # argv, what the message must name, marks
    (["quantize", "--bits", "7"], ["--bits", "7"], ()),
    (["quantize", "--method", "gptq"], ["--method gptq", "--calibration"], ()),
    (["quantize", "--device", "cuda"], ["--device", "'cuda'", "CUDA"], NO_CUDA),
    (["quantize", "--device", "tpu"], ["--device", "'tpu'"], ()),
    (["quantize", "--strategy", "{tmp}/quant_strategy.json"], ["--strategy", "quant_strategy.json"],
     ()),
    (["quantize", "--weights", "{tmp}/nofile.safetensors"], ["--weights", "nofile.safetensors"],
     ()),
    (["quantize", "--calibration", "-1"], ["--calibration", "'-1'"], ()),
    (["quantize", "--bpw", "3", "--bits", "4"], ["--bits", "--bpw", "not allowed"], ()),
    (["quantize", "--bpw", "0"], ["--bpw", "'0'"], ()),
    (["quantize", "--group-size", "32,48"], ["--group-size", "'48'", "multiple of 32"], ()),
    (["quantize", "--model", "minilm", "--preset", "tiny"], ["--preset"], ()),
    (["inspect", "{tmp}/nosuchdir"], ["nosuchdir", "no such directory"], ()),
    (["inspect", "{tmp}"], ["not an MBWQ checkpoint"], ()),
    (["bench", "{tmp}/nosuchdir"], ["nosuchdir"], ()),
    (["bench", "--dtype", "foo"], ["--dtype", "'foo'"], ()),
    (["bench", "--modes", "cudagraph"], ["--modes cudagraph", "CUDA"], NO_CUDA),
    (["bench", "--modes", "eager,nope"], ["--modes", "'nope'"], ()),
    (["bench", "--quality", "--budgets", "abc"], ["--budgets", "'abc'"], ()),
    (["bench", "--quality", "--budgets", "4.0,x"], ["--budgets", "'x'"], ()),
    (["bench", "--new-tokens", "0"], ["--new-tokens", "'0'"], ()),
    (["bench", "--bits", "4", "--unquantized"], ["--unquantized", "--bits"], ()),
    (["bench", "--preset", "tiny", "--prompt-len", "60"], ["--prompt-len 60", "max_seq_len 64"],
     ()),
    (["bench", "--preset", "tiny", "--no-gptq"], ["--no-gptq", "--quality"], ()),
    (["demo", "--prompt-len", "0"], ["--prompt-len", "'0'"], ()),
    (["demo", "--new-tokens", "0"], ["--new-tokens", "'0'"], ()),
    (["demo", "--preset", "tiny", "--prompt-len", "60"], ["--prompt-len 60", "max_seq_len 64"], ()),
]


@pytest.mark.parametrize("argv, names", [pytest.param(a, n, marks=m, id=" ".join(a))
                                         for a, n, m in BAD_INPUT])
def test_bad_input_exits_2_naming_it(argv, names, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] == "quantize":
        argv += ["--preset", "tiny"] * ("--preset" not in argv and "--model" not in argv)
        argv += ["--out", str(tmp_path / "q"), "--quiet"]
    err = _fails(argv, capsys)
    for name in names:
        assert name in err
    assert not (tmp_path / "q").exists()  # stopped before any work


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = _fails(["quantize", "--preset", "tiny", "--out", str(tmp_path / "afile"), "--quiet"],
                 capsys)
    assert "afile is a file; the checkpoint is a directory" in err


def test_weights_of_a_quantized_checkpoint_are_named(tmp_path, capsys):
    from mbwq_ops.checkpoint import WEIGHTS_NAME
    assert cli.main(["quantize", "--preset", "tiny", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    capsys.readouterr()
    err = _fails(["quantize", "--preset", "tiny", "--weights", str(tmp_path / "q" / WEIGHTS_NAME),
                  "--out", str(tmp_path / "q2"), "--quiet"], capsys)
    assert "holds quantized layers" in err and err.count("\n") == 1


def test_warnings_are_one_line_advice(tmp_path):
    # a subprocess: pytest would capture the warning before it is printed
    r = subprocess.run([sys.executable, "-m", "mbwq_ops", "quantize", "--preset", "tiny",
                        "--skip", "lm_haed", "--out", str(tmp_path / "q"), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["mbwq: warning: quantize_model: skip pattern(s) ['lm_haed'] "
                                     "match no module of the model; check the names"]


def test_library_errors_are_one_line(tmp_path, capsys):
    # raised by quantize_model, past what argparse can check: main prints them, exit code 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    err = _fails(["quantize", "--preset", "tiny", "--strategy", str(bad), "--out",
                  str(tmp_path / "q"), "--quiet"], capsys)
    assert err.startswith("mbwq: --strategy") and "bad.json" in err and err.count("\n") == 1
    bad.write_text(json.dumps({"model.layers.0.self_attn.q_proj": {"bits": [7]}}))
    err = _fails(["quantize", "--preset", "tiny", "--strategy", str(bad), "--out",
                  str(tmp_path / "q"), "--quiet"], capsys)
    assert err.startswith("mbwq: ") and "7" in err and err.count("\n") == 1


@pytest.mark.parametrize("content", [b"[" * 100000, b"\xff\xfe{}", b""],
                         ids=["deep", "not-utf8", "empty"])
def test_strategy_file_that_is_not_json(content, tmp_path, capsys):
    bad = tmp_path / "s.json"
    bad.write_bytes(content)
    err = _fails(["quantize", "--preset", "tiny", "--strategy", str(bad), "--out",
                  str(tmp_path / "q"), "--quiet"], capsys)
    assert err.startswith(f"mbwq: --strategy {bad}: not valid JSON")
    assert not (tmp_path / "q").exists()


def test_bad_input_subprocess(tmp_path):
    # the real entry point: one line on stderr, exit code 2, no traceback
    r = subprocess.run([sys.executable, "-m", "mbwq_ops", "quantize", "--preset", "tiny",
                        "--method", "gptq", "--out", str(tmp_path / "q")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("mbwq: --method gptq") and r.stderr.count("\n") == 1


def test_demo_module_bad_input_is_one_line():
    # python -m mbwq_ops demo goes through the mbwq command's error handling too
    r = subprocess.run([sys.executable, "-m", "mbwq_ops", "demo", "--preset", "tiny", "--bpw", "1.0",
                        "--modes", "eager", "--new-tokens", "2", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("mbwq: bpw=1.0 is a bit budget below")


def test_model_factory_from_current_directory(tmp_path, monkeypatch, capsys):
    # as the console script runs it: the current directory is not on sys.path
    (tmp_path / "mbwq_cli_factory.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(64, 64))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert cli.main(["quantize", "--model", "mbwq_cli_factory:make", "--out", "q",
                         "--json"]) == 0
    finally:
        sys.modules.pop("mbwq_cli_factory", None)
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["model"] == {"kind": "factory", "factory": "mbwq_cli_factory:make"}


def test_every_option_has_help_with_its_default(capsys):
    subparsers = next(a for a in cli.make_parser()._actions
                      if isinstance(a, argparse._SubParsersAction))
    for name in ("quantize", "inspect", "bench"):
        for a in subparsers.choices[name]._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, (name, a.dest)
            if a.default not in (None, False):
                assert "default" in a.help, (name, a.dest)
    bits = {a.dest: a.help for a in subparsers.choices["quantize"]._actions}["bits"]
    assert "4 or 2" in bits and "8, 6, 5 or 3" in bits
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--prompt-len PROMPT_LEN prompt tokens before decoding (default 16)" in out
    assert "--new-tokens NEW_TOKENS tokens to generate per mode, at least 1" in out


def test_wordpiece_tokenizer(tmp_path):
    from mbwq_ops.apps.minilm import WordPiece
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "play", "##ing", "##s", "!",
             ",", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = WordPiece(str(tmp_path / "vocab.txt"))
    ids = tok.encode("Hello, Worlds! Playing CAFÉ zzz")
    assert [vocab[i] for i in ids] == ["[CLS]", "hello", ",", "world", "##s", "!", "play",
                                       "##ing", "cafe", "[UNK]", "[SEP]"]
    batch, mask = tok.batch(["hello", "hello world"])
    assert batch.tolist() == [[2, 4, 3, 0], [2, 4, 5, 3]] and mask.tolist() == [[1, 1, 1, 0], [1] * 4]


# ----------------------------------------------------------------------------- --out safety
def _quantize(out, *extra):
    return ["quantize", "--preset", "tiny", "--bits", "4", "--out", str(out), "--quiet", *extra]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_out_holding_anything_needs_overwrite(tmp_path, capsys):
    from mbwq_ops.checkpoint import CONFIG_NAME, WEIGHTS_NAME
    out = tmp_path / "q"
    assert cli.main(_quantize(out, "--write-strategy")) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    before = _files(out)
    err = _fails(_quantize(out, "--bits", "2"), capsys)
    assert f"--out {out} holds a checkpoint; pass --overwrite" in err
    assert _files(out) == before  # refused before any work: nothing changed

    # --overwrite: the new checkpoint, the user's file kept, the old strategy not left behind
    assert cli.main(_quantize(out, "--bits", "2", "--overwrite", "--json")) == 0
    info = json.loads(capsys.readouterr().out)
    assert all(list(l["widths"]) == ["2"] for l in info["layers"])  # --bits 2 this time
    assert sorted(os.listdir(out)) == [CONFIG_NAME, WEIGHTS_NAME, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / WEIGHTS_NAME).read_bytes() != before[WEIGHTS_NAME]
    assert os.listdir(tmp_path) == ["q"]  # no temporary folder beside it
    # --write-strategy with --overwrite writes the strategy of the new layout
    assert cli.main(_quantize(out, "--overwrite", "--write-strategy")) == 0
    assert "quant_strategy.json" in os.listdir(out) and (out / "notes.txt").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "a.txt").write_text("a")
    capsys.readouterr()
    err = _fails(_quantize(other), capsys)
    assert f"--out {other} is not empty (a.txt); pass --overwrite" in err
    assert _files(other) == {"a.txt": b"a"}


def test_empty_out_folder_is_used_and_empty_name_refused(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert cli.main(_quantize(out)) == 0
    assert (out / "mbwq_config.json").exists() and os.listdir(tmp_path) == ["empty"]
    capsys.readouterr()
    assert "--out is empty" in _fails(_quantize(""), capsys)


def test_input_strategy_is_not_removed_as_stale(tmp_path, capsys):
    out = tmp_path / "q"
    assert cli.main(_quantize(out, "--write-strategy")) == 0
    capsys.readouterr()
    before = _files(out)
    strategy = out / "quant_strategy.json"
    err = _fails(["quantize", "--preset", "tiny", "--strategy", str(strategy), "--out", str(out),
                  "--overwrite", "--quiet"], capsys)
    assert "is the quant_strategy.json that --out would remove" in err
    assert _files(out) == before


@pytest.mark.parametrize("existing", [False, True])
def test_failed_save_leaves_nothing_it_made(tmp_path, monkeypatch, capsys, existing):
    from mbwq_ops import checkpoint as C
    real = C.save_quantized

    def half_then_fail(model, path, metadata=None):
        real(model, path, metadata)
        os.remove(os.path.join(path, C.CONFIG_NAME))
        raise OSError(28, "No space left on device")
    if existing:
        out = tmp_path / "q"
        assert cli.main(_quantize(out)) == 0
        before = _files(out)
    else:
        out = tmp_path / "a" / "b" / "q"  # its parents are made for it, and removed again
    monkeypatch.setattr(C, "save_quantized", half_then_fail)
    capsys.readouterr()
    err = _fails(_quantize(out, "--overwrite"), capsys)
    assert "No space left on device" in err
    if existing:
        assert _files(out) == before and os.listdir(tmp_path) == ["q"]
    else:
        assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- impossible budgets
def test_impossible_bpw_is_refused_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("the model was built")
    monkeypatch.setattr(cli, "build_model", no_model)
    err = _fails(["quantize", "--bpw", "0.5", "--out", str(tmp_path / "q")], capsys)
    assert err == ("mbwq: --bpw 0.5 is below the cheapest layout possible, 2.25 bits per weight "
                   "(2-bit codes plus an fp16 scale and zero per group of 128 rows)\n")
    err = _fails(["quantize", "--bpw", "2.9", "--group-size", "32", "--out",
                  str(tmp_path / "q")], capsys)
    assert "--bpw 2.9 is below the cheapest layout possible, 3 bits per weight" in err
    assert not (tmp_path / "q").exists()


def test_bpw_below_this_models_floor_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    from mbwq_ops.apps import tiny_llama as TL
    from mbwq_ops.quant import quantize as QZ
    model = TL.build("tiny")
    shapes = [(m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    floor = QZ.cheapest_bpw(shapes)
    assert 2.25 < floor  # tiny's 352-row layers end in a 96-row group
    bpw = (2.25 + floor) / 2

    def never(*a, **k):
        raise AssertionError("measured or calibrated")
    monkeypatch.setattr(QZ, "_measure", never)
    monkeypatch.setattr(QZ, "collect_hessians", never)
    err = _fails(["quantize", "--preset", "tiny", "--bpw", str(bpw), "--calibration", "1",
                  "--out", str(tmp_path / "q"), "--quiet"], capsys)
    assert f"bpw={bpw!r} is a bit budget below the cheapest layout possible: {floor:.4g}" in err
    assert not (tmp_path / "q").exists()


@settings(deadline=None)
@given(K=st.integers(1, 40).map(lambda k: 32 * k), N=st.integers(1, 24),
       gss=st.lists(st.sampled_from([32, 64, 96, 128, 256]), min_size=1, max_size=3, unique=True),
       widths=st.lists(st.sampled_from([8, 6, 5, 4, 3, 2]), min_size=1, max_size=6, unique=True),
       seed=st.integers(0, 2 ** 31 - 1))
def test_cheapest_bpw_is_the_measured_minimum(K, N, gss, widths, seed):
    # the up-front arithmetic and the allocation's own cost table agree
    from mbwq_ops.quant import quantize as QZ
    W = torch.randn(K, N, generator=torch.Generator().manual_seed(seed))
    m = QZ._measure(W, None, max(gss), widths, gss)
    assert QZ.cheapest_bpw([(K, N)], gss, widths) == float(m.cost.min(1).values.sum()) / (K * N)
    assert QZ.cheapest_bpw([(K, N)], gss, widths) >= QZ.cheapest_bpw(group_size=gss,
                                                                       widths=widths)


# ----------------------------------------------------------------------------- --model factories
FACTORIES = {  # module text, spec, what the message names
    "raises": ("def make():\n    raise RuntimeError('boom\\n  second line')\n", "make",
               "the factory raised RuntimeError: boom second line"),
    "needs_args": ("def make(size):\n    pass\n", "make", "the factory raised TypeError"),
    "not_a_module": ("def make():\n    return 3\n", "make", "returned a int, not an nn.Module"),
    "not_callable": ("CONST = 3\n", "CONST", "is a int, not a callable"),
    "no_such_name": ("X = 1\n", "make", "cannot import it: AttributeError"),
    "import_raises": ("raise ValueError('bad at import')\n", "make",
                      "cannot import it: ValueError: bad at import"),
    "syntax_error": ("def make(:\n", "make", "cannot import it: SyntaxError"),
    "exits": ("import sys\nsys.exit(3)\n", "make", "cannot import it: SystemExit: 3"),
    "factory_exits": ("import sys\n\ndef make():\n    sys.exit('no')\n", "make",
                      "the factory raised SystemExit: no"),
}


@pytest.mark.parametrize("case", sorted(FACTORIES))
def test_bad_model_factory_is_one_line_naming_the_spec(case, tmp_path, monkeypatch, capsys):
    text, fn, needle = FACTORIES[case]
    mod = f"mbwq_bad_factory_{case}"
    (tmp_path / f"{mod}.py").write_text(text)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    try:
        err = _fails(["quantize", "--model", f"{mod}:{fn}", "--out", "q", "--quiet"], capsys)
    finally:
        sys.modules.pop(mod, None)
    assert err.startswith(f"mbwq: --model {mod}:{fn}") and needle in err, err
    assert not (tmp_path / "q").exists()


def test_model_that_cannot_be_found(tmp_path, capsys):
    err = _fails(["quantize", "--model", "mbwq_no_such_module_here:make", "--out",
                  str(tmp_path / "q")], capsys)
    assert err.startswith("mbwq: --model mbwq_no_such_module_here:make: cannot import it: "
                          "ModuleNotFoundError")
    err = _fails(["quantize", "--model", ":make", "--out", str(tmp_path / "q")], capsys)
    assert err.startswith("mbwq: --model :make: cannot import it")
