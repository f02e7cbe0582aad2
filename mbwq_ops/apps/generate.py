"""``mbwq generate`` and ``mbwq bench DIR`` for transformers models (any folder that
:func:`mbwq_ops.from_pretrained` reads: save_pretrained, save_quantized with a config.json,
GreenBitAI, GPTQ, EXL2).

    mbwq generate ./q3 --prompt "w1 w2 w3" --max-new-tokens 32 [--compile] [--cuda-graph]
    mbwq bench ./q3 [--modes eager,compile,compile+cudagraph] [--no-reference]

Execution modes, all through ``model.generate`` (greedy):

* ``eager``: transformers' dynamic KV cache, no compilation.
* ``compile``: static KV cache, the decode step compiled with ``torch.compile(fullgraph=True)``
  (a graph break would be an error).
* ``compile+cudagraph`` (CUDA only): the same, ``mode="reduce-overhead"``: inductor captures the
  decode step in a CUDA graph.

``bench`` reports decode tokens/s per mode: ``(batch * (N - 1)) / (t(N) - t(1))``, where
``t(n)`` is the wall time of a ``generate`` call making ``n`` tokens (so the prompt's prefill
cancels out), and the speed-up over the same model with every MBWQ layer dequantized to a dense
``nn.Linear`` in the activation dtype (``model.dequantize()``): fp16 on CUDA.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Dict, List

import torch

from ..checkpoint import CONFIG_NAME
from .args import DTYPES, SHORT, device_arg, positive_int

__all__ = ["MODES", "add_generate_parser", "add_bench_options", "cmd_bench", "cmd_generate", "is_transformers_dir",
           "model_dir", "generate_kwargs", "decode_speed"]

MODES = ("eager", "compile", "compile+cudagraph")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class UsageError(ValueError):  # cli.main prints "mbwq: <message>" and exits with 2
    pass


def model_dir(s: str) -> str:
    """argparse type of a model folder: this library's checkpoint or a transformers folder."""
    if not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r}: no such directory")
    if not any(os.path.isfile(os.path.join(s, f)) for f in (CONFIG_NAME, "config.json")):
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a model folder (no {CONFIG_NAME} or config.json; mbwq quantize or "
            f"save_pretrained write one)")
    return s


def is_transformers_dir(path: str) -> bool:
    """True for a folder holding a transformers model (a config.json); False for a checkpoint of
    the built-in tiny-llama, which `mbwq bench` reads with its own generator."""
    return os.path.isfile(os.path.join(path, "config.json"))


def _hf():
    try:
        from .. import hf
    except ImportError as e:
        raise UsageError(str(e)) from None
    return hf


# ============================================================================ generation
def generate_kwargs(mode: str, device: str) -> Dict:
    """``model.generate`` keyword arguments for an execution mode (see the module doc)."""
    if mode == "eager":
        return {}
    from transformers import CompileConfig
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r} (choose from {', '.join(MODES)})")
    if mode == "compile+cudagraph" and not device.startswith("cuda"):
        raise UsageError("CUDA graphs need a CUDA device (add --device cuda)")
    cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if "cudagraph" in mode else "default")
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": cc}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed_generate(model, ids, n: int, kwargs: Dict, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


def decode_speed(model, ids, new_tokens: int, mode: str, device: str, warmup: int = 2) -> Dict:
    """Decode tokens/s and ms per step of ``model`` in ``mode`` (module doc: prefill cancels)."""
    kwargs = generate_kwargs(mode, device)
    for _ in range(warmup):  # compile, record CUDA graphs, size the static cache
        _timed_generate(model, ids, new_tokens, kwargs, device)
    _, t1 = _timed_generate(model, ids, 1, kwargs, device)
    _, tn = _timed_generate(model, ids, new_tokens, kwargs, device)
    steps = max(new_tokens - 1, 1)
    dt = max(tn - t1, 1e-9) if new_tokens > 1 else tn
    return {"tokens_per_s": ids.shape[0] * steps / dt, "ms_per_step": 1e3 * dt / steps}


def _load(args, device: str, dtype):
    hf = _hf()
    return hf.from_pretrained(args.path, dtype=dtype, device=device,
                              progress=not (args.json or args.quiet))


def _defaults(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda")
                                                   else torch.bfloat16)
    return device, dtype


# ============================================================================ mbwq generate
def cmd_generate(args) -> int:
    device, dtype = _defaults(args)
    if args.cuda_graph and not device.startswith("cuda"):
        raise UsageError("--cuda-graph needs a CUDA device (add --device cuda)")
    if not any(os.path.isfile(os.path.join(args.path, f)) for f in TOKENIZER_FILES):
        raise UsageError(f"{args.path}: no tokenizer to encode --prompt (none of "
                         f"{', '.join(TOKENIZER_FILES)}; tokenizer.save_pretrained writes them)")
    _hf()
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.path)
    model = _load(args, device, dtype)
    mode = "compile+cudagraph" if args.cuda_graph else "compile" if args.compile else "eager"
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids.to(device)
    if ids.shape[1] == 0:
        raise UsageError(f"--prompt {args.prompt!r} encodes to no tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise UsageError(f"prompt ({ids.shape[1]} tokens) + --max-new-tokens "
                         f"{args.max_new_tokens} exceed the model's max_position_embeddings "
                         f"{limit}")
    kwargs = generate_kwargs(mode, device)
    out, dt = _timed_generate(model, ids, args.max_new_tokens, kwargs, device)
    new = out[0, ids.shape[1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    res = {"prompt": args.prompt, "text": text, "new_tokens": int(new.numel()), "mode": mode,
           "device": device, "dtype": SHORT[dtype], "seconds": dt,
           "tokens_per_s": new.numel() / dt}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(args.prompt + (" " if text else "") + text)
        if not args.quiet:  # the first call includes compilation: the bench measures speed
            print(f"{res['new_tokens']} tokens in {dt:.2f} s ({res['tokens_per_s']:.1f} tok/s, "
                  f"{mode}, {device}, {SHORT[dtype]}; includes warm-up and compilation)",
                  file=sys.stderr)
    return 0


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a quantized transformers model",
                       description="Greedy generation with any folder mbwq_ops.from_pretrained "
                                   "reads (save_pretrained, save_quantized with a config.json, "
                                   "GreenBitAI, GPTQ, EXL2); the folder's tokenizer encodes "
                                   "the prompt.")
    g.add_argument("path", type=model_dir, help="model folder")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens to generate (default 32)")
    g.add_argument("--compile", action="store_true",
                   help="static KV cache and torch.compile(fullgraph=True) of the decode step")
    g.add_argument("--cuda-graph", action="store_true",
                   help="--compile with CUDA graphs (mode reduce-overhead); needs CUDA")
    g.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dtype of the unquantized weights and activations (default: float16 on "
                        "CUDA, bfloat16 on CPU)")
    g.add_argument("--json", action="store_true", help="print one JSON document")
    g.add_argument("--quiet", action="store_true", help="no progress bars or timing line")
    g.set_defaults(func=cmd_generate)


# ============================================================================ mbwq bench DIR
def cmd_bench(args) -> int:
    """`mbwq bench DIR` for a transformers folder (cli.cmd_bench hands it over); reads the
    bench options --device, --dtype, --batch, --prompt-len, --new-tokens, --modes."""
    device, dtype = _defaults(args)
    on_cuda = device.startswith("cuda")
    modes = args.modes.split(",") if args.modes else (list(MODES) if on_cuda else list(MODES[:2]))
    if "cudagraph" in modes:
        raise UsageError("--modes cudagraph: a transformers model captures CUDA graphs "
                         "through torch.compile; use compile+cudagraph")
    model = _load(args, device, dtype)
    limit = getattr(model.config, "max_position_embeddings", None)
    new = args.new_tokens or (128 if on_cuda else 16)
    if not args.new_tokens and limit is not None:  # the default fits whatever model it meets
        new = max(1, min(new, limit - args.prompt_len))
    if limit is not None and args.prompt_len + new > limit:
        raise UsageError(f"--prompt-len {args.prompt_len} + --new-tokens {new} exceed the "
                         f"model's max_position_embeddings {limit}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.prompt_len),
                        generator=g).to(device)
    verbose = not (args.json or args.quiet)
    runs = _bench_modes(model, ids, new, modes, device, verbose, "quantized")
    reference = None
    if not args.no_reference:
        dense = copy.deepcopy(model).dequantize(dtype=dtype)
        del model
        reference = _bench_modes(dense, ids, new, modes, device, verbose, "dense")
        for m in modes:
            runs[m]["speedup"] = runs[m]["tokens_per_s"] / reference[m]["tokens_per_s"]
    res = {"model": args.path, "device": device, "dtype": SHORT[dtype], "batch": args.batch,
           "prompt_len": args.prompt_len, "new_tokens": new, "runs": runs,
           "dense_reference": reference}
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(_bench_text(res, modes))
    return 0


def add_bench_options(b) -> None:
    """The options `mbwq bench` has for transformers folders only."""
    b.add_argument("--no-reference", action="store_true",
                   help="with a transformers folder: skip the dense (dequantized) reference "
                        "model and the speed-up column")


def _bench_modes(model, ids, new: int, modes: List[str], device: str, verbose: bool,
                 label: str) -> Dict:
    runs = {}
    for m in modes:
        torch._dynamo.reset()
        if verbose:
            print(f"mbwq: bench {label} {m} ...", file=sys.stderr)
        runs[m] = decode_speed(model, ids, new, m, device)
    return runs


def _bench_text(res: Dict, modes: List[str]) -> str:
    ref = res["dense_reference"]
    head = (f"{res['model']} on {res['device']} ({res['dtype']}, batch {res['batch']}, prompt "
            f"{res['prompt_len']}, {res['new_tokens']} new tokens; decode tokens/s)")
    lines = [head]
    for m in modes:
        r = res["runs"][m]
        line = f"  {m:18s} {r['tokens_per_s']:10.1f} tok/s  {r['ms_per_step']:8.3f} ms/step"
        if ref is not None:
            line += (f"   dense {res['dtype']} {ref[m]['tokens_per_s']:10.1f} tok/s   "
                     f"speed-up {r['speedup']:.2f}x")
        lines.append(line)
    return "\n".join(lines)
