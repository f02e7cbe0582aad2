"""What the applications share: argument types, dtype names, device defaults and the checks
that catch a bad command line before any model is built. ``cli.py`` and ``demo.py`` both
import this module and neither imports the other's internals.

argparse calls the ``*_arg`` / ``positive_*`` functions on an option's text and turns
``ArgumentTypeError`` into "argument --x: <message>" with exit code 2.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional

import torch

from ..checkpoint import CONFIG_NAME
from ..format import BLOCK_ROWS
from .tiny_llama import Generator

MODES = Generator.MODES  # generation modes, in the order the demo runs them

DTYPES = {"float16": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_modes(device: str) -> List[str]:
    if device.startswith("cuda"):
        return ["eager", "compile", "cudagraph", "compile+cudagraph"]
    return ["eager", "compile"]


def cuda_graph_problem(modes: List[str], on_cuda: bool) -> Optional[str]:
    """Why ``modes`` cannot run here (None if they can): CUDA graphs need a CUDA device."""
    for m in modes:
        if "cudagraph" in m and not on_cuda:
            return f"--modes {m}: CUDA graphs need a CUDA device (add --device cuda)"
    return None


def length_problem(prompt_len: int, new_tokens: int, max_seq_len: int) -> Optional[str]:
    """Why prompt + new tokens do not fit (None if they do): the KV cache holds max_seq_len
    positions, and Generator would say so only after quantizing and compiling."""
    if prompt_len + new_tokens > max_seq_len:
        return (f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceed the model's "
                f"max_seq_len {max_seq_len}")
    return None


# argparse calls these on an option's text and turns ArgumentTypeError into
# "argument --x: <message>" and exit code 2, so mistakes stop before any model is built.
# (argparse also runs them on string defaults: --group-size's "128" becomes [128].)
def _int(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{s!r}: must be at least {low}")
    return v


def positive_int(s: str) -> int:
    return _int(s, 1)


def nonnegative_int(s: str) -> int:
    return _int(s, 0)


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not v > 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{s!r}: must be positive")
    return v


def _list_of(parse: Callable, s: str) -> List:
    items = s.split(",")
    try:
        return [parse(item) for item in items]
    except argparse.ArgumentTypeError as e:  # name the list too when the item is one of several
        raise argparse.ArgumentTypeError(f"{e} (in {s!r})" if len(items) > 1 else str(e)) from None


def float_list(s: str) -> List[float]:
    return _list_of(positive_float, s)


def group_size_arg(s: str) -> int:

    v = _int(s, 1)
    if v % BLOCK_ROWS:
        raise argparse.ArgumentTypeError(
            f"{s!r}: a group size must be a multiple of {BLOCK_ROWS}")
    return v


def group_sizes_arg(s: str) -> List[int]:
    return _list_of(group_size_arg, s)


def device_arg(s: str) -> str:
    """A device this machine has: cpu, cuda or cuda:N (kept as text, as the commands use it)."""
    try:
        d = torch.device(s)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device (use cpu, cuda or cuda:N)"
                                         ) from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{s!r}: CUDA is not available on this machine "
                                             f"(torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{s!r}: there are {torch.cuda.device_count()} "
                                             f"CUDA devices")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"{s!r}: mbwq has CPU and CUDA kernels only")
    return s


def modes_arg(s: str) -> str:
    for m in s.split(","):
        if m not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {m!r} (choose from "
                                             f"{', '.join(MODES)})")
    return s


def add_generation_options(p: argparse.ArgumentParser, cpu_new_tokens: int) -> None:
    """The options of token generation that `mbwq bench` and `mbwq demo` share."""
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default: float16 on CUDA, bfloat16 on CPU)")
    p.add_argument("--batch", type=positive_int, default=1,
                   help="sequences decoded together (default 1)")
    p.add_argument("--prompt-len", type=positive_int, default=16,
                   help="prompt tokens before decoding (default 16); prompt + new tokens must "
                        "fit the model's max_seq_len")
    p.add_argument("--new-tokens", type=positive_int, default=None,
                   help=f"tokens to generate per mode, at least 1 (default 128 on CUDA, "
                        f"{cpu_new_tokens} on CPU, fewer where the model's positions end)")
    p.add_argument("--modes", type=modes_arg, default=None,
                   help="comma-separated subset of eager,compile,cudagraph,compile+cudagraph "
                        "(default: all that the device supports; the CUDA-graph ones need CUDA)")


def existing_file(s: str) -> str:
    if not os.path.isfile(s):
        raise argparse.ArgumentTypeError(f"{s!r}: " + ("is a directory, not a file"
                                                       if os.path.isdir(s) else "no such file"))
    return s


def checkpoint_dir(s: str) -> str:
    if not os.path.isdir(s):
        raise argparse.ArgumentTypeError(f"{s!r}: no such directory")
    if not os.path.isfile(os.path.join(s, CONFIG_NAME)):
        raise argparse.ArgumentTypeError(f"{s!r} is not an MBWQ checkpoint (no {CONFIG_NAME}; "
                                         f"mbwq quantize writes one)")
    return s


