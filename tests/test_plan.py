"""The dispatch plan (csrc/plan.h through mbwq_ops.plan) answers on any machine, and its
answers hang together: the properties every change of a threshold must keep. (That the CUDA
kernels follow the plan is tests/test_cuda.py's job, on a GPU.)"""
import pytest
import torch
from hypothesis import given, strategies as st

import mbwq_ops
from layers import FOLD_ROW

H100 = dict(sm_count=132, wgmma=True)
AMPERE = dict(sm_count=108, wgmma=False)
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672), (28672, 8192), (512, 520)]


def paths(K, N, dtype=torch.float16, Ms=range(1, 1100), **dev):
    return [mbwq_ops.plan(M, K, N, dtype, **dev)["path"] for M in Ms]


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_paths_run_mma_then_tile_then_dequant_as_m_grows(K, N, dtype):
    for dev in (H100, AMPERE):
        seq = paths(K, N, dtype, **dev)
        order = {"mma": 0, "tile": 1, "dequant_matmul": 2}
        ranks = [order[p] for p in seq]
        assert ranks == sorted(ranks), f"{K}x{N} {dtype}: paths go back and forth"
        assert seq[0] == "mma" and seq[-1] == "dequant_matmul"
        assert ("tile" in seq) == dev["wgmma"]


def test_empty_and_non_tensor_core_calls():
    assert mbwq_ops.plan(0, 4096, 4096, **H100)["path"] == "empty"
    assert mbwq_ops.plan(5, 4096, 0, **H100)["path"] == "empty"
    assert mbwq_ops.plan(5, 0, 4096, **H100)["path"] == "empty"
    for M in (1, 40, 100, 500):
        assert mbwq_ops.plan(M, 4096, 4096, torch.float32, **H100)["path"] == "dequant_matmul"
        assert mbwq_ops.plan(M, 4096, 4100, **H100)["path"] == "dequant_matmul"  # N % 8
        assert mbwq_ops.plan(M, 4096, 4096, aligned=False, **H100)["path"] == "dequant_matmul"


@given(M=st.integers(1, 4096), K=st.sampled_from([256, 4096, 8192, 28672]),
       N=st.sampled_from([8, 1024, 4096, 8192, 28672]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), wgmma=st.booleans(),
       sm=st.sampled_from([1, 16, 108, 132]))
def test_each_plan_is_well_formed(M, K, N, dtype, wgmma, sm):
    p = mbwq_ops.plan(M, K, N, dtype, sm_count=sm, wgmma=wgmma)
    nblocks = K // 32
    g = p["grid"]
    if p["path"] == "tile":
        t = p["tile_tokens"]
        assert t in (16, 32, 64, 128, 256) and (t >= M or t == 256)
        assert t == 16 or t // 2 < M  # the fewest tokens that cover M
    if p["path"] == "mma":
        assert 1 <= p["chunk_rows"] <= 64 and p["chunk_rows"] == min(M, 64)
        assert p["mma_config"] >= 0 and g["wc"] in (1, 2, 4, 8)
    assert g["ctas"] == 0  # stream-K only where MBWQ_TILE_STREAM asks for it
    if p["path"] in ("tile", "mma"):
        assert g["splits"] >= 1 and g["blocks_per_split"] >= 1
        assert (g["splits"] - 1) * g["blocks_per_split"] < nblocks <= g["splits"] * g["blocks_per_split"]
        assert g["tiles"] >= 1


def test_knobs_move_the_boundaries_and_come_back():
    K, N = 4096, 4096
    before = paths(K, N, Ms=range(1, 300), **H100)
    with mbwq_ops.ops.tuning(MBWQ_TILE_MIN_M=1):
        assert set(paths(K, N, Ms=range(1, 257), **H100)) == {"tile"}
    with mbwq_ops.ops.tuning(MBWQ_MMA_NO_WGMMA=1):
        assert "tile" not in paths(K, N, Ms=range(1, 300), **H100)
    with mbwq_ops.ops.tuning(MBWQ_TILE_TOKENS=32, MBWQ_TILE_SPLITS=3):
        p = mbwq_ops.plan(100, K, N, **H100)
        assert p["tile_tokens"] == 32 and p["grid"]["splits"] == 3
    with mbwq_ops.ops.tuning(MBWQ_MMA_SPLITS=4, MBWQ_MMA_WC=1):
        p = mbwq_ops.plan(3, K, N, **H100)
        assert p["grid"]["splits"] == 4 and p["grid"]["wc"] == 1
    default = mbwq_ops.plan(3, K, N, **H100)["mma_config"]
    with mbwq_ops.ops.tuning(MBWQ_MMA_CONFIG=6):  # index 5: up to 64 rows
        assert mbwq_ops.plan(3, K, N, **H100)["mma_config"] == 5
        assert mbwq_ops.plan(20, K, N, **H100)["mma_config"] == 5
        assert mbwq_ops.plan(3, K, N, torch.float32, **H100)["path"] == "dequant_matmul"
    with mbwq_ops.ops.tuning(MBWQ_MMA_CONFIG=2):  # index 1: not valid above 16 rows
        assert mbwq_ops.plan(20, K, N, **H100)["mma_config"] != 1
    with mbwq_ops.ops.tuning(MBWQ_MMA_CONFIG=99):  # no such configuration: the default
        assert mbwq_ops.plan(3, K, N, **H100)["mma_config"] == default
    assert paths(K, N, Ms=range(1, 300), **H100) == before


def test_knob_settings_name_the_knobs_that_are_set():
    # what bench.py writes into each record: the knobs that are not 0, in plan.h's Knobs order
    with mbwq_ops.ops.tuning(MBWQ_MMA_SPLITS=0, MBWQ_TILE_MIN_M=0, MBWQ_TILE_STREAM=0):
        base = [s for s in mbwq_ops.ops.knob_settings().split(",") if s]
        with mbwq_ops.ops.tuning(MBWQ_MMA_SPLITS=3, MBWQ_TILE_MIN_M=40, MBWQ_TILE_STREAM=2):
            now = mbwq_ops.ops.knob_settings().split(",")
    assert not any(s.startswith(("MBWQ_MMA_SPLITS=", "MBWQ_TILE_MIN_M=")) for s in base)
    added = [s for s in now if s not in base]
    assert added == ["MBWQ_TILE_MIN_M=40", "MBWQ_MMA_SPLITS=3", "MBWQ_TILE_STREAM=2"]


@pytest.mark.parametrize("K,N", SHAPES)
def test_fold_row_only_where_named(K, N):
    # opt_in: the default plan never takes it; named, it serves one row of fp16 x only
    for dtype in (torch.float16, torch.bfloat16):
        assert all(mbwq_ops.plan(M, K, N, dtype, **H100)["mma_config"] != FOLD_ROW
                   for M in range(1, 65))
    with mbwq_ops.ops.tuning(MBWQ_MMA_CONFIG=FOLD_ROW + 1):
        assert mbwq_ops.plan(1, K, N, **H100)["mma_config"] == FOLD_ROW
        assert mbwq_ops.plan(1, K, N, **AMPERE)["mma_config"] == FOLD_ROW
        assert mbwq_ops.plan(1, K, N, torch.bfloat16, **H100)["mma_config"] != FOLD_ROW
        assert mbwq_ops.plan(2, K, N, **H100)["mma_config"] != FOLD_ROW


@pytest.mark.parametrize("M,K,N", [(256, 8192, 28672), (64, 8192, 28672), (40, 256, 256),
                                   (600, 256, 8192), (129, 4096, 4096)])
def test_stream_k_takes_one_cta_per_sm_or_per_unit(M, K, N):
    """MBWQ_TILE_STREAM=2: the tile kernel's stream-K schedule on min(SMs, units) CTAs, units =
    tiles x 32-row blocks; 1 or 0 (the default): the grid."""
    with mbwq_ops.ops.tuning(MBWQ_TILE_MIN_M=1, MBWQ_TILE_MAX_M=100000):
        grid_plan = mbwq_ops.plan(M, K, N, **H100)
        for sm in (132, 16, 1):
            with mbwq_ops.ops.tuning(MBWQ_TILE_STREAM=2):
                p = mbwq_ops.plan(M, K, N, sm_count=sm, wgmma=True)
            assert p["path"] == "tile"
            assert p["grid"]["ctas"] == min(sm, p["grid"]["tiles"] * (K // 32))
        with mbwq_ops.ops.tuning(MBWQ_TILE_STREAM=1):
            assert mbwq_ops.plan(M, K, N, **H100) == grid_plan
    assert grid_plan["grid"]["ctas"] == 0


def tile_schedule(mtiles, ntiles, nblocks, ctas):
    """torch.ops.mbwq.tile_schedule decoded: the pieces [(cta, mtile, ntile, jb0, nb, part)] and
    the cut tiles {tile: [partial slots in CTA order]}."""
    v = torch.ops.mbwq.tile_schedule(mtiles, ntiles, nblocks, ctas)
    n, i = v[0], 1
    pieces = [tuple(v[i + 6 * k:i + 6 * k + 6]) for k in range(n)]
    i += 6 * n
    cuts = {}
    while i < len(v):
        tile, k = v[i], v[i + 1]
        assert tile not in cuts
        cuts[tile] = v[i + 2:i + 2 + k]
        i += 2 + k
    return pieces, cuts


@given(mtiles=st.integers(1, 16), ntiles=st.integers(1, 300), nblocks=st.integers(1, 512),
       ctas=st.integers(1, 264))
def test_stream_k_schedule_covers_every_block_once_and_sums_every_cut_tile(mtiles, ntiles,
                                                                             nblocks, ctas):
    """The tile kernel's stream-K rules (plan.h: StreamK, the code the kernels run): every
    (tile, block) unit in exactly one piece; runs of equal length to one unit; a piece is
    whole or writes its CTA's first or last slot; every tile with a partial piece is summed
    once, from exactly its pieces' slots in block order."""
    ctas = min(ctas, mtiles * ntiles * nblocks)
    pieces, cuts = tile_schedule(mtiles, ntiles, nblocks, ctas)
    units = mtiles * ntiles * nblocks
    seen, per_cta, parts, slots = 0, [0] * ctas, {}, set()
    for cta, mtile, ntile, jb0, nb, part in pieces:
        tile = mtile + mtiles * ntile
        assert tile * nblocks + jb0 == seen, "pieces leave a gap or overlap"  # in unit order
        assert nb >= 1 and jb0 + nb <= nblocks and 0 <= mtile < mtiles and 0 <= ntile < ntiles
        seen += nb
        per_cta[cta] += nb
        if part < 0:
            assert jb0 == 0 and nb == nblocks
        else:
            assert part in (2 * cta, 2 * cta + 1) and part not in slots
            slots.add(part)
            parts.setdefault(tile, []).append(part)
    assert seen == units
    assert max(per_cta) - min(per_cta) <= 1 and min(per_cta) >= 1
    assert cuts == parts
    assert len(cuts) <= ctas - 1


def test_tile_schedule_names_bad_arguments():
    with pytest.raises(ValueError, match="ctas=0"):
        torch.ops.mbwq.tile_schedule(1, 2, 3, 0)
    with pytest.raises(ValueError, match="ctas=7"):
        torch.ops.mbwq.tile_schedule(1, 2, 3, 7)


def test_bad_knobs_and_devices_are_named():
    with pytest.raises(ValueError, match="unknown knob MBWQ_TILE_MINM"):
        with mbwq_ops.ops.tuning(MBWQ_TILE_MINM=1):
            pass
    with pytest.raises(ValueError, match="must lie in"):
        torch.ops.mbwq.set_knob("MBWQ_TILE_MIN_M", -1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pass sm_count= and wgmma="):
            mbwq_ops.plan(1, 4096, 4096)


def test_larger_layers_keep_tensor_cores_for_more_rows():
    """A large layer reads its weights once per row chunk: up to more rows than a small one
    before W is dequantized for cuBLAS (the point of kLargeLayerWeights)."""
    def last(path, K, N, dev):
        return max((M for M, p in zip(range(1, 1100), paths(K, N, **dev)) if p == path), default=0)
    assert last("mma", 8192, 28672, AMPERE) > last("mma", 4096, 4096, AMPERE)


def test_tile_kernel_from_33_rows():
    """With wgmma, every layer the tile kernel can take goes to it from 33 rows (plan.h:
    kTileMinM), large or small; mma.sync below."""
    for K, N in ((4096, 1024), (4096, 4096), (8192, 28672)):
        seq = paths(K, N, Ms=range(1, 257), **H100)
        assert seq[31] == "mma" and set(seq[32:]) == {"tile"}, (K, N)
