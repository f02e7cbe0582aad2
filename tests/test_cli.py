"""The mbwq command: --help everywhere, quantize -> inspect -> bench, strategies, JSON output."""
import json
import os
import subprocess
import sys

import pytest

from mbwq_ops import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_console_script_declared():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["mbwq"] == "mbwq_ops.cli:main"


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


def test_uniform_and_subprocess(tmp_path):
    out = tmp_path / "u4"
    r = subprocess.run([sys.executable, "-m", "mbwq_ops.cli", "quantize", "--preset", "tiny",
                        "--bits", "4", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout and r.stderr == ""
    r = subprocess.run([sys.executable, "-m", "mbwq_ops.cli", "inspect", str(out), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    info = json.loads(r.stdout)
    assert {l["mode"] for l in info["layers"]} == {"uniform"}
    assert 4.25 <= info["bpw"] < 4.26  # 352-row layers end with a 96-row group


def test_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="unknown model"):
        cli.main(["quantize", "--model", "nope", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        cli.main(["inspect"])  # missing path
    with pytest.raises(FileNotFoundError):
        cli.main(["inspect", str(tmp_path / "missing")])


def test_wordpiece_tokenizer(tmp_path):
    from mbwq_ops.minilm import WordPiece
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world", "play", "##ing", "##s", "!",
             ",", "cafe"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = WordPiece(str(tmp_path / "vocab.txt"))
    ids = tok.encode("Hello, Worlds! Playing CAFÉ zzz")
    assert [vocab[i] for i in ids] == ["[CLS]", "hello", ",", "world", "##s", "!", "play",
                                       "##ing", "cafe", "[UNK]", "[SEP]"]
    batch, mask = tok.batch(["hello", "hello world"])
    assert batch.tolist() == [[2, 4, 3, 0], [2, 4, 5, 3]] and mask.tolist() == [[1, 1, 1, 0], [1] * 4]
