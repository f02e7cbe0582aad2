"""Time quantize_model on transformer blocks shaped like Llama-3-8B's.

One block = q_proj 4096x4096, k/v_proj 4096x1024, o_proj 4096x4096, gate/up 4096x14336,
down 14336x4096 (218 M weights), built by mbwq_ops.apps.tiny_llama with its seeded log-normal
per-input-channel magnitudes, in fp16 on the chosen device. Each method runs on a fresh copy of
the same model, with the same calibration tokens:

  rtn          uniform 4-bit g128, round to nearest (no calibration)
  gptq4        uniform 4-bit g128, GPTQ (act-order, damp 0.01)
  mixed3       mixed widths at 3.0 bpw, GPTQ, allocation weighed by the model's output

Prints seconds per method (calibration, measurement and quantization included; the model's
build and the copy are not) and writes one JSON record per method with --out.

    python scripts/quant_time.py                         # one 8B-shaped block on CUDA
    python scripts/quant_time.py --blocks 2 --tokens 32768
    python scripts/quant_time.py --hidden 256 --intermediate 704 --heads 4 --kv-heads 2 \\
        --device cpu --tokens 256                          # a small smoke run
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mbwq_ops.apps.tiny_llama import LlamaConfig, build  # noqa: E402
from mbwq_ops.quant import quantize_model  # noqa: E402

METHODS = {
    "rtn": dict(bits=4, bpw=None, method="rtn", calibrate=False),
    "gptq4": dict(bits=4, bpw=None, method="gptq", calibrate=True),
    "mixed3": dict(bits=None, bpw=3.0, method="gptq", calibrate=True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16384,
                    help="calibration tokens, in sequences of --seq-len")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file for the records")
    args = ap.parse_args()
    device = torch.device(args.device)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {sorted(METHODS)}")
    seq = min(args.seq_len, args.tokens)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden,
                      intermediate_size=args.intermediate, num_layers=args.blocks,
                      num_heads=args.heads, num_kv_heads=args.kv_heads, max_seq_len=seq)
    model = build(cfg, dtype=torch.float16, device=device)
    weights = sum(m.weight.numel() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and n != "lm_head")
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, cfg.vocab_size, (1, seq), generator=g).to(device)
             for _ in range(max(1, args.tokens // seq))]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.blocks} block(s), {weights / 1e6:.1f} M weights to quantize, "
          f"{len(calib) * seq} calibration tokens, {card}, torch {torch.__version__}")
    records = []
    for name in methods:
        spec = METHODS[name]
        m = copy.deepcopy(model)
        _sync(device)
        t0 = time.perf_counter()
        quantize_model(m, bpw=spec["bpw"], bits=spec["bits"], method=spec["method"],
                       calibration=calib if spec["calibrate"] else None, verbose=False)
        _sync(device)
        sec = time.perf_counter() - t0
        print(f"  {name:8s} {sec:8.2f} s  ({sec / args.blocks:.2f} s per block)")
        records.append({"kind": "quant_time", "method": name, "seconds": sec,
                        "blocks": args.blocks, "weights": weights,
                        "calibration_tokens": len(calib) * seq, "device": card,
                        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
                        "commit": os.environ.get("MBWQ_COMMIT", "unknown"),
                        "shape": {"hidden": args.hidden, "intermediate": args.intermediate,
                                  "heads": args.heads, "kv_heads": args.kv_heads}})
        del m
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
