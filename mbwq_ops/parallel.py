"""Tensor parallelism for models of MBWQ layers over ``torch.distributed``.

Every rank holds a slice of each planned linear layer; the only communication is
``torch.distributed._functional_collectives`` (``all_gather_tensor``, ``all_reduce``), which
trace into a ``torch.compile(fullgraph=True)`` graph and capture into CUDA graphs, as in
gpt-fast. NCCL carries them on GPU, gloo on CPU.

Column-parallel (q/k/v, gate/up): rank ``r`` of ``W`` keeps output columns
``[r*N/W, (r+1)*N/W)``: its columns of ``qweight``, ``scales``, ``zeros`` and ``bias``; ``q_perm``,
``q_groups`` and ``channel_scale`` are per input row and stay whole. Its output is the rank's
shard of the features, which is all the next (row-parallel) layer needs::

    x [M, K] --> rank r: MBWQLinear(K, N/W) --> y_r [M, N/W]     (no communication)

Row-parallel (o, down): the input arrives sharded, rank ``r`` holding features
``[r*K/W, (r+1)*K/W)``. MBWQ stores rows in groups and ``q_perm`` sends stored row ``k`` to input
feature ``q_perm[k]``, so a rank keeps *whole groups* and needs the features those rows read.
Two cases, chosen per layer from ``q_perm`` and the groups:

* every group reads features of one shard only (identity order with groups aligned to the
  shards, or a layer quantized with ``quantize_model(input_shards=...)``): rank ``r`` keeps the
  groups of shard ``r``, ``q_perm`` re-based to its shard, and computes on its own input::

      x_r [M, K/W] --> MBWQLinear(K/W, N) --> all_reduce(sum) --> + bias --> y [M, N]

* otherwise: rank ``r`` keeps a contiguous run of groups (balanced by packed bytes; with fewer
  groups than ranks, of 32-row blocks), gathers the full input (small at decode), selects the
  features its rows read, in its stored order, and runs them through a layer with the identity
  order::

      x_r --> all_gather --> x [M, K] --> x[:, features_r] --> MBWQLinear(K_r, N)
          --> all_reduce(sum) --> + bias --> y [M, N]

The bias is added once, after the all-reduce. Each rank's partial sum is computed in the
activation dtype, so outputs equal the unsharded layer's up to summation order (fp32
activations: fp32 rounding; fp16/bf16: one extra rounding of each partial sum), and they are
bitwise repeatable on the same world size (fixed partition, fixed collective order).

A rank's rows that are only part of a group become a group of their own with the parent
group's scales and zeros (the same weights); a uniform layer whose ranks keep whole groups stays
uniform, otherwise its slice is a mixed-mode layer of the same width.

Uneven shapes are errors naming the layer and the numbers: ``N`` of a column-parallel layer and
``K`` of a row-parallel layer must divide by the world size, attention head counts too, and a
row-parallel layer needs a 32-row block per rank. Nothing is padded.

Loading (:func:`load_sharded`) reads each rank's slices straight from a :func:`save_quantized`
folder with ``safe_open(...).get_slice``: no rank ever holds another rank's weights.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import format as fmt
from .accounting import set_module
from .checkpoint import WEIGHTS_NAME, read_config
from .layer import MBWQLinear, prepare_model

__all__ = ["TPPlan", "LLAMA_PLAN", "shard_model", "load_sharded", "RowParallel",
           "keep_rows_in_shards", "input_shards"]


# ============================================================================ plans
def shard_attention_heads(name: str, module: nn.Module, world: int) -> None:
    """Divide the head counts an attention module reads by ``world`` (in place).

    Knows two shapes: a dataclass config in ``module.cfg`` with ``num_heads``/``num_kv_heads``
    (the built-in TinyLlama; its ``hidden_size`` shrinks with the heads so that ``head_dim``
    stays), and integer attributes ``num_heads``, ``num_key_value_heads``, ``hidden_size`` on the
    module (older Hugging Face attention). Newer Hugging Face attention infers head counts from
    the projections' widths and needs nothing."""
    cfg = getattr(module, "cfg", None)
    if dataclasses.is_dataclass(cfg) and hasattr(cfg, "num_heads"):
        fields = {f.name for f in dataclasses.fields(cfg)}
        change = {k: getattr(cfg, k) for k in ("num_heads", "num_kv_heads") if k in fields}
        if "head_dim" not in fields and "hidden_size" in fields:
            change["hidden_size"] = cfg.hidden_size
        _check_divisible(name, change, world)
        module.cfg = dataclasses.replace(cfg, **{k: v // world for k, v in change.items()})
        return
    attrs = {k: getattr(module, k) for k in ("num_heads", "num_key_value_heads", "hidden_size")
             if isinstance(getattr(module, k, None), int)}
    _check_divisible(name, attrs, world)
    for k, v in attrs.items():
        setattr(module, k, v // world)


def _check_divisible(name: str, counts: Dict[str, int], world: int) -> None:
    for k, v in counts.items():
        if v % world:
            raise ValueError(f"tensor parallel: {name}: {k}={v} does not divide by the world "
                             f"size {world}")


@dataclass(frozen=True)
class TPPlan:
    """Which modules are split how, by name pattern (``fnmatch`` on the full module name, or
    an exact name). ``attention``: modules whose head counts ``shard_heads(name, module,
    world)`` divides by the world size. Unmatched modules are replicated."""

    column: Tuple[str, ...]
    row: Tuple[str, ...]
    attention: Tuple[str, ...] = ()
    shard_heads: Callable[[str, nn.Module, int], None] = shard_attention_heads

    def role(self, name: str) -> Optional[str]:
        hit = [r for r, pats in (("column", self.column), ("row", self.row))
               if any(name == p or fnmatch.fnmatchcase(name, p) for p in pats)]
        if len(hit) > 1:
            raise ValueError(f"tensor parallel: {name} matches both column and row patterns")
        return hit[0] if hit else None

    def is_attention(self, name: str) -> bool:
        return any(name == p or fnmatch.fnmatchcase(name, p) for p in self.attention)


# Llama, Qwen2, Mistral and the built-in TinyLlama share these names
# (model.layers.{i}.self_attn.q_proj, model.layers.{i}.mlp.down_proj, ...).
LLAMA_PLAN = TPPlan(column=("*.q_proj", "*.k_proj", "*.v_proj", "*.gate_proj", "*.up_proj"),
                    row=("*.o_proj", "*.down_proj"), attention=("*.self_attn",))


def input_shards(plan: TPPlan, world: int) -> Dict[str, int]:
    """``quantize_model(input_shards=...)`` for ``plan``: every row-parallel layer quantized so
    that each of its groups reads one rank's input shard (the no-gather path)."""
    return {p: world for p in plan.row}


# ============================================================================ quantizer side
def keep_rows_in_shards(plan, shards: int, name: str = "layer"):
    """A quantizer ``LayerPlan`` rearranged so that every group's rows are input features of
    one shard ``[s*K/shards, (s+1)*K/shards)`` (``quantize_model(input_shards=...)``).

    Uniform plans keep their groups; shard ``s``'s features fill stored rows
    ``[s*K/shards, ...)`` in the plan's order. Mixed plans keep each feature's width up to
    whole 32-row blocks per shard (the cumulative row count of each width is rounded to 32), so
    the budget moves by at most a block per width and shard; groups of one width appear shard by
    shard and take that width's largest group size in the plan."""
    order = plan.order.to("cpu", torch.int64)
    K = order.numel()
    if K % shards or (K // shards) % fmt.BLOCK_ROWS:
        raise ValueError(f"input_shards: {name}: in_features={K} must split into {shards} shards "
                         f"of a multiple of {fmt.BLOCK_ROWS} rows")
    S = K // shards
    shard = order // S
    if not plan.use_mbw:
        if S % plan.group_size:
            raise ValueError(f"input_shards: {name}: a uniform layer's groups of {plan.group_size} "
                             f"rows must tile each shard of {S} = {K}/{shards} input features")
        new = torch.cat([order[shard == s] for s in range(shards)])
        return dataclasses.replace(plan, order=new)
    width = torch.cat([torch.full((r,), b) for b, r in plan.groups])
    size = {}
    for b, r in plan.groups:
        size[b] = max(size.get(b, 0), r)
    runs = {}  # (width, shard) -> features, in the plan's stored order
    for s in range(shards):
        feats, wid = order[shard == s], width[shard == s]
        cum = end = 0
        for b in fmt.WIDTHS:  # rows [end, stop) of this shard get width b
            cum += int((wid == b).sum())
            blocks = (cum + fmt.BLOCK_ROWS // 2) // fmt.BLOCK_ROWS * fmt.BLOCK_ROWS
            stop = S if cum == S else min(S, max(end, blocks))
            if stop > end:
                runs[b, s] = feats[end:stop]
            end = stop
    new, groups = [], []
    for b in fmt.WIDTHS:
        for s in range(shards):
            if (b, s) in runs:
                new.append(runs[b, s])
                left = runs[b, s].numel()
                while left:
                    groups.append((b, min(size[b], left)))
                    left -= groups[-1][1]
    out = dataclasses.replace(plan, order=torch.cat(new), groups=groups, w_bit=groups[0][0])
    out.check(K)
    return out


# ============================================================================ tensor sources
@dataclass
class _Info:
    """What a layer is, before any tensor is read."""

    kind: str  # "mbwq" or "linear"
    K: int
    N: int
    bias: bool
    use_mbw: bool = False
    w_bit: int = 4
    group_size: int = 128


class _ModuleSource:
    """Stored tensors of a module in memory."""

    def __init__(self, module: nn.Module) -> None:
        self.m = module

    def read(self, key: str, index=None) -> Tensor:
        t = getattr(self.m, key)
        return (t if index is None else t[index]).detach().to("cpu").clone()

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(getattr(self.m, key).shape)


class _FileSource:
    """Stored tensors of one layer in an open safetensors file, read by slices."""

    def __init__(self, f, prefix: str, aliases: Dict[str, str]) -> None:
        self.f, self.prefix, self.aliases = f, prefix, aliases

    def _key(self, key: str) -> str:
        k = self.prefix + key
        return self.aliases.get(k, k)

    def read(self, key: str, index=None) -> Tensor:
        if index is None:
            return self.f.get_tensor(self._key(key))
        return self.f.get_slice(self._key(key))[index]

    def shape(self, key: str) -> Tuple[int, ...]:
        return tuple(self.f.get_slice(self._key(key)).get_shape())


def _info_of(module: nn.Module) -> Optional[_Info]:
    if isinstance(module, MBWQLinear):
        return _Info("mbwq", module.in_channels, module.out_channels, module.bias is not None,
                     module.use_mbw, module.w_bit, module.group_size)
    if isinstance(module, nn.Linear):
        return _Info("linear", module.in_features, module.out_features, module.bias is not None)
    return None


def _info_from_config(lc: Dict) -> _Info:
    return _Info("mbwq", lc["in_features"], lc["out_features"], lc["bias"],
                 lc["mode"] == "mixed", lc["w_bit"], lc["group_size"])


# ============================================================================ layers
class RowParallel(nn.Module):
    """A row-parallel layer: ``local`` computes this rank's partial product, the partial
    products are summed over ``group``, then the bias is added once.

    ``features`` (a buffer) is set when the rank's rows read features of other ranks' shards:
    the input is then all-gathered and these features (in the local layer's row order) are
    selected; without it the rank's own input shard is the local layer's input."""

    def __init__(self, local: nn.Module, group, features: Optional[Tensor] = None,
                 bias: Optional[Tensor] = None) -> None:
        super().__init__()
        self.local = local
        self.group = group
        self.register_buffer("features", features)
        self.register_buffer("bias", bias)

    def forward(self, x: Tensor) -> Tensor:
        from torch.distributed import _functional_collectives as funcol

        if self.features is not None:
            gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
            x = gather(x.contiguous(), gather_dim=x.dim() - 1, group=self.group)
            x = x.index_select(-1, self.features)
        y = funcol.all_reduce(self.local(x), "sum", self.group)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return "gather" if self.features is not None else "own shard"


def _even(total: int, world: int, rank: int, name: str, what: str) -> Tuple[int, int]:
    if total % world:
        raise ValueError(f"tensor parallel: {name}: {what}={total} does not divide by the world "
                         f"size {world} (pad the layer or use a world size that divides it)")
    n = total // world
    return rank * n, (rank + 1) * n


def _column(info: _Info, src, rank: int, world: int, name: str) -> nn.Module:
    c0, c1 = _even(info.N, world, rank, name, "out_features")
    if info.kind == "linear":
        layer = nn.Linear(info.K, c1 - c0, bias=info.bias)
        layer.weight = nn.Parameter(src.read("weight", slice(c0, c1)), requires_grad=False)
        if info.bias:
            layer.bias = nn.Parameter(src.read("bias", slice(c0, c1)), requires_grad=False)
        return layer
    cols = (slice(None), slice(c0, c1))
    sd = {k: src.read(k, cols) for k in ("qweight", "scales", "zeros")}
    for k in ("q_perm", "channel_scale") + (("q_groups",) if info.use_mbw else ()):
        sd[k] = src.read(k)
    if info.bias:
        sd["bias"] = src.read("bias", slice(c0, c1))
    return MBWQLinear.from_stored(sd, info.K, use_mbw=info.use_mbw, w_bit=info.w_bit,
                                  group_size=info.group_size)


def _balanced(costs: List[int], world: int) -> List[int]:
    """Bounds ``[0, b_1, ..., len(costs)]`` of ``world`` contiguous runs of units, each with at
    least one unit and about equal summed cost (the bytes a rank reads)."""
    cum = [0]
    for c in costs:
        cum.append(cum[-1] + c)
    bounds = [0]
    for r in range(1, world):
        lo, hi = bounds[-1] + 1, len(costs) - (world - r)
        target = cum[-1] * r / world
        bounds.append(min(range(lo, hi + 1), key=lambda j: (abs(cum[j] - target), j)))
    return bounds + [len(costs)]


def _block_groups(groups: List[fmt.Group]) -> List[int]:
    """The group of every 32-row block of stored rows: the group column of the kernels'
    blocks table (format.make_blocks)."""
    return fmt.make_blocks(groups)[:, 2].tolist()


def _row_blocks(groups: List[fmt.Group], features: Tensor, S: int, rank: int, world: int,
                name: str) -> Tuple[List[int], bool]:
    """The 32-row blocks of stored rows this rank keeps, and whether they read only its own
    input shard. Whole groups where possible: a rank's own shard's groups; else a contiguous
    run of groups balanced by bytes; groups are split at block edges only when there are fewer
    groups than ranks."""
    block_group = _block_groups(groups)
    owner = features.reshape(-1, fmt.BLOCK_ROWS) // S
    if bool((owner == owner[:, :1]).all()):
        return [b for b in range(len(block_group)) if int(owner[b, 0]) == rank], True
    if len(block_group) < world:
        raise ValueError(f"tensor parallel: {name}: {len(block_group)} block(s) of "
                         f"{fmt.BLOCK_ROWS} stored rows cannot be shared by {world} ranks")
    if len(groups) >= world:
        bounds = _balanced([g.packed_rows for g in groups], world)
        mine = range(bounds[rank], bounds[rank + 1])
        return [b for b, gi in enumerate(block_group) if gi in mine], False
    bounds = _balanced([groups[gi].bits for gi in block_group], world)
    return list(range(bounds[rank], bounds[rank + 1])), False


def _pieces(groups: List[fmt.Group], blocks: List[int]) -> List[Tuple[int, int, int]]:
    """``(group, first stored row, rows)`` runs of consecutive kept blocks inside one group."""
    block_group = _block_groups(groups)
    out: List[List[int]] = []
    for b in blocks:
        gi, row = block_group[b], b * fmt.BLOCK_ROWS
        if out and out[-1][0] == gi and out[-1][1] + out[-1][2] == row:
            out[-1][2] += fmt.BLOCK_ROWS
        else:
            out.append([gi, row, fmt.BLOCK_ROWS])
    return [tuple(p) for p in out]


def _runs(ranges: List[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Adjacent ``[a, b)`` ranges merged, so that each is one slice read."""
    out: List[Tuple[int, int]] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _read_rows(src, key: str, ranges: List[Tuple[int, int]]) -> Tensor:
    return torch.cat([src.read(key, slice(a, b)) for a, b in _runs(ranges)])


def _row(info: _Info, src, rank: int, world: int, group, name: str) -> nn.Module:
    k0, k1 = _even(info.K, world, rank, name, "in_features")
    bias = src.read("bias") if info.bias else None
    if info.kind == "linear":
        local = nn.Linear(k1 - k0, info.N, bias=False)
        local.weight = nn.Parameter(src.read("weight", (slice(None), slice(k0, k1))),
                                    requires_grad=False)
        return RowParallel(local, group, None, bias)
    K = info.K
    if info.use_mbw:
        groups = fmt.parse_q_groups(src.read("q_groups"), K, src.shape("qweight")[0])
    else:
        groups = fmt.uniform_groups(K, info.w_bit, info.group_size)
    q_perm = src.read("q_perm")
    try:
        fmt.perm_index(q_perm, K, info.use_mbw)
    except ValueError as e:
        raise ValueError(f"tensor parallel: {name}: {e}") from None
    features = q_perm.to(torch.int64) & 0xFFFF
    if not info.use_mbw and not bool(features.any()):  # all zeros: the identity (FORMAT.md §3)
        features = torch.arange(K)
    blocks, own_shard = _row_blocks(groups, features, k1 - k0, rank, world, name)
    pieces = _pieces(groups, blocks)
    # A piece of a group is a group of its own with the parent's scales and zeros: the same
    # weights. Whole groups of a uniform layer stay a uniform layer.
    whole = all(rows == groups[gi].rows for gi, _, rows in pieces)
    use_mbw = info.use_mbw or not whole
    packed = []
    for gi, row, rows in pieces:
        g = groups[gi]
        first = g.start + (row - g.first_row) * g.bits // 32  # 32-bit words
        packed.append((first, first + rows * g.bits // 32))
    feats = torch.cat([features[row:row + rows] for _, row, rows in pieces])
    cs = src.read("channel_scale").reshape(-1)
    sd = {"qweight": _read_rows(src, "qweight", packed),
          "scales": _read_rows(src, "scales", [(gi, gi + 1) for gi, _, _ in pieces]),
          "zeros": _read_rows(src, "zeros", [(gi, gi + 1) for gi, _, _ in pieces])}
    if own_shard:  # the rank's input shard is the local layer's input
        sd["q_perm"], sd["channel_scale"], gather = fmt.as_int16(feats - k0), cs[k0:k1], None
    else:  # gathered input, features selected in the local stored order
        sd["q_perm"], sd["channel_scale"] = fmt.as_int16(torch.arange(feats.numel())), cs[feats]
        gather = feats
    sd["channel_scale"] = sd["channel_scale"].reshape(1, 1, -1).contiguous()
    if use_mbw:
        sd["q_groups"] = fmt.q_groups_tensor(fmt.mixed_groups(
            [groups[gi].bits for gi, _, _ in pieces], [rows for _, _, rows in pieces]))
    local = MBWQLinear.from_stored(sd, feats.numel(), use_mbw=use_mbw, w_bit=info.w_bit,
                                   group_size=info.group_size)
    return RowParallel(local, group, gather, bias)


# ============================================================================ models
def _rank_world(group):
    """``(group, rank, world size)``, the default group for None."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor parallel: torch.distributed is not initialised (call "
                           "torch.distributed.init_process_group first, or run under torchrun)")
    group = dist.group.WORLD if group is None else group
    return group, dist.get_rank(group), dist.get_world_size(group)


def _shard_heads(model: nn.Module, plan: TPPlan, world: int) -> None:
    heads = [(n, m) for n, m in model.named_modules() if plan.is_attention(n)]
    for name, m in heads:  # on shallow copies first: a bad head count fails before any change
        plan.shard_heads(name, copy.copy(m), world)
    for name, m in heads:
        plan.shard_heads(name, m, world)


def _planned(model: nn.Module, plan: TPPlan) -> List[Tuple[str, str]]:
    out = [(n, plan.role(n)) for n, m in model.named_modules()
           if plan.role(n) and _info_of(m) is not None]
    if not out:
        raise ValueError("tensor parallel: the plan matches no linear layer of the model "
                         f"(column {list(plan.column)}, row {list(plan.row)}); check the names")
    return out


def shard_model(model: nn.Module, plan: TPPlan = LLAMA_PLAN, group=None) -> nn.Module:
    """Turn ``model`` (MBWQ and/or ``nn.Linear`` layers) into this rank's tensor-parallel slice
    of it, in place, and return it: planned layers become column slices or
    :class:`RowParallel` layers, attention head counts are divided, the rest stays replicated.
    ``group``: the process group (default: the world). Layers are prepared on the device their
    weights were on."""
    group, rank, world = _rank_world(group)
    new = {}
    for name, role in _planned(model, plan):  # build every slice before changing anything
        m = model.get_submodule(name)
        info, src = _info_of(m), _ModuleSource(m)
        device = next(iter(m.buffers() if info.kind == "mbwq" else m.parameters())).device
        layer = (_column(info, src, rank, world, name) if role == "column"
                 else _row(info, src, rank, world, group, name))
        new[name] = layer.to(device)
    _shard_heads(model, plan, world)
    for name, layer in new.items():
        set_module(model, name, layer)
    for layer in new.values():
        for m in layer.modules():
            if isinstance(m, MBWQLinear):
                m.prepare_params()
    return model


def load_sharded(model_skeleton_or_factory: Union[nn.Module, Callable[[], nn.Module]],
                 path: Union[str, os.PathLike], plan: TPPlan = LLAMA_PLAN, group=None,
                 device=None, strict: bool = True) -> nn.Module:
    """This rank's tensor-parallel slice of a :func:`save_quantized` checkpoint.

    Like :func:`load_quantized`, but each planned layer is built from this rank's slices of
    the file (``safe_open(...).get_slice``); other tensors (embeddings, norms, unplanned layers)
    are read whole. The skeleton's own weights for the planned layers are dropped unread."""
    from safetensors import safe_open

    group, rank, world = _rank_world(group)
    cfg = read_config(path)
    model = (model_skeleton_or_factory() if not isinstance(model_skeleton_or_factory, nn.Module)
             and callable(model_skeleton_or_factory) else model_skeleton_or_factory)
    aliases = cfg.get("aliases", {})
    layers = cfg["layers"]
    replaced = {}
    with safe_open(os.path.join(path, WEIGHTS_NAME), framework="pt", device="cpu") as f:
        for name, role in _planned(model, plan):
            m = model.get_submodule(name)
            info = _info_from_config(layers[name]) if name in layers else _info_of(m)
            if info.kind == "linear" and not isinstance(m, nn.Linear):
                raise ValueError(f"load_sharded: {name} is not an MBWQ layer in the checkpoint "
                                 f"and not an nn.Linear in the skeleton")
            src = _FileSource(f, name + ".", aliases)
            replaced[name] = (_column(info, src, rank, world, name) if role == "column"
                              else _row(info, src, rank, world, group, name))
        for name, lc in layers.items():  # unplanned MBWQ layers: whole, as load_quantized
            if name not in replaced:
                info = _info_from_config(lc)
                src = _FileSource(f, name + ".", aliases)
                keys = ("qweight", "scales", "zeros", "q_perm", "channel_scale") + (
                    ("q_groups",) if info.use_mbw else ()) + (("bias",) if info.bias else ())
                sd = {k: src.read(k) for k in keys}
                replaced[name] = MBWQLinear.from_stored(sd, info.K, use_mbw=info.use_mbw,
                                                        w_bit=info.w_bit,
                                                        group_size=info.group_size)
        prefixes = tuple(n + "." for n in replaced)
        rest = {}
        for k in list(f.keys()) + list(aliases):
            if not k.startswith(prefixes):
                rest[k] = f.get_tensor(aliases.get(k, k))
    _shard_heads(model, plan, world)
    for name, layer in replaced.items():
        set_module(model, name, layer)
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    missing = [k for k in missing if not k.startswith(prefixes)]
    if strict and (missing or unexpected):
        raise ValueError(f"load_sharded: missing keys {missing}, unexpected keys {unexpected}")
    if device is not None:
        model.to(device)
    return prepare_model(model)
