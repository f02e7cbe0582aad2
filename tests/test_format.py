"""The stored format (FORMAT.md) as literal expectations: the worked examples of §4.1 and §6.6,
the rows list of §6.3, the group map of §6.4, and pack/unpack round trips.

Each packing example is checked three ways: ``format.pack_codes`` must produce the literal words,
and both ``format.unpack_codes`` and the reference's bit-string decoder must read the codes back.
"""
import random

import pytest
import torch
from hypothesis import given, strategies as st

from mbwq_ops import format as fmt
from mbwq_ops import reference

import layers


def words(*hex_words):
    """Unsigned 32-bit patterns as an int32 column [P, 1]."""
    v = torch.tensor(hex_words, dtype=torch.int64)
    return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).view(-1, 1)


# FORMAT.md §4.1: (bits, codes of one column, packed words)
WORKED = [
    (3, [r % 8 for r in range(32)], [0x88FAC688, 0xC688FAC6, 0xFAC688FA]),
    (4, list(range(8)) * 4, [0x76543210] * 4),
    (4, list(range(8, 16)) * 4, [0xFEDCBA98] * 4),
    (4, list(range(16)) * 2, [0x76543210, 0xFEDCBA98] * 2),
    (2, [0, 1, 2, 3] * 8, [0xE4E4E4E4] * 2),
    (8, list(range(32)), [0x03020100, 0x07060504, 0x0B0A0908, 0x0F0E0D0C,
                          0x13121110, 0x17161514, 0x1B1A1918, 0x1F1E1D1C]),
    (5, list(range(32)), [0x8A418820, 0xC5A92839, 0xCA307B9A, 0x38BDAB49, 0xFFBBCDEB]),
    (6, list(range(32)), [0x440C2040, 0xA2481C61, 0x3CE34C2C, 0x544D2450, 0xA6585D65, 0x7DE75C6D]),
]


@pytest.mark.parametrize("bits,codes,packed", WORKED, ids=lambda v: str(v)[:12])
def test_worked_example_pack(bits, codes, packed):
    got = fmt.pack_codes(torch.tensor(codes).view(-1, 1), bits)
    assert torch.equal(got, words(*packed)), [hex(int(w) & 0xFFFFFFFF) for w in got.view(-1)]


@pytest.mark.parametrize("bits,codes,packed", WORKED, ids=lambda v: str(v)[:12])
def test_worked_example_unpack(bits, codes, packed):
    want = torch.tensor(codes).view(-1, 1)
    assert torch.equal(fmt.unpack_codes(words(*packed), bits), want)
    assert torch.equal(reference._codes(words(*packed), bits, 32), want)


def test_3bit_straddling_codes_by_hand():
    # §4.1: code 10 (= 2) sits in word0 bits 30-31 and word1 bit 0; code 21 (= 5) in word1 bit 31
    # and word2 bits 0-1.
    w0, w1, w2 = 0x88FAC688, 0xC688FAC6, 0xFAC688FA
    assert ((w0 >> 30) | ((w1 & 1) << 2)) == 10 % 8
    assert ((w1 >> 31) | ((w2 & 3) << 1)) == 21 % 8
    assert (w0 >> 28) == 0x8  # the hand check of the leading hex digit
    # and the generic rule of format.h / §4 gives the same
    for r, want in ((10, 2), (21, 5), (9, 1), (31, 7)):
        j, s = divmod(3 * r, 32)
        ws = [w0, w1, w2, 0]
        assert ((ws[j] >> s) | (ws[j + 1] << (32 - s))) & 7 == want


def test_5bit_code6_straddles():
    w0, w1 = 0x8A418820, 0xC5A92839
    assert ((w0 >> 30) | ((w1 & 0b111) << 2)) == 6


def test_6bit_rows_16_restart_on_word3():
    packed = words(0x440C2040, 0xA2481C61, 0x3CE34C2C, 0x544D2450, 0xA6585D65, 0x7DE75C6D)
    assert int(packed[3, 0]) & 0x3F == 16


def test_codes_use_full_32_bits():
    # the original's own test only ever set the low 16 bits; the top bit must be data too
    codes = torch.full((32, 3), 15)
    packed = fmt.pack_codes(codes, 4)
    assert torch.equal(packed, torch.full((4, 3), -1, dtype=torch.int32))  # 0xFFFFFFFF
    assert torch.equal(fmt.unpack_codes(packed, 4), codes)


@given(seed=st.integers(0, 2**31 - 1), bits=st.sampled_from(fmt.WIDTHS),
       blocks=st.integers(1, 4), n=st.integers(1, 7))
def test_pack_unpack_round_trip(seed, bits, blocks, n):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (32 * blocks, n), generator=g)
    packed = fmt.pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (bits * blocks, n)
    assert torch.equal(fmt.unpack_codes(packed, bits), codes)
    assert torch.equal(reference._codes(packed, bits, 32 * blocks), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        fmt.pack_codes(torch.ones(32, 1, dtype=torch.int64), 7)
    with pytest.raises(ValueError, match="rows must be a multiple of 32, got 33"):
        fmt.pack_codes(torch.ones(33, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\].*got \[1, 8\]"):
        fmt.pack_codes(torch.tensor([1] * 31 + [8]).view(-1, 1), 3)


# ----------------------------------------------------------------------------- §6.3 rows list
@pytest.mark.parametrize("widths,kernel_p", [
    ({6, 5, 4, 2}, 0b00111010),
    ({8}, 0b10000000), ({6}, 0b00100000), ({5}, 0b00010000),
    ({4}, 0b00001000), ({3}, 0b00000100), ({2}, 0b00000010),
    ({8, 4, 3}, 0b10001100), ({8, 6, 5, 4, 3, 2}, 0b10111110),
])
def test_rows_list_kernel_p(widths, kernel_p):
    ws = sorted(widths, key=fmt.WIDTHS.index)
    groups = fmt.mixed_groups(ws, [64] * len(ws))
    rows = fmt.rows_list(groups)
    assert rows[6] == kernel_p
    ends, total = [], 0
    for b in fmt.WIDTHS:
        total += 64 if b in widths else 0
        ends.append(total)
    assert rows[:6] == ends


def test_rows_list_golden_layouts():
    # golden/README.md: the rows the original computed for g3 and g4
    g3 = fmt.mixed_groups([8, 8, 6, 6, 6, 6, 6, 5, 5, 4, 3, 2, 2],
                          [96, 96, 32, 64, 128, 64, 64, 96, 96, 32, 128, 64, 64])
    assert fmt.rows_list(g3) == [192, 544, 736, 768, 896, 1024, 190]
    g4 = fmt.mixed_groups([4, 3, 2, 2, 2, 2, 2], [32, 128, 64, 64, 32, 128, 64])
    assert fmt.rows_list(g4) == [0, 0, 0, 32, 160, 512, 14]


# ----------------------------------------------------------------------------- §6.6 example
@pytest.fixture(scope="module")
def example_66():
    groups = fmt.mixed_groups([8, 4, 3], [64, 96, 96])
    g = torch.Generator().manual_seed(66)
    codes = torch.cat([torch.randint(0, 1 << gr.bits, (gr.rows, 5), generator=g) for gr in groups])
    return groups, codes, fmt.pack_groups(codes, groups)


def test_66_q_groups_and_shapes(example_66):
    groups, codes, qweight = example_66
    assert [(gr.bits, gr.rows, gr.packed_rows, gr.start) for gr in groups] == \
        [(8, 64, 16, 0), (4, 96, 12, 16), (3, 96, 9, 28)]
    q_groups = fmt.q_groups_tensor(groups)
    assert q_groups.dtype == torch.int16 and q_groups.tolist() == [8, 0, 4, 16, 3, 28]
    assert qweight.shape == (37, 5)
    parsed = fmt.parse_q_groups(q_groups, 256, 37)
    assert parsed == groups


def test_66_rows_and_group_map(example_66):
    groups = example_66[0]
    assert fmt.rows_list(groups) == [64, 64, 64, 160, 256, 256, 0b10001100]
    gm = fmt.group_map(groups)
    assert gm.dtype == torch.int16 and gm.shape == (512,)
    gm = gm.view(-1, 2).tolist()
    assert gm[0] == [0, 64] and gm[1] == [0, 63] and gm[63] == [0, 1]
    assert gm[64] == [1, 96] and gm[159] == [1, 1]
    assert gm[160] == [2, 96] and gm[255] == [2, 1]
    want = [[0, 64 - k] for k in range(64)] + [[1, 96 - k] for k in range(96)] + \
        [[2, 96 - k] for k in range(96)]
    assert gm == want
    # the group map and rows list give the groups back (what exl2fp_weight reads)
    assert fmt.groups_from_group_map(fmt.group_map(groups), fmt.rows_list(groups)) == groups


def test_66_row_locations(example_66):
    _, codes, qweight = example_66
    q = qweight.to(torch.int64) & 0xFFFFFFFF
    # stored row 100 = row 36 of group 1: string bit 144 -> qweight[16 + 4], bits 16-19
    assert torch.equal((q[20] >> 16) & 0xF, codes[100])
    # stored row 200 = row 40 of group 2: string bit 120 -> qweight[28 + 3], bits 24-26
    assert torch.equal((q[31] >> 24) & 0x7, codes[200])


def test_66_blocks_table(example_66):
    groups = example_66[0]
    blocks = fmt.make_blocks(groups)
    assert blocks.dtype == torch.int32 and blocks.shape == (8, 3)
    assert blocks.tolist() == [[8, 0, 0], [8, 8, 0],
                               [4, 16, 1], [4, 20, 1], [4, 24, 1],
                               [3, 28, 2], [3, 31, 2], [3, 34, 2]]
    # row 100 is row 4 of block 3 (word 20, bit 16); row 200 row 8 of block 6 (word 31, bit 24)
    assert blocks[100 // 32].tolist() == [4, 20, 1] and 4 * (100 % 32) == 16
    assert blocks[200 // 32].tolist() == [3, 31, 2] and 3 * (200 % 32) == 24


def test_66_dequant_reference_reads_groups(example_66):
    groups, codes, qweight = example_66
    scales = torch.tensor([[0.5], [0.25], [2.0]]).half().expand(3, 5).contiguous()
    zeros = torch.tensor([[1.0], [-3.0], [0.5]]).half().expand(3, 5).contiguous()
    q_perm = torch.arange(255, -1, -1).to(torch.int16)  # reversed
    W = reference.dequant_reference(qweight, scales, zeros, q_perm, 256, use_mbw=True,
                                    q_groups=fmt.q_groups_tensor(groups))
    sc = torch.tensor([0.5] * 64 + [0.25] * 96 + [2.0] * 96).view(-1, 1)
    ze = torch.tensor([1.0] * 64 + [-3.0] * 96 + [0.5] * 96).view(-1, 1)
    stored = (codes * sc - ze).half()  # exact in fp16 for these values
    assert torch.equal(W, stored.flip(0))


# ----------------------------------------------------------------------------- uniform groups
@pytest.mark.parametrize("K,w_bit,gs,want", [
    (256, 4, 128, [(4, 128, 0, 0), (4, 128, 16, 128)]),
    (320, 2, 96, [(2, 96, 0, 0), (2, 96, 6, 96), (2, 96, 12, 192), (2, 32, 18, 288)]),
    (320, 4, 160, [(4, 160, 0, 0), (4, 160, 20, 160)]),
    (64, 4, 4096, [(4, 64, 0, 0)]),
])
def test_uniform_groups(K, w_bit, gs, want):
    got = fmt.uniform_groups(K, w_bit, gs)
    assert [(g.bits, g.rows, g.start, g.first_row) for g in got] == want


@given(seed=st.integers(0, 2**31 - 1), k_blocks=st.integers(1, 64))
def test_mixed_groups_round_trip(seed, k_blocks):
    rng = random.Random(seed)
    spec = layers.random_mixed_spec(rng, 32 * k_blocks, 3)
    groups = fmt.mixed_groups(spec.widths, spec.group_rows)
    R = sum(g.packed_rows for g in groups)
    assert fmt.parse_q_groups(fmt.q_groups_tensor(groups), 32 * k_blocks, R) == groups
    rows = fmt.rows_list(groups)
    assert rows[5] == 32 * k_blocks
    assert fmt.groups_from_group_map(fmt.group_map(groups), rows) == groups
    blocks = fmt.make_blocks(groups)
    assert blocks.shape == (k_blocks, 3)
    assert all(int(b) in fmt.WIDTHS for b in blocks[:, 0])
    assert int((blocks[:, 1] + blocks[:, 0]).max()) == R


# ----------------------------------------------------------------------------- q_perm
def test_perm_index_uint16_and_identity():
    K = 40960  # entries >= 32768 are stored as negative int16
    p = torch.arange(K - 1, -1, -1)
    q_perm = torch.where(p >= 32768, p - 65536, p).to(torch.int16)
    assert int(q_perm.min()) < 0
    got = fmt.perm_index(q_perm, K, use_mbw=True)
    assert got.dtype == torch.int32 and torch.equal(got.long(), p)
    # the identity (explicit, or all zeros in uniform mode) becomes the empty "no permutation"
    ident = torch.where(torch.arange(K) >= 32768, torch.arange(K) - 65536, torch.arange(K))
    assert fmt.perm_index(ident.to(torch.int16), K, use_mbw=True).numel() == 0
    assert fmt.perm_index(torch.zeros(K, dtype=torch.int16), K, use_mbw=False).numel() == 0


def test_reference_round_to_fp16_single_rounding():
    # a value just above an fp16 half-way point whose float32 rounding lands on it exactly:
    # 1 + 2^-11 is half-way between 1 and 1 + 2^-10; adding 2^-40 must round up, but
    # float32 would first round it to exactly 1 + 2^-11 and then to even (down to 1.0).
    exact = torch.tensor([1 + 2.0 ** -11 + 2.0 ** -40, 1 + 2.0 ** -11, -(1 + 2.0 ** -11 + 2.0 ** -40)],
                         dtype=torch.float64)
    assert torch.tensor(exact[0].item(), dtype=torch.float32).half().item() == 1.0
    got = reference.round_to_fp16(exact)
    assert got.tolist() == [1 + 2.0 ** -10, 1.0, -(1 + 2.0 ** -10)]


# ----------------------------------------------------------------------------- bad arguments
def test_mixed_groups_rejects_bad_input():
    with pytest.raises(ValueError, match=r"same length, got 2 widths \[8, 4\] and 1 row counts \[32\]"):
        fmt.mixed_groups([8, 4], [32])
    with pytest.raises(ValueError, match=r"group 1 has width 7"):
        fmt.mixed_groups([8, 7], [32, 32])
    with pytest.raises(ValueError, match=r"group 0 has 48 rows; it must be a positive multiple of 32"):
        fmt.mixed_groups([4], [48])
    with pytest.raises(ValueError, match=r"group 0 has 0 rows"):
        fmt.mixed_groups([4], [0])


def test_pack_unpack_reject_bad_shapes_and_types():
    with pytest.raises(ValueError, match=r"codes must be 2-D \[rows, N\], got shape \(32,\)"):
        fmt.pack_codes(torch.zeros(32, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="codes must be an integer tensor, got torch.float32"):
        fmt.pack_codes(torch.full((32, 1), 3.7), 4)
    packed = fmt.pack_codes(torch.ones(32, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=r"bits must be one of .* got 7"):
        fmt.unpack_codes(packed, 7)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 32\] for 4 packed rows at 4 bits, got 40"):
        fmt.unpack_codes(packed, 4, rows=40)
    groups = fmt.mixed_groups([8, 4], [32, 32])
    with pytest.raises(ValueError, match=r"the groups cover 64 rows but codes has shape \(96, 2\)"):
        fmt.pack_groups(torch.ones(96, 2, dtype=torch.int64), groups)
    with pytest.raises(ValueError, match=r"group 1 starts at stored row 0, expected 32"):
        fmt.pack_groups(torch.ones(64, 2, dtype=torch.int64), [groups[0], fmt.Group(4, 32, 8, 0)])

