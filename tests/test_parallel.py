"""Tensor parallelism (mbwq_ops.parallel) on CPU: 2 gloo ranks spawned once for the module.

The ranks run every scenario (layers of each mode and path, decoders loaded from checkpoints,
compiled decoding, bad shapes) and save what they computed; the tests compare it here with the
unsharded layers and models, built from the same seeds.
"""
import copy
import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import mbwq_ops
from mbwq_ops import parallel
from mbwq_ops.apps import tiny_llama as TL

import layers as L

WORLD = 2
TIMEOUT_S = 150
CONFIG = TL.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_layers=2,
                        num_heads=4, num_kv_heads=2, max_seq_len=32)
PROMPT = torch.randint(0, CONFIG.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
NEW_TOKENS = 8


# ----------------------------------------------------------------------------- layers
def _shard_local_spec():
    """Mixed layer, groups of 32 rows, each group reading features of one shard (shards
    interleaved across groups): the no-gather path without the identity order."""
    return L.LayerSpec(256, 64, True, [8, 6, 5, 4, 4, 3, 2, 2], [32] * 8, perm="identity",
                       bias=True, seed=5)


def _shard_local_q_perm(K=256, world=WORLD, seed=5):
    g = torch.Generator().manual_seed(seed)
    S = K // world
    pools = [(s * S + torch.randperm(S, generator=g)).tolist() for s in range(world)]
    shard_of_group = torch.randperm(K // 32, generator=g) % world
    out = []
    for s in shard_of_group.tolist():
        out += pools[s][:32]
        pools[s] = pools[s][32:]
    return torch.tensor(out)


LAYERS = {
    # name: (spec, expected row path)
    "uniform4_zeros": (L.LayerSpec(256, 96, False, w_bit=4, group_size=64, perm="zeros",
                                   bias=True, seed=1), "own shard"),
    "uniform2_identity_split": (L.LayerSpec(128, 64, False, w_bit=2, group_size=128,
                                            perm="identity", seed=2), "own shard"),
    "uniform4_perm": (L.LayerSpec(256, 64, False, w_bit=4, group_size=64, perm="random",
                                  seed=3), "gather"),
    "mixed_perm": (L.random_mixed_spec(random.Random(4), 256, 64, bias=True, seed=4), "gather"),
    "mixed_shard_local": (_shard_local_spec(), "own shard"),
    "uniform_one_group": (L.LayerSpec(128, 32, False, w_bit=4, group_size=128, perm="random",
                                      seed=6), "gather"),
}


def full_layer(name):
    spec, _ = LAYERS[name]
    layer, t = L.make_layer(spec)
    if name == "mixed_shard_local":
        layer.q_perm = mbwq_ops.format.as_int16(_shard_local_q_perm())
        layer.prepare_params()
    return layer


def layer_input(name, shape=(3,)):
    K = LAYERS[name][0].in_features
    return torch.randn(*shape, K, generator=torch.Generator().manual_seed(7))


class Pair(nn.Module):
    """One layer twice, as ``col`` and ``row`` (copies: a plan names each module once)."""

    def __init__(self, layer):
        super().__init__()
        self.col = layer
        self.row = copy.deepcopy(layer)


PAIR_PLAN = parallel.TPPlan(column=("col",), row=("row",))


# ----------------------------------------------------------------------------- models
def quantized_model(kind, tmp):
    """Save a quantized TinyLlama of ``kind`` to ``tmp/kind``; returns the folder."""
    from mbwq_ops.quant import quantize_model

    model = TL.TinyLlama(CONFIG).eval()
    kw = {"uniform": dict(bits=4, group_size=64),
          "mixed": dict(bpw=3.0, group_size=32),
          "mixed_sharded": dict(bpw=3.0, group_size=32,
                                input_shards=parallel.input_shards(parallel.LLAMA_PLAN, WORLD))}
    quantize_model(model, verbose=False, **kw[kind])
    path = os.path.join(tmp, kind)
    mbwq_ops.save_quantized(model, path, metadata={"model": {"kind": "tiny-llama",
                                                             "config": CONFIG.to_dict()}})
    return path


MODELS = ("uniform", "mixed", "mixed_sharded")


def skeleton():
    return TL.TinyLlama(CONFIG)


# aot_eager traces exactly what inductor receives (graph breaks are dynamo's, not the
# backend's) in a fraction of the time on two busy cores; the CUDA test below uses inductor.
BACKEND = os.environ.get("MBWQ_TP_TEST_BACKEND", "aot_eager")


def greedy(model, mode="eager"):
    gen = TL.Generator(model, mode=mode)
    if mode == "compile":
        gen.step = torch.compile(model.decode_step, fullgraph=True, dynamic=False,
                                 backend=BACKEND)
    return gen.generate(PROMPT, NEW_TOKENS)["tokens"]


def row_paths(model):
    return {n: m.extra_repr() for n, m in model.named_modules()
            if isinstance(m, parallel.RowParallel)}


# ----------------------------------------------------------------------------- the ranks
def graphs_compiled():
    """Dynamo's counts since the last reset: graph breaks (any at all) and graphs compiled."""
    from torch._dynamo.utils import counters
    return {"graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


def _worker(rank, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    out = {}

    def attempt(key, fn):
        t0 = time.perf_counter()
        try:
            out[key] = fn()
            if os.environ.get("MBWQ_TP_TEST_TIMING"):
                print(rank, key, f"{time.perf_counter() - t0:.2f}s", flush=True)
        except Exception as e:  # recorded: the tests say which scenario failed and why
            out[key] = {"error": f"{type(e).__name__}: {e}"}

    def layer_case(name):
        m = parallel.shard_model(Pair(full_layer(name)), PAIR_PLAN)
        x = layer_input(name)
        K = x.shape[-1]
        xr = x[:, rank * K // WORLD:(rank + 1) * K // WORLD]
        x3 = layer_input(name, (2, 2))
        # "+ 0": an op consumes each all-reduced result (waits for it), as the next layer would
        return {"col": m.col(x), "row": m.row(xr) + 0, "row_again": m.row(xr) + 0,
                "row_3d": m.row(x3[..., rank * K // WORLD:(rank + 1) * K // WORLD]) + 0,
                "path": m.row.extra_repr()}

    for name in LAYERS:
        attempt(("layer", name), lambda: layer_case(name))

    def linear_case():  # float nn.Linear layers (unquantized ones) split the same way
        torch.manual_seed(8)
        lin = nn.Linear(64, 48)
        m = parallel.shard_model(Pair(lin), PAIR_PLAN)
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
        return {"col": m.col(x), "row": m.row(x[:, rank * 32:(rank + 1) * 32]) + 0}
    attempt("linear", linear_case)

    def compiled_layer():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        m = parallel.shard_model(Pair(full_layer("mixed_perm")), PAIR_PLAN)
        x = layer_input("mixed_perm")
        xr = x[:, rank * 128:(rank + 1) * 128]
        f = torch.compile(m.row, fullgraph=True, backend=BACKEND)
        return {"y": f(xr) + 0, **graphs_compiled()}
    attempt("compiled_layer", compiled_layer)

    for kind in MODELS:
        path = os.path.join(tmp, kind)

        def model_case():
            read = []  # (key, elements) of every tensor read for a planned layer
            real = parallel._FileSource.read

            def recording(src, key, index=None):
                t = real(src, key, index)
                read.append((src.prefix + key, t.numel()))
                return t
            parallel._FileSource.read = recording
            try:
                model = parallel.load_sharded(skeleton, path)
            finally:
                parallel._FileSource.read = real
            with torch.no_grad():
                logits = model(PROMPT)
                again = model(PROMPT)
            mem = parallel.shard_model(mbwq_ops.load_quantized(skeleton, path))
            with torch.no_grad():
                mem_logits = mem(PROMPT)
            return {"logits": logits, "again": again, "in_memory": mem_logits,
                    "paths": row_paths(model), "tokens": greedy(model), "read": read}
        attempt(("model", kind), model_case)

    def compiled_decode():
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = parallel.load_sharded(skeleton, os.path.join(tmp, "mixed"))
        return {"tokens": greedy(model, "compile"), **graphs_compiled()}
    attempt("compiled_decode", compiled_decode)

    # one rank through the same code path: a group of its own
    solo = torch.distributed.new_group([0])
    if rank == 0:
        attempt("solo_tokens", lambda: greedy(parallel.load_sharded(
            skeleton, os.path.join(tmp, "mixed"), group=solo)))

    def bad(fn):
        def run():
            fn()
            return "no error"
        return run
    odd = L.make_layer(L.LayerSpec(128, 99, False, group_size=64, perm="zeros"))[0]
    attempt("bad_columns", bad(lambda: parallel.shard_model(Pair(odd), PAIR_PLAN)))
    tiny = L.make_layer(L.LayerSpec(32, 64, False, group_size=32, perm="random"))[0]
    attempt("bad_blocks", bad(lambda: parallel.shard_model(Pair(tiny), PAIR_PLAN)))
    one_kv = TL.TinyLlama(TL.LlamaConfig(**{**CONFIG.to_dict(), "num_kv_heads": 1}))
    attempt("bad_heads", bad(lambda: parallel.shard_model(one_kv)))
    attempt("bad_names", bad(lambda: parallel.shard_model(
        Pair(odd), parallel.TPPlan(column=("*.nothing",), row=()))))
    torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tp"))
    for kind in MODELS:
        quantized_model(kind, d)
    return d


@pytest.fixture(scope="module")
def ranks(tmp):
    ctx = mp.start_processes(_worker, args=(_free_port(), tmp), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {WORLD} ranks did not finish within {TIMEOUT_S} s")
    return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False)
            for r in range(WORLD)]


def result(ranks, rank, key):
    r = ranks[rank][key]
    if isinstance(r, dict) and "error" in r:
        pytest.fail(f"rank {rank}, {key}: {r['error']}")
    return r


def assert_close_fp32(y, ref, scale):
    """Equal up to fp32 summation order: within 64 fp32 ulps of the sum of |terms|."""
    bound = 64 * torch.finfo(torch.float32).eps * scale
    err = (y - ref).abs()
    assert bool((err <= bound).all()), \
        f"max error {float(err.max()):.3g} > {float(bound.max()):.3g}"


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_column_and_row(ranks, name):
    layer = full_layer(name)
    N = layer.out_channels
    for shape, key in (((3,), "row"), ((2, 2), "row_3d")):
        x = layer_input(name, shape)
        ref = layer(x)
        W = layer.dequantized_weight(torch.float32)
        scale = (x.abs() * layer.channel_scale.float().reshape(-1)) @ W.abs()
        if layer.bias is not None:
            scale = scale + layer.bias.float().abs()
        for rank in range(WORLD):
            y = result(ranks, rank, ("layer", name))
            assert_close_fp32(y[key], ref, scale)
            if key == "row":
                assert torch.equal(y["row"], y["row_again"])  # bitwise repeatable
                assert torch.equal(y["row"], result(ranks, 0, ("layer", name))["row"])
                cols = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
                assert torch.equal(y["col"], ref[:, cols])  # a column is computed as before
                assert y["path"] == LAYERS[name][1]


def test_compiled_row_layer_has_no_graph_break(ranks):
    for rank in range(WORLD):
        r = result(ranks, rank, "compiled_layer")
        assert (r["graph_breaks"], r["graphs"]) == (0, 1)
        eager = result(ranks, rank, ("layer", "mixed_perm"))["row"]
        torch.testing.assert_close(r["y"], eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", MODELS)
def test_decoder_from_checkpoint(ranks, tmp, kind):
    full = mbwq_ops.load_quantized(skeleton, os.path.join(tmp, kind))
    with torch.no_grad():
        ref = full(PROMPT)
    tokens = greedy(full)
    for rank in range(WORLD):
        r = result(ranks, rank, ("model", kind))
        torch.testing.assert_close(r["logits"], ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(r["logits"], r["again"])
        assert torch.equal(r["logits"], r["in_memory"])  # shard_model == load_sharded
        assert torch.equal(r["logits"], result(ranks, 0, ("model", kind))["logits"])
        assert torch.equal(r["tokens"], tokens)
    paths = set(result(ranks, 0, ("model", kind))["paths"].values())
    # identity order and shard-aware quantization never gather; permuted layers do
    assert paths == ({"gather"} if kind == "mixed" else {"own shard"})


@pytest.mark.parametrize("kind", MODELS)
def test_each_rank_reads_its_share_of_the_weights(ranks, tmp, kind):
    from safetensors import safe_open

    with safe_open(os.path.join(tmp, kind, "model.safetensors"), "pt") as f:
        size = {k: f.get_slice(k).get_shape() for k in f.keys()}
    planned = [k for k in size if parallel.LLAMA_PLAN.role(k.rsplit(".", 1)[0])]
    for key in ("qweight", "scales"):
        total = sum(torch.Size(size[k]).numel() for k in planned if k.endswith("." + key))
        for rank in range(WORLD):
            got = sum(n for k, n in result(ranks, rank, ("model", kind))["read"]
                      if k.endswith("." + key))
            assert 0 < got <= 0.6 * total, (key, rank, got, total)


def test_linear_layers(ranks):
    torch.manual_seed(8)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = lin(x)
    scale = x.abs() @ lin.weight.abs().t() + lin.bias.abs()
    for rank in range(WORLD):
        r = result(ranks, rank, "linear")
        torch.testing.assert_close(r["col"], ref[:, rank * 24:(rank + 1) * 24], rtol=0, atol=0)
        assert_close_fp32(r["row"], ref, scale)


def test_compiled_decode_matches_eager(ranks, tmp):
    tokens = greedy(mbwq_ops.load_quantized(skeleton, os.path.join(tmp, "mixed")))
    for rank in range(WORLD):
        r = result(ranks, rank, "compiled_decode")
        assert (r["graph_breaks"], r["graphs"]) == (0, 1)
        assert torch.equal(r["tokens"], tokens)


def test_one_rank_group_matches_unsharded(ranks, tmp):
    tokens = greedy(mbwq_ops.load_quantized(skeleton, os.path.join(tmp, "mixed")))
    assert torch.equal(result(ranks, 0, "solo_tokens"), tokens)


@pytest.mark.parametrize("key, words", [
    ("bad_columns", ["col", "out_features=99", "world size 2"]),
    ("bad_blocks", ["row", "1 block(s) of 32 stored rows", "2 ranks"]),
    ("bad_heads", ["model.layers.0.self_attn", "num_kv_heads=1", "world size 2"]),
    ("bad_names", ["matches no linear layer", "*.nothing"]),
])
def test_uneven_shapes_name_the_layer_and_numbers(ranks, key, words):
    for rank in range(WORLD):
        err = ranks[rank][key]
        assert isinstance(err, dict) and err["error"].startswith("ValueError"), err
        for w in words:
            assert w in err["error"], err["error"]


def test_keep_rows_in_shards_plans():
    """Every group of a shard-aware plan reads one shard; widths move by whole blocks."""
    from mbwq_ops.quant.quantize import LayerPlan

    g = torch.Generator().manual_seed(3)
    K, shards = 384, 3
    order = torch.randperm(K, generator=g)
    plan = LayerPlan(order, [(6, 64), (4, 128), (4, 64), (3, 96), (2, 32)], True, 6, 128)
    out = parallel.keep_rows_in_shards(plan, shards)
    out.check(K)
    assert sorted(out.order.tolist()) == list(range(K))
    first = 0
    for b, r in out.groups:
        assert len(set((out.order[first:first + r] // (K // shards)).tolist())) == 1
        first += r
    per_width = {b: sum(r for w, r in out.groups if w == b) for b, _ in plan.groups}
    before = {b: sum(r for w, r in plan.groups if w == b) for b, _ in plan.groups}
    for b in before:
        assert abs(per_width.get(b, 0) - before[b]) <= 32 * shards
    uniform = LayerPlan(order, [(4, 64)] * 6, False, 4, 64)
    u = parallel.keep_rows_in_shards(uniform, shards)
    assert [sorted((u.order[s * 128:(s + 1) * 128] // 128).unique().tolist())
            for s in range(3)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="groups of 64 rows must tile each shard of 96"):
        parallel.keep_rows_in_shards(uniform, 4, "down")
    with pytest.raises(ValueError, match="in_features=384 must split into 5 shards"):
        parallel.keep_rows_in_shards(plan, 5)


def test_plan_names():
    plan = parallel.LLAMA_PLAN
    assert plan.role("model.layers.3.self_attn.q_proj") == "column"
    assert plan.role("model.layers.0.mlp.up_proj") == "column"
    assert plan.role("model.layers.11.self_attn.o_proj") == "row"
    assert plan.role("model.layers.0.mlp.down_proj") == "row"
    assert plan.role("lm_head") is None and plan.role("model.embed_tokens") is None
    assert plan.is_attention("model.layers.2.self_attn")
    names = {n for n, m in TL.TinyLlama(CONFIG).named_modules() if plan.role(n)}
    assert len(names) == 7 * CONFIG.num_layers


def test_shard_model_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        parallel.shard_model(TL.TinyLlama(CONFIG))


def test_torchrun_two_ranks_generate_as_one(ranks, tmp):
    """The README's command: 2 ranks of tp_generate give the tokens of one rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "mbwq_ops.apps.tp_generate", os.path.join(tmp, "mixed"), "--device", "cpu",
           "--prompt-len", str(PROMPT.shape[1]), "--new-tokens", str(NEW_TOKENS), "--seed", "1",
           "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["world_size"] == WORLD
    prompt = torch.randint(0, CONFIG.vocab_size, (1, PROMPT.shape[1]),
                           generator=torch.Generator().manual_seed(1))
    assert torch.equal(prompt, PROMPT)  # tp_generate's prompt for --seed 1
    assert res["tokens"] == result(ranks, 0, "solo_tokens").tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_world_of_one(tmp):
    """One GPU, world size 1 over NCCL: the sharded decode step (same code path, collectives
    included) captured in a CUDA graph, eager and compiled, gives the unsharded tokens."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        path = os.path.join(tmp, "mixed")
        ref = mbwq_ops.load_quantized(skeleton, path, device="cuda").half()
        tokens = TL.Generator(ref).generate(PROMPT, NEW_TOKENS)["tokens"]
        for mode in ("cudagraph", "compile+cudagraph"):
            model = parallel.load_sharded(skeleton, path, device="cuda").half()
            assert row_paths(model)
            out = TL.Generator(model, mode=mode).generate(PROMPT, NEW_TOKENS)["tokens"]
            assert torch.equal(out, tokens), mode
    finally:
        dist.destroy_process_group()
