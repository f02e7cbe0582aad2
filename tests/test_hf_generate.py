"""model.generate with MBWQ layers: eager, torch.compile(fullgraph=True) of the decode step with a
static cache (graphs counted, MBWQ ops inside them), CUDA graphs on CUDA; the mbwq generate /
mbwq bench commands on transformers folders."""
import json
import pathlib

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

import mbwq_ops

pytest.importorskip("transformers")
from transformers import CompileConfig  # noqa: E402

from mbwq_ops.apps import cli  # noqa: E402
from mbwq_ops.hf import tiny  # noqa: E402

GREENBIT = str(pathlib.Path(__file__).parent / "fixtures" / "greenbit" / "llama-channel-mix")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny.save_tiny_checkpoint(str(tmp_path_factory.mktemp("q3")), bpw=3.0))


class CountingBackend:
    """Counts the graphs dynamo hands over and the MBWQ ops in them. generate() deep-copies its
    compile config, so the counts live on the class."""
    graphs = []

    def __call__(self, gm, example_inputs):
        CountingBackend.graphs.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"
                                          and str(n.target).startswith("mbwq.gemm")))
        return lookup_backend("aot_eager")(gm, example_inputs)


def greedy(model, ids, n, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, **kw)


def assert_greedy_choices(model, seq, prompt_len, tol):
    """Every generated token is the argmax of the model's own (eager, full-sequence) logits, up to
    near-ties within ``tol``."""
    with torch.no_grad():
        logits = model(seq).logits[:, prompt_len - 1:-1].float()
    chosen = logits.gather(-1, seq[:, prompt_len:, None])[..., 0]
    assert (logits.max(-1).values - chosen).max() <= tol


def test_eager_and_compiled_fullgraph_generate_agree_with_no_graph_break(folder):
    model = mbwq_ops.from_pretrained(folder, dtype=torch.bfloat16, progress=False)
    n_layers = sum(isinstance(m, mbwq_ops.MBWQLinear) for m in model.modules())
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    eager = greedy(model, ids, 8)
    cc = CompileConfig(fullgraph=True, backend=CountingBackend(), mode=None)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless told
    torch._dynamo.reset()
    CountingBackend.graphs.clear()
    compiled = greedy(model, ids, 8, cache_implementation="static", compile_config=cc)
    # fullgraph=True: a graph break would raise; one graph serves every decode step, and it
    # holds every MBWQ layer as the custom op
    assert CountingBackend.graphs == [n_layers] and n_layers == 14
    assert torch.equal(eager, compiled)
    explained = torch._dynamo.explain(model.forward)(ids[:, :1])
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_static_cache_with_cuda_graphs(folder):
    model = mbwq_ops.from_pretrained(folder, dtype=torch.float16, device="cuda", progress=False)
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()
    cc = CompileConfig(fullgraph=True, mode="reduce-overhead")
    torch._dynamo.reset()
    outs = [greedy(model, ids, 12, cache_implementation="static", compile_config=cc)
            for _ in range(3)]  # warm-up, CUDA-graph recording, replay
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert_greedy_choices(model, outs[-1], ids.shape[1], tol=2e-2)
    assert torch.equal(outs[-1][:, :ids.shape[1]], ids)


# ------------------------------------------------------------------ the commands
def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_command(folder, capsys):
    code, out, err = run(["generate", folder, "--prompt", "w1 w5 w7", "--max-new-tokens", "6",
                          "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["new_tokens"] == 6 and res["mode"] == "eager" and res["tokens_per_s"] > 0
    words = res["text"].split()
    assert len(words) == 6 and all(w.startswith("w") or w in ("<unk>",) for w in words)
    code, out, _ = run(["generate", GREENBIT, "--prompt", "w3 w4", "--max-new-tokens", "4",
                        "--quiet"], capsys)  # special tokens among the 4 are not printed
    assert code == 0 and out.startswith("w3 w4 ") and 3 <= len(out.split()) <= 6


def test_generate_and_bench_errors(folder, tmp_path, capsys):
    mbwq_ops.hf.tiny.tiny_llama().save_pretrained(tmp_path / "plain")
    cases = [
        (["generate", str(tmp_path / "plain"), "--prompt", "w1"], "no tokenizer"),
        (["generate", folder, "--prompt", "w1", "--max-new-tokens", "200"],
         "exceed the model's max_position_embeddings 128"),
    ]
    if not torch.cuda.is_available():
        cases += [(["generate", folder, "--prompt", "w1", "--cuda-graph"],
                   "--cuda-graph needs a CUDA"),
                  (["bench", folder, "--modes", "compile+cudagraph"], "CUDA graphs need a CUDA")]
    capsys.readouterr()
    for argv, message in cases:
        code, _, err = run(argv, capsys)
        last = err.strip().splitlines()[-1]  # after the loading progress bars
        assert code == 2 and last.startswith("mbwq: ") and message in last, (argv, err)
    with pytest.raises(SystemExit):  # argparse's own error for the folder argument
        cli.main(["generate", str(tmp_path), "--prompt", "w1"])
    assert "is not a model folder" in capsys.readouterr().err


def test_bench_command_reports_speed_and_speedup(folder, capsys):
    code, out, err = run(["bench", folder, "--modes", "eager", "--new-tokens", "4",
                          "--prompt-len", "4", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)
    r = res["runs"]["eager"]
    assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0
    ref = res["dense_reference"]["eager"]["tokens_per_s"]
    assert r["speedup"] == pytest.approx(r["tokens_per_s"] / ref)
    code, out, _ = run(["bench", folder, "--modes", "eager", "--new-tokens", "3",
                        "--prompt-len", "4", "--no-reference", "--quiet"], capsys)
    assert code == 0 and "tok/s" in out and "speed-up" not in out


def test_bench_default_length_fits_a_short_model(folder, capsys):
    # the tiny fixture holds 128 positions: with a 124-token prompt the default (16 on CPU,
    # 128 on CUDA) is cut to the 4 positions left instead of refusing to run
    code, out, err = run(["bench", folder, "--modes", "eager", "--prompt-len", "124",
                          "--no-reference", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["new_tokens"] == 4
    code, _, err = run(["bench", folder, "--modes", "eager", "--prompt-len", "124",
                        "--new-tokens", "5", "--no-reference"], capsys)
    assert code == 2 and "exceed the model's max_position_embeddings 128" in err
