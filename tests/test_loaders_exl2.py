"""EXL2 checkpoints: the fixture (scripts/make_exl2_fixtures.py) and synthetic layers, against a
CPU reference written here from exllamav2's layout and fp16 arithmetic (its kernels need CUDA):
the converted MBWQ layers dequantize to exllamav2's weights bit for bit."""
import json
import os
import shutil

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

from mbwq_ops import loaders
from mbwq_ops.loaders import exl2
from mbwq_ops.reference import error_scale, gemm_reference
from raw_files import raw_tensors

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "exl2", "llama-exl2")


def bits_of(words, bits, count):
    """``count`` codes from the little-endian bit string of int32 words (dim 0), bit by bit."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    string = torch.stack([(w >> i) & 1 for i in range(32)], 1).reshape(-1, *w.shape[1:])
    string = string[:count * bits].reshape(count, bits, *w.shape[1:])
    return sum(string[:, i] << i for i in range(bits))


def pack_bits(codes, bits):
    rows, N = codes.shape
    string = torch.stack([(codes >> i) & 1 for i in range(bits)], 1).reshape(rows * bits, N)
    w = sum(string.reshape(-1, 32, N)[:, i] << i for i in range(32))
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def exllamav2_weight(t, K):
    """exllamav2's fp16 W [K, N] (original input order), step by step as its CUDA code does:
    ``max = q_scale_max * (1/256)`` (a torch fp16 op), ``scale = half((qs+1)^2) * max``,
    ``w = half(code - 2^(b-1)) * scale`` -- fp16 products, one rounding each."""
    q_weight, q_groups = t["q_weight"], t["q_groups"].long().tolist()
    N = q_weight.shape[1]
    bits, starts = q_groups[0::2], q_groups[1::2]
    G = len(bits)
    qs = torch.stack([(t["q_scale"].long() & 0xFFFFFFFF)[:, n // 8] >> (4 * (n % 8)) & 15
                      for n in range(N)], 1)
    top = t["q_scale_max"] * (1 / 256)
    rows_out, done = [], 0
    for g in range(G):
        rows = (starts[g + 1] - starts[g]) * 32 // bits[g] if g + 1 < G else K - done
        codes = bits_of(q_weight[starts[g]:], bits[g], rows)
        scale = ((qs[g] + 1) ** 2).to(torch.float16) * top[g]
        rows_out.append((codes - (1 << (bits[g] - 1))).to(torch.float16) * scale)
        done += rows
    stored = torch.cat(rows_out)
    return stored[t["q_invperm"].long()]  # feature p is stored row q_invperm[p]


def test_fixture_bit_exact_against_the_reference():
    assert loaders.detect(FOLDER) == "exl2"
    ck = loaders.read_checkpoint(FOLDER, progress=False)
    raw = raw_tensors(FOLDER)
    assert ck.source == "exl2" and ck.info == {"version": "0.3.2", "bits": 4.0, "head_bits": 6}
    assert len(ck.layers) == 15 and "lm_head" in ck.layers and not ck.tie_word_embeddings
    assert sorted(ck.tensors) == sorted(k for k in raw if k.endswith("norm.weight")
                                        or k == "model.embed_tokens.weight")
    gen = torch.Generator().manual_seed(0)
    subnormal = 0
    for name, e in ck.layers.items():
        t = {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}
        K = t["q_invperm"].numel()
        W = exllamav2_weight(t, K)
        N = e["ctor"]["out_channels"]
        W = W[:, :N]  # lm_head: the columns past vocab_size are padding
        layer = loaders.build_layer(e)
        assert e["ctor"]["use_mbw"]
        assert torch.equal(layer.dequantized_weight(), W), name
        x = torch.randn(3, K, generator=gen).half()
        b = t.get("bias")
        y = gemm_reference(x, W, None, b)
        assert bool(((layer(x).double() - y).abs() <= 4 * 2.0 ** -11 * error_scale(x, W, None, b)
                     + 1e-6).all()), name
        subnormal += int((t["q_scale_max"] * (1 / 256)).abs().lt(2.0 ** -14).any())
    assert subnormal >= 1  # the fixture exercises the subnormal rounding of q_scale_max / 256
    assert ck.layers["lm_head"]["ctor"]["out_channels"] == 80  # vocab_size, from 96 padded
    assert ck.layers["model.layers.0.self_attn.q_proj"]["ctor"]["disable_bias"] is False


def test_sharded_without_index():
    files = sorted(f for f in os.listdir(FOLDER) if f.endswith(".safetensors"))
    assert files == ["output-00001-of-00002.safetensors", "output-00002-of-00002.safetensors"]


def test_folder_without_quantization_config_is_detected_by_its_files(tmp_path):
    d = tmp_path / "exl2"
    shutil.copytree(FOLDER, d)
    with open(d / "config.json") as f:
        c = json.load(f)
    del c["quantization_config"]
    (d / "config.json").write_text(json.dumps(c))
    assert loaders.detect(d) == "exl2"
    assert loaders.read_checkpoint(d, progress=False).info == {}


@given(spec=st.lists(st.tuples(st.sampled_from([8, 6, 5, 4, 3, 2]), st.integers(1, 3)),
                     min_size=1, max_size=4),
       N=st.sampled_from([8, 32, 40]), tiny=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
def test_synthetic_layers_bit_exact(spec, N, tiny, bias, seed):
    from mbwq_ops import format as fmt
    gen = torch.Generator().manual_seed(seed)
    spec = sorted(spec, key=lambda s: fmt.WIDTHS.index(s[0]))  # exllamav2's order, 8 -> 2
    words, q_groups, start, K = [], [], 0, 0
    for b, blocks in spec:
        rows = 32 * blocks
        words.append(pack_bits(torch.randint(0, 1 << b, (rows, N), generator=gen), b))
        q_groups += [b, start]
        start += rows * b // 32
        K += rows
    G = len(spec)
    qs = torch.randint(0, 16, (G, -(-N // 8) * 8), generator=gen)
    q_scale = sum(qs.reshape(G, -1, 8)[:, :, i] << (4 * i) for i in range(8))
    q_scale = torch.where(q_scale >= 2 ** 31, q_scale - 2 ** 32, q_scale).to(torch.int32)
    q_max = (torch.rand(G, generator=gen) * (1e-3 if tiny else 1.0) + 1e-6).half()
    t = {"q_weight": torch.cat(words), "q_groups": torch.tensor(q_groups, dtype=torch.int16),
         "q_invperm": torch.randperm(K, generator=gen).to(torch.int32), "q_scale": q_scale,
         "q_scale_max": q_max}
    if bias:
        t["bias"] = torch.randn(N, generator=gen).half()
    e = exl2.convert_layer("m", dict(t))
    assert torch.equal(loaders.build_layer(e).dequantized_weight(), exllamav2_weight(t, K))
    # zeros are the exact mid-points
    mids = torch.tensor([2.0 ** (b - 1) for b, _ in spec], dtype=torch.float64).unsqueeze(1)
    assert torch.equal(e["state"]["zeros"].double(), e["state"]["scales"].double() * mids)


def _layer():
    raw = raw_tensors(FOLDER)
    name = "model.layers.0.self_attn.q_proj"
    return {k[len(name) + 1:]: v for k, v in raw.items() if k.startswith(name + ".")}


def test_refusals():
    t = _layer()
    bad = dict(t, q_groups=torch.tensor([3, 0, 4, 3, 6, 11], dtype=torch.int16))
    with pytest.raises(ValueError, match=r"m: q_groups: groups must be sorted by width"):
        exl2.convert_layer("m", bad)
    with pytest.raises(ValueError, match=r"m: tensor q_invperm is missing"):
        exl2.convert_layer("m", {k: v for k, v in t.items() if k != "q_invperm"})
    with pytest.raises(ValueError, match=r"m: tensor q_scale has shape \[3, 8\] in the checkpoint, "
                                         r"expected \[3, 16\]"):
        exl2.convert_layer("m", dict(t, q_scale=t["q_scale"][:, :8]))
    with pytest.raises(ValueError, match=r"m: tensor q_scale_max is torch.float32 in the checkpoint"):
        exl2.convert_layer("m", dict(t, q_scale_max=t["q_scale_max"].float()))
    big = dict(t, q_scale_max=torch.full_like(t["q_scale_max"], 60000.0))
    with pytest.raises(ValueError, match=r"m: group 0's scale times its mid-point 32 overflows fp16"):
        exl2.convert_layer("m", big)
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.x: tensors \['q_extra'\] are "
                                         r"not part of an EXL2 layer"):
        exl2_folder_with(dict(t, q_extra=torch.zeros(1)))


def exl2_folder_with(extra_layer):
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(FOLDER, os.path.join(tmp, "f"))
        save_file({f"model.layers.9.mlp.x.{k}": v.contiguous() for k, v in extra_layer.items()},
                  os.path.join(tmp, "f", "output-extra.safetensors"))
        loaders.read_checkpoint(os.path.join(tmp, "f"), progress=False)
