"""Greedy generation of a saved TinyLlama on N tensor-parallel ranks.

    torchrun --nproc-per-node 2 -m mbwq_ops.apps.tp_generate CHECKPOINT [--mode compile]

Every rank loads only its slices of the checkpoint (:func:`mbwq_ops.parallel.load_sharded`)
and runs the same decode loop; rank 0 prints the tokens and the decode speed. gloo carries the
collectives on CPU, NCCL on CUDA (one GPU per rank, ``cuda:LOCAL_RANK``). Without torchrun it
runs as a single rank. Exit code 2 with one ``mbwq: ...`` line for bad input, as ``mbwq``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .. import parallel
from .args import DTYPES, MODES, cuda_graph_problem, length_problem, nonnegative_int, positive_int
from .cli import USER_ERRORS, UsageError, skeleton_from_metadata
from .tiny_llama import Generator


def _parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tp_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="checkpoint directory written by mbwq quantize / save_quantized "
                                "(a tiny-llama model)")
    p.add_argument("--mode", choices=MODES, default="eager", help="decode step: eager, "
                   "torch.compile(fullgraph=True), CUDA graph or both (default eager)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="cpu (gloo) or cuda (NCCL, GPU = LOCAL_RANK); default cuda if present")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="activation dtype (default fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--prompt-len", type=positive_int, default=8)
    p.add_argument("--new-tokens", type=positive_int, default=16)
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the random prompt")
    p.add_argument("--json", action="store_true", help="print the result as JSON (rank 0)")
    return p.parse_args(argv)


def _single_rank_env() -> None:
    """Without torchrun: a world of one on a free loopback port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def run(args: argparse.Namespace) -> Dict:
    """Load this rank's slice, generate; the result (tokens, timing) is the same on every rank."""
    from ..checkpoint import read_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device")
    problem = cuda_graph_problem([args.mode], device == "cuda")
    if problem:
        raise UsageError(problem)
    meta = read_config(args.path).get("metadata", {}).get("model", {})
    if meta.get("kind") != "tiny-llama":
        raise UsageError(f"{args.path}: tp_generate runs tiny-llama checkpoints, this one holds "
                         f"{meta.get('kind')!r}")
    problem = length_problem(args.prompt_len, args.new_tokens, meta["config"]["max_seq_len"])
    if problem:
        raise UsageError(problem)
    if device == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device == "cuda"
                                                   else torch.float32)
    model = parallel.load_sharded(skeleton_from_metadata(meta), args.path, device=dev)
    model.to(dtype).eval()
    cfg = model.config
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g)
    gen = Generator(model, batch_size=args.batch, mode=args.mode)
    gen.warmup(prompt)
    out = gen.generate(prompt, args.new_tokens)
    return {"world_size": dist.get_world_size(), "device": str(dev), "mode": args.mode,
            "dtype": str(dtype).replace("torch.", ""), "tokens": out["tokens"].tolist(),
            "ms_per_step": out["ms_per_step"], "tokens_per_s": out["tokens_per_s"]}


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse(argv)
    _single_rank_env()
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    dist.init_process_group("nccl" if use_cuda and torch.cuda.is_available() else "gloo")
    try:
        res = run(args)
    except USER_ERRORS as e:
        if dist.get_rank() == 0:
            print(f"mbwq: {e}", file=sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()
    if res and int(os.environ["RANK"]) == 0:
        if args.json:
            print(json.dumps(res))
        else:
            print(f"{res['world_size']} rank(s), {res['device']}, {res['mode']}, {res['dtype']}: "
                  f"{res['ms_per_step']:.2f} ms/step, {res['tokens_per_s']:.1f} tokens/s")
            for row in res["tokens"]:
                print(" ".join(map(str, row)))
    return 0


def exit_now(code: int) -> None:
    """Flush the output and end the process without interpreter finalization. gloo's worker
    threads may still be releasing a finished collective's output, which takes the GIL; a
    thread that asks for the GIL while the interpreter finalizes dies inside a C++ destructor
    and the process aborts ("terminate called without an active exception", torch 2.13, a few
    runs in a hundred). No barrier closes that window: the thread can be descheduled past any
    of them. Everything this program writes is on stdout / stderr, flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
