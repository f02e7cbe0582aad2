"""The demo end to end on CPU with the CI-sized model, and the generation loop it relies on."""
import json

import torch

from mbwq_ops.apps import demo
from mbwq_ops.quant import quantize as Q
from mbwq_ops.apps import tiny_llama as TL


def test_demo_runs_on_cpu(capsys):
    assert demo.main(["--preset", "tiny", "--device", "cpu", "--modes", "eager",
                      "--new-tokens", "6", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    names = [v["name"] for v in res["variants"]]
    assert names[0] == "unquantized" and len(names) == 3
    base, mixed, uni = res["variants"]
    assert 2.5 < mixed["bpw"] <= 3.0 and abs(uni["bpw"] - 4.25) < 0.01
    assert mixed["linear_bytes"] < uni["linear_bytes"] < base["linear_bytes"]
    for v in (mixed, uni):
        assert 0 < v["logit_rel_err"] < 1 and v["top1_agreement"] > 0.1
        assert v["runs"]["eager"]["tokens_per_s"] > 0
    assert base["runs"]["eager"]["tokens_match_unquantized"] == 1.0
    # every model runs q/k/v and gate/up as one GEMM per set (the mixed one through its
    # shared layouts): 2 blocks x 2 sets
    assert all(v["fused_sets"] == {"fused": 4, "kept": 0} for v in res["variants"])
    # and the human-readable table
    text = demo.format_results(res)
    assert "mbwq mixed 3 bpw" in text and "tok/s" in text


def test_cached_generation_matches_full_forward():
    model = TL.build("tiny")
    Q.quantize_model(model, bpw=3.0, verbose=False)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    r = TL.Generator(model, 2, "eager").generate(prompt, 7)
    model.drop_cache()
    with torch.no_grad():
        logits = model(torch.cat([prompt, r["tokens"][:, :-1]], 1))
    assert torch.equal(logits[:, 4:].argmax(-1), r["tokens"])


def test_compiled_decode_matches_eager():
    # one torch.compile(fullgraph=True) of a quantized model's decode step
    model = TL.build("tiny", dtype=torch.bfloat16)
    Q.quantize_model(model, bits=4, verbose=False)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    eager = TL.Generator(model, 1, "eager").generate(prompt, 6)["tokens"]
    torch._dynamo.reset()
    compiled = TL.Generator(model, 1, "compile")
    compiled.warmup(prompt)
    assert torch.equal(compiled.generate(prompt, 6)["tokens"], eager)


def test_demo_without_fusion_keeps_the_projections(capsys):
    assert demo.main(["--preset", "tiny", "--device", "cpu", "--modes", "eager",
                      "--new-tokens", "3", "--json", "--no-fuse"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert all(v["fused_sets"] is None for v in res["variants"])


def test_fused_projections_give_the_same_tokens():
    model = TL.build("tiny")
    Q.quantize_model(model, bits=4, verbose=False)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    separate = TL.Generator(model, 2, "eager").generate(prompt, 6)["tokens"]
    model.drop_cache()
    assert TL.fuse_projections(model) == {"fused": 4, "kept": 0}
    attn = model.model.layers[0].self_attn
    assert hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
    assert torch.equal(TL.Generator(model, 2, "eager").generate(prompt, 6)["tokens"], separate)
    assert TL.fuse_projections(model) == {"fused": 0, "kept": 0}  # already fused: nothing to do
