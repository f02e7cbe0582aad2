"""End-to-end demo: quantize the built-in Llama-style model and generate with it.

    python -m mbwq_ops demo            # or: mbwq demo
    python -m mbwq_ops demo --help

Builds a seeded :class:`~mbwq_ops.apps.tiny_llama.TinyLlama` (no download; ``--preset cuda`` is a
~0.9 B-parameter model, ``cpu`` ~16 M, ``tiny`` a CI-sized one), quantizes copies of it to
~3 bits per weight (mixed widths, allocated to minimise the measured error) and to uniform
4-bit, and greedily generates tokens with each in every mode that the device supports
(eager, ``torch.compile``, and on CUDA CUDA graphs). It prints tokens/s, bits per weight, memory
and the error of each quantized model against the unquantized one.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Dict, List, Optional

import torch

from .. import quant as Q
from ..accounting import bits_per_weight, layer_bits
from . import tiny_llama as TL
from .args import (DTYPES, SHORT, add_generation_options, cuda_graph_problem, default_device,
                   default_modes, group_size_arg, length_problem, positive_float, positive_int)

def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of every persistent tensor (parameters and buffers, tied ones once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights that quantization replaces (nn.Linear weights / MBWQ stored tensors)."""
    from ..layer import MBWQLinear
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, MBWQLinear):
            total += layer_bits(m)["bytes"]
        elif isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            total += m.weight.numel() * m.weight.element_size()
    return total


@torch.no_grad()
def output_error(model, ref_logits: torch.Tensor, tokens: torch.Tensor) -> Dict[str, float]:
    """Relative logit error and next-token (top-1) agreement against the reference."""
    model.drop_cache()
    logits = model(tokens).float()
    ref = ref_logits.float().to(logits.device)
    rel = float((logits - ref).norm() / ref.norm())
    agree = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"logit_rel_err": rel, "top1_agreement": agree}


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mbwq demo",
        description="Quantize the built-in Llama-style model to ~3 bpw (mixed) and 4-bit, then "
                    "generate with eager / torch.compile / CUDA graphs and compare with the "
                    "unquantized model.")
    p.add_argument("--preset", choices=sorted(TL.PRESETS), default=None,
                   help="model size (default: 'cuda' on a GPU, 'cpu' otherwise)")
    p.add_argument("--bpw", type=positive_float, default=3.0,
                   help="budget of the mixed model (default 3.0)")
    p.add_argument("--group-size", type=group_size_arg, default=128,
                   help="rows per group, a multiple of 32 (default 128)")
    add_generation_options(p, cpu_new_tokens=24)
    p.add_argument("--calibrate", action="store_true",
                   help="use GPTQ with random-token calibration instead of round-to-nearest "
                        "(the demo's model has random weights, so expect no gain: GPTQ pays "
                        "off on trained models with real inputs)")
    p.add_argument("--no-fuse", action="store_true",
                   help="keep q/k/v and gate/up as separate layers (default: each model runs "
                        "them as one GEMM per set; the mixed model is quantized with one "
                        "layout per set so that it can)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    args = p.parse_args(argv)
    problem = _check(args)
    if problem:
        p.error(problem)
    return args


def _check(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with ``args`` (None if nothing), found before the model is built."""
    device = args.device or default_device()
    on_cuda = device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        return "--device cuda but CUDA is not available"
    modes = args.modes.split(",") if args.modes else []
    for m in modes:
        if m not in TL.Generator.MODES:
            return f"unknown mode {m!r} (choose from {TL.Generator.MODES})"
    preset = args.preset or ("cuda" if on_cuda else "cpu")
    new_tokens = args.new_tokens or (128 if on_cuda else 24)
    return (cuda_graph_problem(modes, on_cuda)
            or length_problem(args.prompt_len, new_tokens, TL.PRESETS[preset].max_seq_len))


def run(args: argparse.Namespace) -> Dict:
    """Run the demo; returns the results as a dict (what ``--json`` prints)."""
    problem = _check(args)  # again, for callers that build args themselves
    if problem:
        raise SystemExit(f"mbwq demo: {problem}")
    device = args.device or default_device()
    on_cuda = device.startswith("cuda")
    preset = args.preset or ("cuda" if on_cuda else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.bfloat16)
    new_tokens = args.new_tokens or (128 if on_cuda else 24)
    modes = args.modes.split(",") if args.modes else default_modes(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    verbose = not args.quiet and not args.json

    def log(msg: str) -> None:
        if verbose:
            print(msg, file=sys.stderr, flush=True)

    cfg = TL.PRESETS[preset]
    t0 = time.perf_counter()
    base = TL.build(cfg, dtype=torch.float32, device="cpu")
    n_params = sum(p.numel() for p in base.parameters())
    log(f"model: TinyLlama preset '{preset}' ({n_params / 1e6:.1f} M parameters, "
        f"{cfg.num_layers} layers, hidden {cfg.hidden_size}), device {device}, {SHORT[dtype]}")
    gen = torch.Generator().manual_seed(1234)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=gen)
    eval_tokens = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.max_seq_len)), generator=gen)
    calib = None
    if args.calibrate:
        # at least as many tokens as the widest layer input (GPTQ's Hessian is rank-deficient
        # with fewer): batches of 4 sequences
        T = min(64, cfg.max_seq_len)
        widest = max(cfg.hidden_size, cfg.intermediate_size)
        calib = [torch.randint(0, cfg.vocab_size, (4, T), generator=gen)
                 for _ in range(-(-widest // (4 * T)))]

    variants = [("unquantized", None), (f"mbwq mixed {args.bpw:g} bpw", "mixed"),
                (f"mbwq uniform 4-bit g{args.group_size}", "uniform4")]
    results = {"device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
               "torch": torch.__version__, "preset": preset, "config": cfg.to_dict(),
               "parameters": n_params, "dtype": SHORT[dtype], "batch": args.batch,
               "prompt_len": args.prompt_len, "new_tokens": new_tokens, "modes": modes,
               "variants": []}
    ref_logits = ref_tokens = None
    for label, kind in variants:
        model = copy.deepcopy(base)
        qtime = 0.0
        if kind is not None:
            log(f"quantizing: {label}")
            t = time.perf_counter()
            model.to(device)
            cal = [c.to(device) for c in calib] if calib is not None else None
            if kind == "mixed":
                Q.quantize_model(model, bpw=args.bpw, group_size=args.group_size,
                                 calibration=cal, verbose=verbose,
                                 shared_layout=None if args.no_fuse else TL.SHARED_LAYOUT)
            else:
                Q.quantize_model(model, bits=4, group_size=args.group_size, calibration=cal,
                                 verbose=verbose)
            qtime = time.perf_counter() - t
        model.to(device=device, dtype=dtype).eval()
        fused = None if args.no_fuse else TL.fuse_projections(model)
        with torch.no_grad():
            logits = model(eval_tokens.to(device)).float().cpu()
        entry = {"name": label, "quantize_seconds": qtime,
                 "bpw": bits_per_weight(model) if kind else 16.0 if dtype != torch.float32 else 32.0,
                 "model_bytes": model_bytes(model), "linear_bytes": linear_weight_bytes(model),
                 "fused_sets": fused, "runs": {}}
        if kind is None:
            ref_logits = logits
        else:
            entry.update(output_error(model, ref_logits, eval_tokens.to(device)))
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for mode in modes:
            log(f"  {label}: {mode} ...")
            torch._dynamo.reset()  # a fresh compilation per model and mode
            t = time.perf_counter()
            g = TL.Generator(model, args.batch, mode)
            g.warmup(prompt)
            warm = time.perf_counter() - t
            r = g.generate(prompt, new_tokens)
            run_ = {"tokens_per_s": r["tokens_per_s"], "ms_per_step": r["ms_per_step"],
                    "warmup_seconds": warm}
            toks = r["tokens"]
            if kind is None and ref_tokens is None:
                ref_tokens = toks
            run_["tokens_match_unquantized"] = float((toks == ref_tokens).float().mean())
            first = entry["runs"].get(modes[0])
            run_["tokens_match_" + modes[0]] = (float((toks == first["_tokens"]).float().mean())
                                               if first else 1.0)
            run_["_tokens"] = toks
            entry["runs"][mode] = run_
            del g
        if on_cuda:
            entry["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        for r_ in entry["runs"].values():
            r_.pop("_tokens")
        if modes:
            entry["sample_tokens"] = ref_tokens[0, :12].tolist() if kind is None else toks[0, :12].tolist()
        results["variants"].append(entry)
        del model
        if on_cuda:
            torch.cuda.empty_cache()
    results["seconds"] = time.perf_counter() - t0
    return results


def format_results(res: Dict) -> str:
    modes = res["modes"]
    lines = [f"MBWQ demo -- TinyLlama '{res['preset']}' ({res['parameters'] / 1e6:.1f} M params), "
             f"device {res['device']}, {res['dtype']} activations, batch {res['batch']}, "
             f"{res['new_tokens']} new tokens, torch {res['torch']}", ""]
    head = ["model", "bpw", "linear MB", "model MB"] + [f"{m} tok/s" for m in modes] + \
           ["logit err", "top-1 agree"]
    rows = []
    base = res["variants"][0]
    for v in res["variants"]:
        row = [v["name"], f"{v['bpw']:.2f}", f"{v['linear_bytes'] / 1e6:.1f}",
               f"{v['model_bytes'] / 1e6:.1f}"]
        for m in modes:
            r = v["runs"][m]
            sp = r["tokens_per_s"] / base["runs"][m]["tokens_per_s"]
            row.append(f"{r['tokens_per_s']:.1f} ({sp:.2f}x)")
        row += [f"{v['logit_rel_err']:.4f}" if "logit_rel_err" in v else "-",
                f"{100 * v['top1_agreement']:.1f}%" if "top1_agreement" in v else "-"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt_row = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))  # noqa: E731
    lines.append(fmt_row(head))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt_row(r) for r in rows]
    lines.append("")
    lines.append("tok/s: decode steps only (prefill and compilation excluded), speed-up vs the "
                 "unquantized model in the same mode in brackets.")
    lines.append("logit err: ||logits - logits_ref|| / ||logits_ref|| on 2x64 fixed tokens; top-1 "
                 "agree: next-token argmax equal to the unquantized model's.")
    for v in res["variants"]:
        extra = []
        if "peak_cuda_bytes" in v:
            extra.append(f"peak CUDA memory {v['peak_cuda_bytes'] / 2**20:.0f} MiB")
        if v["quantize_seconds"]:
            extra.append(f"quantized in {v['quantize_seconds']:.1f} s")
        if v.get("fused_sets"):
            f = v["fused_sets"]
            extra.append(f"{f['fused']} of {f['fused'] + f['kept']} q/k/v and gate/up sets run "
                         f"as one GEMM")
        for m in modes[1:]:
            agree = v["runs"][m]["tokens_match_" + modes[0]]
            if agree < 1.0:  # low-precision rounding differs between fused and eager kernels;
                # greedy decoding of a random model turns one flipped near-tie into a new text
                extra.append(f"{m} generated the same tokens as {modes[0]} for "
                             f"{100 * agree:.0f}% of positions")
        agree_fp = v["runs"][modes[0]]["tokens_match_unquantized"]
        if v is not res["variants"][0]:
            extra.append(f"{modes[0]} tokens equal to the unquantized model's: {100 * agree_fp:.0f}%")
        warm = ", ".join(f"{m} {v['runs'][m]['warmup_seconds']:.1f}s" for m in modes)
        extra.append(f"warm-up {warm}")
        lines.append(f"{v['name']}: " + "; ".join(extra))
    lines.append(f"total {res['seconds']:.1f} s")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    res = run(args)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(format_results(res))
    return 0
