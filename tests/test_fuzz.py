"""Fuzzing the op boundary: any tensor a caller can legally pass gives the fp64
dequantize-then-matmul result, or a clear exception; nothing crashes the interpreter.

Each case draws a random valid layer (tests/strategies.py), an activation dtype, a row count
that reaches every kernel path (CPU: direct below 17 rows, dequant + matmul above; CUDA:
mma.sync, the tile kernel, dequant + cuBLAS), a memory layout for x (transposed, expanded with
stride 0, strided slices, a storage offset, channels-last through the layer), a magnitude from
tiny to near the float range, and non-finite values placed in x.

The comparison, per output element, against ``ref`` = the float64 reference:
* ``ref`` NaN -> NaN; ``ref`` +-inf -> the same infinity (an infinite x meets the same weights);
* ``ref`` finite and the fp32 accumulator cannot overflow (``S = |x| @ |W| + |bias|`` below the
  float32 range, so no partial sum of the plain dot product could) -> within the rounding bound
  of tests/layers.py, or, where ``ref`` is within that bound of the output dtype's overflow
  threshold, that bound or the infinity of ``ref``'s sign;
* elements whose ``S`` exceeds the float32 range are not compared (a float32 dot product may
  overflow there too); they still must not crash anything.

``HYPOTHESIS_PROFILE=thorough`` runs many more cases (the GPU check does).
"""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import mbwq_ops
from mbwq_ops import reference

from layers import FOLD_ROW, LayerSpec, device_params, error_bound, make_layer, reference_weight
from strategies import dtypes_for, layer_specs

# Row counts: 0, the CPU direct kernel (<= 16) and its edge, mma.sync (<= 64), the tile kernel
# (65..256 on Hopper, 33.. on large layers), dequant + matmul above.
M_VALUES = (0, 1, 2, 3, 7, 16, 17, 33, 64, 65, 130, 257)
LAYOUTS = ("contiguous", "transposed", "expanded", "row_slice", "col_slice", "offset")
# Magnitudes of x as powers of two, per dtype: ordinary, tiny, large, near the top of the range.
EXPONENTS = {torch.float16: (0, -10, 6, 12), torch.bfloat16: (0, -60, 40, 110, 120),
             torch.float32: (0, -60, 40, 110, 120)}
NONFINITE = ("none", "none", "inf", "-inf", "nan", "inf_row")
FP32_SAFE = torch.finfo(torch.float32).max / 4


def make_x(M, K, dtype, layout, exponent, nonfinite, seed, device):
    """x [M, K] in the given memory layout; values randn * 2^exponent, plus non-finite ones."""
    g = torch.Generator().manual_seed(seed)
    scale = 2.0 ** exponent

    def values(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    if layout == "contiguous":
        x = values(M, K)
    elif layout == "transposed":
        x = values(K, M).t()
    elif layout == "expanded":  # every row the same storage: stride 0
        x = values(1, K).expand(M, K)
    elif layout == "row_slice":
        x = values(2 * M + 1, K)[1::2]
    elif layout == "col_slice":
        x = values(M, 3 * K)[:, 2::3]
    else:  # "offset": a storage offset of 3 elements (not 16-byte aligned)
        x = values(M * K + 3)[3:].view(M, K)
    x = x.to(device)
    if M and nonfinite != "none":
        x = x.clone() if layout != "expanded" else x
        special = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "inf_row": math.inf}
        m = int(torch.randint(0, M, (1,), generator=g))
        k = int(torch.randint(0, K, (1,), generator=g))
        if layout == "expanded":  # one write changes every row: keep the view, that is the point
            base = x.clone()[:1].contiguous()
            base[0, k] = special[nonfinite]
            x = base.expand(M, K)
        elif nonfinite == "inf_row":
            x[m] = math.inf
        else:
            x[m, k] = special[nonfinite]
    return x


def check_against_reference(y, x, W, cs, bias, device):
    """Assert ``y`` equals the fp64 reference as the module docstring says."""
    dtype = y.dtype
    ref = reference.gemm_reference(x, W, cs, bias)
    S = reference.error_scale(x, W, cs, bias)
    got = y.detach().cpu().double()
    assert got.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.isnan(got[nan]).all(), "NaN in the reference but a number here"
    inf = torch.isinf(ref)
    assert torch.equal(got[inf], ref[inf]), "an infinity of the reference differs here"
    finite = torch.isfinite(ref) & (S < FP32_SAFE)
    bound = error_bound(dtype, ref, S, cublas_bf16=device == "cuda")
    top = torch.finfo(dtype).max
    near_top = finite & (ref.abs() + bound >= top)
    ordinary = finite & ~near_top
    err = (got - ref).abs()
    bad = ordinary & ~(err <= bound)
    assert not bad.any(), (f"{int(bad.sum())} elements off: first at "
                           f"{tuple(bad.nonzero()[0].tolist())}, got {got[bad][0].item()}, "
                           f"reference {ref[bad][0].item()}, bound {bound[bad][0].item()}")
    edge_ok = (err <= bound) | (torch.isinf(got) & (torch.sign(got) == torch.sign(ref)))
    assert (edge_ok | ~near_top).all(), "a result near the overflow threshold is neither close nor inf"


def fuzz_one_case(data, device, dtypes, Ms):
    """One drawn case of the op-boundary contract (module docstring): layer, dtype, M, layout,
    magnitude, non-finite values; the result against the reference, through the layer and as a
    contiguous copy."""
    spec = data.draw(layer_specs(max_k_blocks=24, max_n=40), label="layer")
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    M = data.draw(st.sampled_from(Ms), label="M")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    exponent = data.draw(st.sampled_from(EXPONENTS[dtype]), label="exponent")
    nonfinite = data.draw(st.sampled_from(NONFINITE), label="nonfinite")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    layer, t = make_layer(spec, device)
    W = reference_weight(spec, t)
    cs = t["channel_scale"].reshape(-1)
    x = make_x(M, spec.in_features, dtype, layout, exponent, nonfinite, seed, device)
    y = mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, layer._blocks, layer._perm,
                      cs, t.get("bias"))
    assert y.dtype == dtype and y.device.type == device and y.shape == (M, spec.out_features)
    check_against_reference(y, x, W, cs, t.get("bias"), device)
    # the same view through the layer, and as a contiguous copy: the identical answer
    assert torch.equal(layer(x).nan_to_num(), y.nan_to_num())
    assert torch.equal(mbwq_ops.gemm(x.contiguous(), layer.qweight, layer.scales, layer.zeros,
                                     layer._blocks, layer._perm, cs, t.get("bias")).nan_to_num(),
                       y.nan_to_num())


@pytest.mark.parametrize("device", device_params())
@settings(max_examples=60)
@given(data=st.data())
def test_gemm_any_x_layout_magnitude_and_nonfinite(device, data):
    fuzz_one_case(data, device, dtypes_for(device), M_VALUES)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@settings(max_examples=40)
@given(data=st.data())
def test_fold_row_any_x_layout_magnitude_and_nonfinite(data):
    # the same contract on the opt-in fold row (one row of fp16 x; csrc/cuda/mma_fold.cuh)
    with mbwq_ops.ops.tuning(MBWQ_MMA_CONFIG=FOLD_ROW + 1):
        fuzz_one_case(data, "cuda", [torch.float16], [1])


@pytest.mark.parametrize("device", device_params())
@settings(max_examples=20)
@given(data=st.data())
def test_layer_channels_last_and_batched_views(device, data):
    """N-D inputs in channels-last order (the feature dim is the innermost of a permuted
    tensor) and batched views reach the op through the layer's reshape."""
    spec = data.draw(layer_specs(max_k_blocks=8, max_n=24), label="layer")
    dtype = data.draw(st.sampled_from(dtypes_for(device)), label="dtype")
    B, H, Wd = (data.draw(st.integers(1, 3)) for _ in range(3))
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    layer, t = make_layer(spec, device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, spec.in_features, H, Wd, generator=g).to(dtype).to(device)
    x = x.permute(0, 2, 3, 1)  # [B, H, W, K], not contiguous
    y = layer(x)
    assert y.shape == (B, H, Wd, spec.out_features)
    W = reference_weight(spec, t)
    check_against_reference(y.reshape(-1, spec.out_features), x.reshape(-1, spec.in_features),
                            W, t["channel_scale"].reshape(-1), t.get("bias"), device)


@pytest.mark.parametrize("device", device_params())
@settings(max_examples=25)
@given(data=st.data())
def test_dequant_with_strided_weight_tensors(device, data):
    """The weight tensors as non-contiguous views with storage offsets: dequant is still the
    reference's bits, and gemm agrees with the contiguous tensors."""
    spec = data.draw(layer_specs(max_k_blocks=12, max_n=32), label="layer")
    layer, t = make_layer(spec, device)

    def strided(a):  # the same values behind a transposed, offset view
        buf = torch.empty(a.shape[1] * a.shape[0] + 5, dtype=a.dtype, device=a.device)
        view = buf[5:].view(a.shape[1], a.shape[0]).t()
        view.copy_(a)
        return view

    q, s, z = strided(layer.qweight), strided(layer.scales), strided(layer.zeros)
    assert q.storage_offset() == 5 and (q.is_contiguous() == (q.shape[1] == 1))
    W = mbwq_ops.dequant(q, s, z, layer._blocks, layer._perm)
    assert torch.equal(W.cpu(), reference_weight(spec, t))
    x = torch.randn(5, spec.in_features, device=device).to(torch.float16)
    cs = t["channel_scale"].reshape(-1)
    assert torch.equal(mbwq_ops.gemm(x, q, s, z, layer._blocks, layer._perm, cs),
                       mbwq_ops.gemm(x, layer.qweight, layer.scales, layer.zeros, layer._blocks,
                                     layer._perm, cs))


# Table values that only a device read could see: word near 2^31 (int32 overflow in a naive
# bounds check), negative, past the end; widths outside the format; groups past scales.
BAD_ENTRIES = [(0, 1, 2**31 - 2), (0, 1, 2**31 - 1), (0, 1, -(2**31)), (0, 1, -1),
               (0, 0, 7), (0, 0, 0), (0, 0, -4), (0, 2, 2**31 - 1), (0, 2, -1)]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("row,col,value", BAD_ENTRIES)
def test_hostile_block_tables(device, row, col, value):
    """CPU: a clear error naming the entry. CUDA (no host read allowed): no crash, no
    out-of-bounds access (compute-sanitizer runs this file), NaN where the table is bad."""
    layer, t = make_layer(LayerSpec(256, 16, True, [4, 2], [128, 128], seed=row + col + 3),
                          device)
    blocks = layer._blocks.clone()
    blocks[row, col] = value
    x = torch.randn(3, 256, device=device).half()
    args = (layer.qweight, layer.scales, layer.zeros, blocks, layer._perm)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"blocks\[0\]"):
            mbwq_ops.gemm(x, *args)
        with pytest.raises(RuntimeError, match=r"blocks\[0\]"):
            mbwq_ops.dequant(*args)
    else:
        for M in (1, 40, 100, 300):
            y = mbwq_ops.gemm(torch.randn(M, 256, device=device).half(), *args)
            torch.cuda.synchronize()
            assert y.shape == (M, 16)
        W = mbwq_ops.dequant(*args)
        torch.cuda.synchronize()
        assert torch.isnan(W).any()


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("value", [2**31 - 1, -1, 256, -(2**31)])
def test_hostile_perm(device, value):
    layer, t = make_layer(LayerSpec(256, 16, True, [4, 2], [128, 128], seed=5), device)
    perm = layer._perm.clone()
    perm[7] = value
    x = torch.randn(3, 256, device=device).half()
    args = (layer.qweight, layer.scales, layer.zeros, layer._blocks, perm)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="perm"):
            mbwq_ops.gemm(x, *args)
    else:
        for M in (1, 40, 100, 300):
            y = mbwq_ops.gemm(torch.randn(M, 256, device=device).half(), *args)
            torch.cuda.synchronize()
            assert y.shape == (M, 16)
