"""scripts/sass_census.py's reading of SASS: loops found from backward branches, named by the
width whose decode masks they hold, counted per op. A made-up listing in cuobjdump's format,
so that the test needs neither nvcc nor cuobjdump."""
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import sass_census  # noqa: E402

KERNEL = ("_ZN4mbwq4cuda44mma_gemm_kernelI6__halfLi1ELi2ELi4ELi2ELb0ELi1EEEvPKT_PKjPKtSA_PKiPKv"
          "iPviiiiiii")


def listing(loops, rng):
    """cuobjdump -sass text of KERNEL: a prologue, then per (bits, n_lop3, n_hfma2) a loop of
    those decode ops, two HMMA, a padded cp.async and a backward branch."""
    lines, addr = [f"\t\tFunction : {KERNEL}"], 0

    def emit(text):
        nonlocal addr
        lines.append(f"        /*{addr:04x}*/                   {text} ;   /* 0x0 */")
        addr += 16
        return addr - 16

    emit("MOV R1, c[0x0][0x28]")
    for bits, n_lop3, n_hfma2 in loops:
        top = emit("DEPBAR.LE SB0, 0x2")
        ops = ([f"LOP3.LUT R{rng.randrange(2, 90)}, R3, {sass_census.WIDTH_MASKS[bits]}, R48, "
                "0xea, !PT"] * n_lop3 + ["HFMA2 R34, R34, R12.H0_H0, R81.H0_H0"] * n_hfma2
               + ["HMMA.16816.F32 R40, R32, R28, R40"] * 2)
        rng.shuffle(ops)
        for op in ops:
            emit(op)
        for _ in range(3):
            emit("@!PT LDS RZ, [RZ]")
        emit("@!P6 LDGSTS.E.BYPASS.128 [R45], desc[UR8][R36.64], !P1")
        emit("LDS.128 R32, [R44+UR6]")
        emit(f"@!P0 BRA 0x{top:x}")
    emit("EXIT")
    return "\n".join(lines)


def test_loops_are_named_and_counted():
    rng = random.Random()
    loops = [(b, rng.randrange(1, 40), rng.randrange(1, 60)) for b in (4, 3, 2, 8, 5, 6)]
    funcs = sass_census.parse_sass(listing(loops, rng))
    rows = sass_census.census(funcs)
    assert [r["bits"] for r in rows] == [2, 3, 4, 5, 6, 8]
    for bits, n_lop3, n_hfma2 in loops:
        r = next(r for r in rows if r["bits"] == bits)
        assert r["kernel"] == "fp16 mt=1 qn=2 stages=4"
        assert r["hmma"] == 2 and r["ldgsts"] == 1 and r["lds"] == 1 and r["never"] == 3
        assert r["decode"] == n_lop3 + n_hfma2
        # + DEPBAR, 2 HMMA, 3 padding LDS, LDGSTS, LDS, BRA
        assert r["static"] == n_lop3 + n_hfma2 + 9
        assert r["decode_per_weight"] == (n_lop3 + n_hfma2) / 64  # 32 rows x 64 columns / 32
    assert sass_census.census(funcs, kernel="bfloat16") == []


def test_opcode_strips_predicates_and_modifiers():
    assert sass_census.opcode("@!P0 LOP3.LUT R1, R2, 0xf, RZ, 0xc0, !PT") == "LOP3"
    assert sass_census.opcode("@!PT LDS RZ, [RZ]") == "LDS"
    assert sass_census.opcode("@UP1 BRA 0x40") == "BRA"
    assert sass_census.opcode("HMMA.16816.F32 R40, R32, R28, R40") == "HMMA"
