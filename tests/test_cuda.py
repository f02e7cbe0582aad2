"""CUDA-specific tests: every kernel path against mbwq_ops.reference, determinism, CUDA graphs,
torch.compile(mode="reduce-overhead"), device moves and the guards against bad tables.

Paths of mbwq::gemm on CUDA, chosen by csrc/plan.h from shapes only (the tests ask it through
mbwq_ops.plan; the summary below is for the reader):
  * 65 <= M <= 256 (33 <= M on layers of >= 2^25 weights) on compute capability 9.0,
    fp16/bf16, N a multiple of 8: the tile kernel (gemm_tile.cu, CTA tiles of 512 columns x 64
    tokens up to M = 64, 256 x 128 up to 128, else 128 x 256; K splits + reduction where tiles
    are few);
  * M <= 64 (192 on layers of >= 2^25 weights), fp16/bf16, K and N multiples of 8: tensor-core
    kernel (gemm_mma.cu, mma.sync, row chunks of 64), exact fp16 weights; with a single K split it
    writes y itself, with several (many K blocks, few column tiles) it writes fp32 partials
    reduced by a second kernel;
  * larger M, fp32 activations or N % 8 != 0: gather x + dequant W + cuBLAS.
"""
from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mbwq_ops
from mbwq_ops import reference
from layers import (FOLD_ROW, LayerSpec, error_bound, make_layer, random_mixed_spec,
                    reference_weight)

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.float16, torch.bfloat16]


def planned_path(M, K, N, dtype, aligned=True):
    """The path csrc/plan.h chooses for this call on the current device (mbwq_ops.plan)."""
    return mbwq_ops.plan(M, K, N, dtype, aligned=aligned)["path"]


def gemm_args(layer):
    return (layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm,
            layer.channel_scale.reshape(-1), layer.bias)


def run_gemm(layer, x):
    return mbwq_ops.gemm(x, *gemm_args(layer))


def assert_close_to_reference(y, x, W, layer, dtype=None):
    """|y - ref| <= tol * (|ref| + S) elementwise (tests/layers.py: error_bound)."""
    dtype = dtype or x.dtype
    cs, bias = layer.channel_scale.reshape(-1), layer.bias
    ref = reference.gemm_reference(x, W, cs, bias)
    S = reference.error_scale(x, W, cs, bias)
    err = (y.detach().cpu().double() - ref).abs()
    # the shapes csrc/cuda/ops_cuda.cpp sends to dequant + cuBLAS instead of the tensor-core
    # kernels
    M, K = x.reshape(-1, x.shape[-1]).shape
    N = y.shape[-1]
    via_cublas = planned_path(M, K, N, x.dtype, aligned=x.data_ptr() % 16 == 0) == "dequant_matmul"
    bound = error_bound(dtype, ref, S, cublas_bf16=via_cublas)
    assert y.dtype == x.dtype and y.shape == ref.shape
    assert torch.isfinite(y).all(), "non-finite output where the reference is finite"
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs off; worst "
                           f"{float((err / bound.clamp_min(1e-30)).max()):.3g} x tolerance")


def layer_and_weight(spec):
    layer, t = make_layer(spec, "cuda")
    return layer, reference_weight(spec, {k: v.cpu() for k, v in t.items()})


def rand_x(M, K, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(M, K, generator=g) * scale).to(dtype).cuda()


SPECS = {
    "q4g128": LayerSpec(1024, 256, False, w_bit=4, group_size=128, perm="random", bias=True, seed=1),
    "q2g64": LayerSpec(512, 384, False, w_bit=2, group_size=64, perm="zeros", seed=2),
    "mixed_all": LayerSpec(1024, 192, True, widths=(8, 6, 5, 4, 3, 2),
                           group_rows=(128, 160, 192, 224, 160, 160), perm="random", seed=3),
    "mixed_432": LayerSpec(768, 128, True, widths=(4, 3, 3, 2, 2),
                           group_rows=(96, 128, 32, 256, 256), perm="identity", bias=True, seed=4),
    # many K blocks over one column tile: the tensor-core kernel splits K across CTAs
    "splitk": LayerSpec(4096, 128, True, widths=(8, 5, 4, 3, 2),
                        group_rows=(512, 512, 1024, 1024, 1024), perm="random", bias=True, seed=5),
    # one K block: a single split, the CTA writes y itself
    "onesplit": LayerSpec(64, 1024, True, widths=(6, 3), group_rows=(32, 32), perm="random",
                          bias=True, seed=6),
    # many column tiles
    "wide": LayerSpec(256, 6152, True, widths=(4, 3, 2), group_rows=(96, 96, 64),
                      perm="random", bias=True, seed=10),
    # >= 8192 columns: 17-64 tokens on the kernels with two column quads per lane
    "two_quads": LayerSpec(256, 8192, True, widths=(4, 3, 2), group_rows=(96, 96, 64),
                           perm="random", bias=True, seed=11),
    # N % 8 != 0: the large path for every M
    "n_odd": LayerSpec(256, 130, True, widths=(5, 4, 2), group_rows=(64, 96, 96), perm="random",
                       bias=True, seed=7),
}
MS = [1, 2, 3, 5, 8, 17, 32, 33, 64, 65, 118, 128, 129, 192, 193, 1000]


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_every_path_vs_reference(name, dtype):
    layer, W = layer_and_weight(SPECS[name])
    for i, M in enumerate(MS):
        x = rand_x(M, layer.in_channels, dtype, seed=i)
        assert_close_to_reference(run_gemm(layer, x), x, W, layer)


@pytest.mark.parametrize("name", ["q4g128", "mixed_all", "splitk"])
def test_mma_row_chunks(name, knobs):
    # M beyond one call as row chunks of 64 (the path of large layers up to 192 rows where the
    # tile kernel does not run; forced here on small ones, 300 = 4 x 64 + 44)
    knobs.set("MBWQ_MMA_MAX_M", "300")
    knobs.set("MBWQ_TILE_MIN_M", "100000")  # not the tile kernel
    layer, W = layer_and_weight(SPECS[name])
    for dtype in DTYPES:
        for M in (65, 100, 128, 130, 192, 300):
            x = rand_x(M, layer.in_channels, dtype, seed=M)
            y = run_gemm(layer, x)
            assert_close_to_reference(y, x, W, layer)
            assert torch.equal(run_gemm(layer, x), y)  # deterministic
        # The chunks share one x gather (ops_cuda.cpp): each chunk's rows are what a call of
        # just those rows computes.
        x = rand_x(300, layer.in_channels, dtype, seed=1)
        y = run_gemm(layer, x)
        bounds = (0, 64, 128, 192, 256, 300)
        for a, b in zip(bounds, bounds[1:]):
            assert torch.equal(run_gemm(layer, x[a:b].contiguous()), y[a:b]), (a, b)


@pytest.mark.parametrize("name", ["q4g128", "mixed_all", "splitk", "wide"])
def test_mma_kernel_fewest_tokens(name):
    # gemm_mma.cu's kernels for 1-16 tokens (one and two token tiles). Deterministic.
    layer, W = layer_and_weight(SPECS[name])
    for dtype in DTYPES:
        for M in (1, 4, 8, 9, 16):
            x = rand_x(M, layer.in_channels, dtype, seed=M)
            y = run_gemm(layer, x)
            assert_close_to_reference(y, x, W, layer)
            assert torch.equal(run_gemm(layer, x), y), (name, dtype, M)


@pytest.mark.parametrize("name", ["mixed_all", "splitk", "two_quads"])
def test_every_mma_configuration(name, knobs):
    # Each row of plan.h's kMmaConfigs, forced by MBWQ_MMA_CONFIG at the row counts where it is
    # valid (rows the default choice may never send there).
    layer, W = layer_and_weight(SPECS[name])
    K, N = layer.in_channels, layer.out_channels
    ran = set()
    for index in range(16):
        knobs.set("MBWQ_MMA_CONFIG", index + 1)
        for dtype in DTYPES:
            for M in (1, 3, 8, 16, 24, 32, 64):
                if mbwq_ops.plan(M, K, N, dtype)["mma_config"] != index:
                    continue
                x = rand_x(M, K, dtype, seed=M + index)
                y = run_gemm(layer, x)
                assert_close_to_reference(y, x, W, layer)
                assert torch.equal(run_gemm(layer, x), y), (name, index, dtype, M)
                ran.add(index)
    assert ran, "no configuration ran"
    if N >= 8192:  # wide enough for every row (some need N >= kTwoQuadMinN)
        assert ran == set(range(max(ran) + 1)), sorted(ran)


@pytest.mark.parametrize("name", ["q4g128", "q2g64", "mixed_all", "mixed_432", "splitk",
                                  "onesplit", "wide", "two_quads"])
def test_fold_row(name, knobs):
    # The scale-after-product row (mma_fold.cuh) named at one row of fp16 x: every width, one
    # and several K splits, one and two column quads, bias or none; x as a strided view; close
    # to the fp64 reference like the exact rows, and deterministic.
    layer, W = layer_and_weight(SPECS[name])
    K, N = layer.in_channels, layer.out_channels
    knobs.set("MBWQ_MMA_CONFIG", FOLD_ROW + 1)
    assert mbwq_ops.plan(1, K, N, torch.float16)["mma_config"] == FOLD_ROW
    for seed in range(3):
        x = rand_x(3, 2 * K, torch.float16, seed=seed, scale=4.0 ** (seed - 1))[1:2, ::2]
        y = run_gemm(layer, x)
        assert_close_to_reference(y, x, W, layer)
        assert torch.equal(run_gemm(layer, x.contiguous()), y), (name, seed)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_fold_row_infinite_x_as_the_exact_row(value, knobs):
    # s * sum(c x) - z * sum(x) would be inf - inf = NaN for an infinite x; a warp whose x holds
    # one recomputes its range with the exact decode (gemm_mma.cu: exact_range), so every output
    # is the exact row's: the same infinities (w * inf, the reference's) and NaNs, bit for bit.
    for name in ("mixed_all", "splitk", "two_quads"):
        layer, _ = layer_and_weight(SPECS[name])
        K = layer.in_channels
        x = rand_x(1, K, torch.float16, seed=3)
        x[0, random.Random(K).randrange(K)] = value
        exact = run_gemm(layer, x)
        knobs.set("MBWQ_MMA_CONFIG", FOLD_ROW + 1)
        y = run_gemm(layer, x)
        knobs.set("MBWQ_MMA_CONFIG", 0)
        assert not torch.isfinite(exact).any(), name  # every column meets the infinity
        torch.testing.assert_close(y, exact, rtol=0, atol=0, equal_nan=True,
                                   msg=f"{name} {value}")


def test_fold_row_where_scale_and_zero_cancel(knobs):
    # Every weight exactly 0: codes all 15, zeros 15 * s with s a power of two. The exact rows
    # give exactly the bias; the fold row (mma_fold.cuh: Accuracy) the bias plus fp32 rounding
    # of the size of the terms it adds, sum |s c x| + |z x|, which do not cancel there.
    layer, _ = layer_and_weight(SPECS["q4g128"])
    g = torch.Generator().manual_seed(5)
    s = torch.exp2(torch.randint(-10, -3, layer.scales.shape, generator=g).float()).half()
    layer.qweight.fill_(-1)
    layer.scales.copy_(s)
    layer.zeros.copy_(s * 15)
    x = rand_x(1, layer.in_channels, torch.float16, seed=6)
    bias = layer.bias.reshape(1, -1)
    assert torch.equal(run_gemm(layer, x), bias)  # the exact row
    knobs.set("MBWQ_MMA_CONFIG", FOLD_ROW + 1)
    y = run_gemm(layer, x)
    spec = SPECS["q4g128"]
    t = {"qweight": layer.qweight.cpu(), "scales": s.cpu(), "zeros": torch.zeros_like(s).cpu(),
         "q_perm": layer.q_perm.cpu()}
    terms = 2 * reference_weight(spec, t)  # |c s| + |z| = 2 * 15 s per weight
    S_terms = reference.error_scale(x, terms, layer.channel_scale.reshape(-1))
    err = (y.double().cpu() - bias.double().cpu()).abs()
    assert (err <= 2.0 ** -18 * S_terms + 2.0 ** -11 * bias.abs().double().cpu() + 2.0 ** -24).all()


@pytest.mark.parametrize("name", ["q4g128", "mixed_all", "splitk", "wide", "two_quads"])
def test_tile_kernel(name, knobs):
    # gemm_tile.cu: 128-token tiles (M = 65 .. 128) and 256-token tiles (129 .. 256), the last
    # one part padding; partial column tiles (wide: 6152 columns); every width (mixed_all); K
    # splits chosen by the cost model (splitk) or forced (MBWQ_TILE_SPLITS); any M forced onto
    # it (MBWQ_TILE_MIN_M / MAX_M: one row, several tiles of each size, tiles of 16, 32 and 64
    # tokens, which only the knobs reach). Deterministic.
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the tile kernel runs on compute capability 9.0 (wgmma) only")
    layer, W = layer_and_weight(SPECS[name])
    K = layer.in_channels
    for dtype in DTYPES:
        for M in (65, 128, 129, 256):
            x = rand_x(M, K, dtype, seed=M)
            y = run_gemm(layer, x)
            assert_close_to_reference(y, x, W, layer)
            assert torch.equal(run_gemm(layer, x), y)
        knobs.set("MBWQ_TILE_MIN_M", "1")
        knobs.set("MBWQ_TILE_MAX_M", "100000")
        for M, tokens in ((1, "0"), (20, "0"), (40, "0"), (64, "0"), (5, "256"), (300, "128"),
                          (600, "0"), (70, "16"), (100, "32"), (300, "64")):
            knobs.set("MBWQ_TILE_TOKENS", tokens)
            x = rand_x(M, K, dtype, seed=M)
            assert_close_to_reference(run_gemm(layer, x), x, W, layer)
        knobs.set("MBWQ_TILE_TOKENS", "0")
        knobs.set("MBWQ_TILE_SPLITS", "3")
        for M in (7, 20, 40, 300):
            x = rand_x(M, K, dtype, seed=M)
            y = run_gemm(layer, x)
            assert_close_to_reference(y, x, W, layer)
            assert torch.equal(run_gemm(layer, x), y)
        for knob in ("MBWQ_TILE_MIN_M", "MBWQ_TILE_MAX_M", "MBWQ_TILE_TOKENS", "MBWQ_TILE_SPLITS"):
            knobs.set(knob, 0)


@pytest.mark.parametrize("name", ["q4g128", "mixed_all", "splitk", "wide", "two_quads"])
def test_tile_kernel_stream_k(name, knobs):
    # gemm_tile.cu's stream-K schedule (MBWQ_TILE_STREAM=2): persistent CTAs, each an equal run
    # of (tile, block) units. Runs that cut tiles (every shape here), runs of several whole
    # tiles (two_quads at 600 rows: 192 tiles of 8 blocks on 132 CTAs), one block a CTA
    # (splitk: 128 units), several token tiles (600 rows, 300 rows in 128-token tiles), bias.
    # Against the reference and deterministic.
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the tile kernel runs on compute capability 9.0 (wgmma) only")
    layer, W = layer_and_weight(SPECS[name])
    K, N = layer.in_channels, layer.out_channels
    knobs.set("MBWQ_TILE_MIN_M", "1")
    knobs.set("MBWQ_TILE_MAX_M", "100000")
    knobs.set("MBWQ_TILE_STREAM", "2")
    for dtype in DTYPES:
        for M, tokens in ((1, "0"), (40, "0"), (65, "0"), (129, "0"), (256, "0"), (600, "0"),
                          (300, "128"), (100, "32")):
            knobs.set("MBWQ_TILE_TOKENS", tokens)
            p = mbwq_ops.plan(M, K, N, dtype)
            assert p["path"] == "tile" and p["grid"]["ctas"] > 0, p
            x = rand_x(M, K, dtype, seed=M)
            y = run_gemm(layer, x)
            assert_close_to_reference(y, x, W, layer)
            assert torch.equal(run_gemm(layer, x), y), (M, tokens)


def test_tile_kernel_from_33_rows(knobs):
    # plan.h: the tile kernel takes M = 33-64 (64-token tiles); below 33 rows the mma.sync
    # kernel does. The default call of a 2048 x 16384 layer is bitwise the call forced onto the
    # path it should take, and right.
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the tile kernel runs on compute capability 9.0 (wgmma) only")
    spec = LayerSpec(2048, 16384, False, w_bit=4, group_size=128, bias=True, seed=7)
    layer, W = layer_and_weight(spec)
    for M, path in ((32, "100000"), (33, "1"), (64, "1")):
        x = rand_x(M, spec.in_features, torch.float16, seed=M)
        y = run_gemm(layer, x)
        assert_close_to_reference(y, x, W, layer)
        knobs.set("MBWQ_TILE_MIN_M", path)
        assert torch.equal(run_gemm(layer, x), y), (M, path)
        knobs.set("MBWQ_TILE_MIN_M", 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_staged_and_direct_x_gather_agree(dtype, knobs):
    # csrc/cuda/gather.cu copies rows of x through shared memory from MBWQ_GATHER_MIN_M rows on
    # (32 unless set) and reads each element from global memory below that: the same bits,
    # for every path's order (M = 1 and 40: mma.sync kernel for 16-bit x; 130: the tile kernel
    # on compute capability 9.0, else cuBLAS; fp32 x: cuBLAS; M = 20 and 40 forced onto the
    # tile kernel: tiles of 32 and 64 tokens), several CTAs per row (M = 1, 40), several rows
    # per CTA (M = 1500: more rows than the CTAs that fit on the device; cuBLAS), and x off
    # 16-byte alignment (element loads instead of 16-byte ones; the cuBLAS path).
    layer, W = layer_and_weight(SPECS["mixed_all"])
    K = layer.in_channels
    for M, tile_min_m in ((1, "0"), (40, "0"), (130, "0"), (20, "1"), (40, "1"), (1500, "0")):
        knobs.set("MBWQ_TILE_MIN_M", tile_min_m)
        x = rand_x(M, K, dtype, seed=M)
        x_off = torch.empty(M * K + 1, dtype=dtype, device="cuda")[1:].view(M, K)
        x_off.copy_(x)
        for xx in (x, x_off):
            ys = []
            for rows in ("1", "100000000"):
                knobs.set("MBWQ_GATHER_MIN_M", rows)
                ys.append(run_gemm(layer, xx))
            assert torch.equal(ys[0], ys[1]), (M, xx.data_ptr() % 16)
            if dtype != torch.float32:
                assert_close_to_reference(ys[0], xx, W, layer)


def test_gemm_float32_activations():
    layer, W = layer_and_weight(SPECS["mixed_all"])
    for M in (1, 7, 40):
        x = rand_x(M, layer.in_channels, torch.float32, seed=M)
        assert_close_to_reference(run_gemm(layer, x), x, W, layer)


@st.composite
def cuda_cases(draw):
    use_mbw = draw(st.booleans())
    K = 32 * draw(st.integers(1, 48))
    N = draw(st.sampled_from([4, 60, 72, 128, 132, 200, 256, 520, 66, 131]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    if use_mbw:
        widths = draw(st.lists(st.sampled_from([8, 6, 5, 4, 3, 2]), min_size=1, max_size=6,
                               unique=True))
        spec = random_mixed_spec(rng, K, N, widths, perm=draw(st.sampled_from(["random", "identity"])),
                                 bias=draw(st.booleans()), seed=seed)
    else:
        spec = LayerSpec(K, N, False, w_bit=draw(st.sampled_from([4, 2])),
                         group_size=32 * draw(st.integers(1, 8)),
                         perm=draw(st.sampled_from(["random", "identity", "zeros"])),
                         bias=draw(st.booleans()), seed=seed)
    M = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 13, 17, 31, 32, 33, 40, 64, 118, 300]))
    dtype = draw(st.sampled_from(DTYPES))
    return spec, M, dtype


@given(cuda_cases())
def test_gemm_property_vs_reference(case):
    spec, M, dtype = case
    layer, W = layer_and_weight(spec)
    x = rand_x(M, spec.in_features, dtype, seed=M)
    assert_close_to_reference(run_gemm(layer, x), x, W, layer)


def test_tensor_core_decoder_matches_its_reference():
    # mma_decode.cuh: decode_pairs (LOP3 / PRMT / funnel-shift tricks) against
    # decode_pairs_reference (each code read by its bit position), every width and lane position,
    # on random words and on words with every bit set or one bit set; and the fold decode's
    # subnormal pairs (mma_fold.cuh), which must be the reference codes shifted to their offset
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    words = torch.randint(-(1 << 31), 1 << 31, (1 << 16, 2), generator=g, dtype=torch.int64)
    one_bit = torch.tensor([[1 << b if b < 31 else -(1 << 31), 0] for b in range(32)]
                           + [[0, 1 << b if b < 31 else -(1 << 31)] for b in range(32)])
    words = torch.cat([words, one_bit, torch.tensor([[-1, -1], [-1, 0], [0, -1]])])
    count = torch.ops.mbwq.decode_mismatches(words.to(torch.int32).cuda())
    assert count.dtype == torch.int64 and count.item() == 0


@pytest.mark.parametrize("name", ["q4g128", "mixed_all", "n_odd", "splitk"])
def test_dequant_bit_exact(name):
    spec = SPECS[name]
    layer, W = layer_and_weight(spec)
    Wc = layer.dequantized_weight(torch.float16)
    assert torch.equal(Wc.cpu(), W)
    assert torch.equal(layer.dequantized_weight(torch.bfloat16).cpu(), W.to(torch.bfloat16))
    assert torch.equal(layer.dequantized_weight(torch.float32).cpu(), W.float())
    assert torch.equal(layer.dequantized_weight(torch.float64).cpu(), W.double())


# The golden layers run on CUDA through tests/test_golden.py (parametrized by device).


def test_m_zero_and_shapes():
    layer, _ = layer_and_weight(SPECS["q4g128"])
    for dtype in DTYPES:
        y = run_gemm(layer, torch.empty(0, layer.in_channels, dtype=dtype, device="cuda"))
        assert y.shape == (0, layer.out_channels) and y.dtype == dtype and y.is_cuda
    y = layer(rand_x(6, layer.in_channels, torch.float16).view(2, 3, -1))
    assert y.shape == (2, 3, layer.out_channels)


def test_non_contiguous_and_misaligned_inputs():
    layer, W = layer_and_weight(SPECS["mixed_432"])
    x = rand_x(5, 2 * layer.in_channels, torch.float16)[:, ::2]  # strided
    assert_close_to_reference(run_gemm(layer, x), x, W, layer)
    # qweight at a 4-byte offset: the 16-byte vector kernel must not be used, result unchanged
    q = layer.qweight
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_off = buf[1:].view_as(q)
    q_off.copy_(q)
    x = rand_x(3, layer.in_channels, torch.float16, seed=3)
    y = mbwq_ops.gemm(x, q_off, *gemm_args(layer)[1:])
    assert_close_to_reference(y, x, W, layer)
    assert torch.equal(mbwq_ops.dequant(q_off, *gemm_args(layer)[1:5]).cpu(), W)


def test_bf16_large_values_and_fp16_finite():
    layer, W = layer_and_weight(SPECS["mixed_all"])
    x = rand_x(4, layer.in_channels, torch.bfloat16, scale=1e30)
    assert_close_to_reference(run_gemm(layer, x), x, W, layer)
    x = rand_x(40, layer.in_channels, torch.bfloat16, scale=1e30)
    assert_close_to_reference(run_gemm(layer, x), x, W, layer)
    # fp16: inputs near the top of the range, outputs still representable
    layer, W = layer_and_weight(SPECS["q2g64"])
    for M in (1, 9, 64):
        x = rand_x(M, layer.in_channels, torch.float16, seed=M)
        x = (x / x.abs().amax() * 60000).half()
        cs = layer.channel_scale.reshape(-1)
        ref = reference.gemm_reference(x, W, cs, layer.bias)
        if ref.abs().max() < 6e4:
            y = run_gemm(layer, x)
            assert torch.isfinite(y).all()


KERNEL_KNOBS = {
    "default": {},
    # one row of fp16 x on the scale-after-product row (other calls keep the default rows)
    "fold": {"MBWQ_MMA_CONFIG": str(FOLD_ROW + 1)},
    # every M on the tile kernel (wgmma devices): its 16-, 32- and 64-token tiles
    "tiles": {"MBWQ_TILE_MIN_M": "1"},
    # the same on the tile kernel's stream-K schedule
    "stream_k": {"MBWQ_TILE_MIN_M": "1", "MBWQ_TILE_STREAM": "2"},
}


@pytest.mark.parametrize("setting", list(KERNEL_KNOBS))
@pytest.mark.parametrize("M", [1, 5, 20, 64, 100, 200, 300, 1500])
def test_invalid_tables_do_not_crash(M, setting, knobs):
    # invalid table entries and perm values on every path (KERNEL_KNOBS sends small M to the
    # tile kernel's small tiles)
    for k, v in KERNEL_KNOBS[setting].items():
        knobs.set(k, v)
    layer, _ = layer_and_weight(SPECS["mixed_432"])
    q, s, z, blocks, perm, cs, bias = gemm_args(layer)
    x = rand_x(M, layer.in_channels, torch.float16)
    bad = blocks.clone()
    bad[1, 0] = 7                      # no such width
    bad[3, 1] = q.shape[0] + 100       # qweight row past the end
    bad[5, 2] = -1                     # no such group
    y = mbwq_ops.gemm(x, q, s, z, bad, perm, cs, bias)
    W = mbwq_ops.dequant(q, s, z, bad, perm)
    bad_perm = torch.full_like(perm, 1 << 20) if perm.numel() else torch.full(
        (layer.in_channels,), -5, dtype=torch.int32, device="cuda")
    y2 = mbwq_ops.gemm(x, q, s, z, blocks, bad_perm, cs, bias)
    mbwq_ops.dequant(q, s, z, blocks, bad_perm)
    torch.cuda.synchronize()
    assert torch.isnan(y).any() and torch.isnan(W).any() and torch.isnan(y2).all()
    # the context is still healthy
    y3 = run_gemm(layer, x)
    torch.cuda.synchronize()
    assert torch.isfinite(y3).all()


@pytest.mark.parametrize("name,M", [("onesplit", 3), ("splitk", 1), ("splitk", 7),
                                    ("q4g128", 118), ("n_odd", 2), ("splitk", 20),
                                    ("mixed_all", 64), ("onesplit", 33)])
def test_deterministic(name, M):
    layer, _ = layer_and_weight(SPECS[name])
    for dtype in DTYPES:
        x = rand_x(M, layer.in_channels, dtype, seed=11)
        first = run_gemm(layer, x)
        for _ in range(19):
            assert torch.equal(run_gemm(layer, x), first)
    W = layer.dequantized_weight()
    for _ in range(19):
        assert torch.equal(layer.dequantized_weight(), W)


def mixed_stack():
    rng = random.Random(0)
    specs = [random_mixed_spec(rng, 512, 768, (4, 3, 2), bias=True, seed=1),
             random_mixed_spec(rng, 768, 256, (8, 6, 5), seed=2),
             LayerSpec(256, 512, False, w_bit=4, group_size=64, perm="random", seed=3),
             random_mixed_spec(rng, 512, 512, (6, 4, 2), seed=4)]
    return torch.nn.Sequential(*[make_layer(s, "cuda")[0] for s in specs])


def capture(model, static_x):
    """``model(static_x)`` captured in a CUDA graph after a warm-up on a side stream (cuBLAS
    handles, shared-memory attributes): the graph and its output tensor."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        static_y = model(static_x)
    return g, static_y


@pytest.mark.parametrize("M", [4, 20, 48, 100])
def test_cuda_graph_capture_replay(M):
    model = mixed_stack()
    static_x = rand_x(M, 512, torch.float16)
    g, static_y = capture(model, static_x)
    for seed in range(3):
        x = rand_x(M, 512, torch.float16, seed=100 + seed)
        static_x.copy_(x)
        g.replay()
        with torch.no_grad():
            eager = model(x)
        torch.cuda.synchronize()
        if planned_path(M, 512, 512, torch.float16) in ("mma", "tile"):
            # our kernels: bitwise the same under capture
            assert torch.equal(static_y, eager)
        else:  # cuBLAS may pick another algorithm under capture
            torch.testing.assert_close(static_y, eager, rtol=2e-3, atol=2e-3)


def test_cuda_graph_large_m_path():
    # gather + dequant + cuBLAS under capture, replayed on fresh inputs
    layer, W = layer_and_weight(SPECS["wide"])
    static_x = rand_x(300, layer.in_channels, torch.float16)
    g, static_y = capture(layer, static_x)
    for seed in range(3):
        x = rand_x(300, layer.in_channels, torch.float16, seed=200 + seed)
        static_x.copy_(x)
        g.replay()
        torch.cuda.synchronize()
        assert_close_to_reference(static_y, x, W, layer)


def test_torch_compile_reduce_overhead_frames():
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = mixed_stack()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    Ms = [2, 3, 17, 33, 118]
    with torch.no_grad():
        for M in Ms:
            x = rand_x(M, 512, torch.float16, seed=M)
            torch._dynamo.mark_dynamic(x, 0)
            for _ in range(3):  # record + replay the CUDA graph
                y = compiled(x).clone()
            torch.testing.assert_close(y, model(x), rtol=2e-3, atol=2e-3)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_cpu_gpu_move_after_prepare():
    for name in ("mixed_all", "q4g128"):
        spec = SPECS[name]
        layer, t = make_layer(spec, "cpu")
        W = reference_weight(spec, t)
        for M in (3, 40):
            x = torch.randn(M, spec.in_features).half()
            y_cpu = layer(x)
            layer.cuda()
            y_gpu = layer(x.cuda())
            assert_close_to_reference(y_gpu, x, W, layer)
            assert torch.equal(layer.dequantized_weight().cpu(), W)
            layer.cpu()
            assert torch.equal(layer(x), y_cpu)
            sd = layer.state_dict()
            for k, v in t.items():
                assert torch.equal(sd[k], v), k


def test_opcheck_cuda():
    layer, _ = layer_and_weight(SPECS["mixed_432"])
    args = gemm_args(layer)
    for M, dtype in ((1, torch.float16), (5, torch.bfloat16), (40, torch.float16)):
        x = rand_x(M, layer.in_channels, dtype).requires_grad_()
        torch.library.opcheck(torch.ops.mbwq.gemm.default, (x, *args))
        torch.library.opcheck(torch.ops.mbwq.gemm.default, (x.detach(), *args[:5], None, None))
    torch.library.opcheck(torch.ops.mbwq.dequant.default, (*args[:5], torch.bfloat16))


def test_current_stream_and_device_guard():
    layer, W = layer_and_weight(SPECS["mixed_432"])
    x = rand_x(3, layer.in_channels, torch.float16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = run_gemm(layer, x)
        y_big = run_gemm(layer, rand_x(64, layer.in_channels, torch.float16))
    s.synchronize()
    assert_close_to_reference(y, x, W, layer)
    assert y_big.shape[0] == 64
