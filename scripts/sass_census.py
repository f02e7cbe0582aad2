"""Instruction census of the mma.sync GEMM's main loops, from SASS, on a machine without a GPU.

    python scripts/sass_census.py [--obj gemm_mma.o] [--kernel SUBSTRING] [--json]

Without --obj it compiles csrc/cuda/gemm_mma.cu for sm_90a through
scripts/check_cuda_compile.sh (OBJ_DIR keeps the object) and disassembles it with
``cuobjdump -sass``. For every mma_gemm_kernel instantiation (or those whose mangled name
contains --kernel) it finds the per-width block loops: the innermost loops that hold HMMA
instructions, one per width, named by the decode's LOP3 masks (each width masks its codes
with its own constants, mma_decode.cuh). Per loop it prints

  static   instructions of the loop body, every branch included (the path for a run that ends
           in a block of another width is in the body but not executed in steady state);
  decode   LOP3 + PRMT + SHF + HFMA2 + HADD2: the bit extraction and fp16 arithmetic of the
           decode, with the few LOP3/SHF of the loop's control counted in;
  hmma     mma.sync instructions per block; lds, ldgsts: shared-memory loads (live ones) and
           cp.async copies;
  never    instructions under the never-true predicate @!PT (ptxas pads each cp.async site with
           three `@!PT LDS RZ, [RZ]`); they take issue slots but do nothing;
  per weight   static and decode instructions per weight of a warp's 32-row block
           (32 rows x 32*QN columns, QN from the kernel's template arguments).

The counts are static: what one iteration of the loop body holds, not what ncu would count
executed. They are for comparing decodes and layouts before spending GPU time; speeds come
from scripts/bench.py on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# LOP3 immediates that only one width's decode uses (mma_decode.cuh: decode_pairs).
WIDTH_MASKS = {
    2: "0x30003", 3: "0x70007", 4: "0xf000f", 5: "0x1f001f", 6: "0x3f003f", 8: "0xff00ff",
}
DECODE_OPS = ("LOP3", "PRMT", "SHF", "HFMA2", "HADD2")
KERNEL_RE = re.compile(r"mma_gemm_kernelI(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)ELi(\d+)ELi(\d+)"
                       r"ELb(\d)ELi(\d+)E")


def compile_object(out_dir: str) -> str:
    """gemm_mma.cu -> out_dir/gemm_mma.cu.o, compiled by scripts/check_cuda_compile.sh (the
    project's one nvcc command line for sm_90a; NVCC picks the compiler)."""
    env = dict(os.environ, CUDA_FILES="csrc/cuda/gemm_mma.cu", OBJ_DIR=out_dir,
               PYTHON=sys.executable)
    done = subprocess.run(["bash", os.path.join(ROOT, "scripts", "check_cuda_compile.sh")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    obj = os.path.join(out_dir, "gemm_mma.cu.o")
    if done.returncode or not os.path.exists(obj):
        sys.exit(f"sass_census: compiling gemm_mma.cu failed:\n{done.stdout}{done.stderr}")
    return obj


def disassemble(obj: str) -> Dict[str, List[Tuple[int, str]]]:
    """Function name -> [(address, instruction text)] of every function in obj."""
    tool = shutil.which("cuobjdump")
    if tool is None:
        sys.exit("sass_census: cuobjdump not found")
    return parse_sass(subprocess.run([tool, "-sass", obj], check=True, capture_output=True,
                                     text=True).stdout)


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str]]]:
    """cuobjdump -sass text -> function name -> [(address, instruction text)]."""
    funcs: Dict[str, List[Tuple[int, str]]] = {}
    cur: Optional[List[Tuple[int, str]]] = None
    for line in text.splitlines():
        if "Function :" in line:
            cur = funcs.setdefault(line.split("Function :")[1].strip(), [])
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2)))
    return funcs


def opcode(text: str) -> str:
    """The opcode without predicate and modifiers: '@!P0 LOP3.LUT R1, ...' -> 'LOP3'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def width_loops(ins: List[Tuple[int, str]]) -> Dict[int, List[str]]:
    """Width -> the instruction texts of its block loop: the smallest loop (a backward branch
    and its target) that holds HMMA and exactly one width's masks."""
    index = {a: i for i, (a, _) in enumerate(ins)}
    found: Dict[int, List[str]] = {}
    for i, (a, t) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", t)
        if not m or int(m.group(1), 16) > a or int(m.group(1), 16) not in index:
            continue
        body = [s for _, s in ins[index[int(m.group(1), 16)]:i + 1]]
        if not any(opcode(s) == "HMMA" for s in body):
            continue
        joined = " ".join(body)
        widths = [b for b, mask in WIDTH_MASKS.items() if re.search(mask + r"\b", joined)]
        if len(widths) == 1 and (widths[0] not in found or len(body) < len(found[widths[0]])):
            found[widths[0]] = body
    return found


def census(funcs: Dict[str, List[Tuple[int, str]]], kernel: str = "") -> List[Dict]:
    rows = []
    for name, ins in sorted(funcs.items()):
        m = KERNEL_RE.search(name)
        if not m or kernel not in name:
            continue
        dtype = "fp16" if m.group(1) == "6__half" else "bf16"
        mt, qn, stages = int(m.group(2)), int(m.group(3)), int(m.group(4))
        weights_per_lane = 32 * 32 * qn // 32
        for bits, body in sorted(width_loops(ins).items()):
            ops = collections.Counter(opcode(s) for s in body)
            decode = sum(ops[o] for o in DECODE_OPS)
            never = sum(1 for s in body if s.startswith("@!PT "))
            rows.append({
                "kernel": f"{dtype} mt={mt} qn={qn} stages={stages}", "bits": bits,
                "static": len(body), "decode": decode, "hmma": ops["HMMA"],
                "lds": sum(1 for s in body if opcode(s) == "LDS" and not s.startswith("@!PT ")),
                "ldgsts": ops["LDGSTS"], "never": never,
                "static_per_weight": len(body) / weights_per_lane,
                "decode_per_weight": decode / weights_per_lane,
                "ops": dict(ops.most_common()),
            })
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--obj", help="a compiled gemm_mma.o (default: compile it now)")
    p.add_argument("--kernel", default="", help="substring of the mangled kernel names to keep, "
                   "e.g. 'I6__halfLi1ELi2E' for the fp16 one-token-tile kernel")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = census(disassemble(args.obj or compile_object(tmp)), args.kernel)
    if not rows:
        print("sass_census: no mma_gemm_kernel block loops found", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'kernel':<28} {'bits':>4} {'static':>6} {'decode':>6} {'hmma':>4} {'lds':>4} "
          f"{'ldgsts':>6} {'never':>5} {'static/w':>8} {'decode/w':>8}")
    for r in rows:
        print(f"{r['kernel']:<28} {r['bits']:>4} {r['static']:>6} {r['decode']:>6} "
              f"{r['hmma']:>4} {r['lds']:>4} {r['ldgsts']:>6} {r['never']:>5} "
              f"{r['static_per_weight']:>8.2f} "
              f"{r['decode_per_weight']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
