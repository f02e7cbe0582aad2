"""Quantize ``nn.Linear`` layers and whole models into the MBWQ stored format (FORMAT.md).

Vocabulary: ``W [K, N] = linear.weight.T``; a *stored row* is one input feature placed at
position ``k`` of the packed matrix (``q_perm[k]`` names the feature); a *group* is a run of
stored rows sharing one width and one fp16 ``(scale, zero)`` pair per output column.

Pipeline of one layer::

    W, H (Hessian of the layer's inputs, or none)
      -> order the input features by importance        (H_kk * |W_k|^2, most important first)
      -> cut that order into *units* of ``unit_rows`` rows (multiples of 32)
      -> give each unit a width (and group size): fixed, from a strategy, or by allocation
      -> stored order = units sorted by width 8, 6, 5, 4, 3, 2 (stable) -> q_perm
      -> RTN or GPTQ (groups visited low widths first) on per-group fp16 grids
                                                        -> codes, scales, zeros
      -> pack -> MBWQLinear

Bit budget (what :func:`bits_per_weight` counts): every stored bit of ``qweight``, ``scales``
and ``zeros`` divided by ``K * N``. A group of ``r`` rows at width ``b`` therefore costs
``N * (r * b + 32)`` bits. ``q_perm``, ``q_groups``, ``channel_scale`` and ``bias`` are per-layer
metadata and are reported separately (``bits_per_weight(..., include_metadata=True)``).

Allocation (``quantize_model(bpw=...)``): for every unit of every layer and every candidate
``(width, group size)`` the output error is *measured* on the layer's weights: for round-to-
nearest ``tr(dW^T H_uu dW)`` (``H = I`` without calibration data); for a layer GPTQ will
quantize, what GPTQ leaves of it, ``sum_k d_k |dW_k|^2`` with ``d_k = 1 / U_kk^2`` from the
Cholesky factor of ``H^-1`` (the loss of each GPTQ step; it tracks GPTQ's actual error within
tens of per cent where ``tr(dW^T H dW)`` is several times too high). With calibration data
(``objective="output"``) each layer's errors are then weighed by its *output gain*: the mean
squared change of the model's own output per unit of that layer's output error, measured by
perturbing one layer at a time on the calibration batches. A layer whose errors the rest of
the model amplifies gets more bits; one whose errors a LayerNorm or softmax absorbs, fewer.
Without an output to measure (no calibration, a callable, a non-tensor output, or
``objective="layer"``) each layer's error is divided by its output energy ``tr(W^T H W)``
instead. Choosing one candidate per unit to minimise the summed error under the total bit
budget is a multiple-choice knapsack; it is solved by a Lagrangian search over the price of a
bit followed by a greedy fill of the remaining budget.

Where the pieces live: layout.py (plans, units, costs in bits, argument checks), measure.py
(Hessians, output gains, error per candidate, the allocation), quantizers.py (the grids, RTN
and GPTQ); this file builds layers and runs the pipeline for one layer and for a model.
"""
from __future__ import annotations

import fnmatch
import sys
import warnings
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import format as fmt
from ..accounting import bits_per_weight, layer_bits, set_module  # noqa: F401 (re-exported)
from ..layer import MBWQLinear
from .quantizers import (DEFAULT_GRID, FP16_MAX, check_grid, damped_hessian, gptq, quantize_rtn,
                         quantize_to_grid)
from .layout import (  # noqa: F401 (LayerPlan, candidate_bits, cheapest_bpw re-exported)
    LayerPlan, _as_width, _assemble, _check_budget_value, _check_damp, _check_group_size,
    _check_method, _check_min_budget, _check_shared_layout, _check_widths, _group_sizes,
    _importance, _shared_units, _split, candidate_bits, cheapest_bpw)
from .measure import (  # noqa: F401 (collect_hessians re-exported; the rest for tests)
    _allocate, _few_rows_advice, _hessian_from, _measure, _measure_shared, _output_gains,
    _progress, collect_hessians, output_energy)
from .strategy import check_entry, load_strategy, strategy_entry, unmatched_entries

__all__ = [
    "quantize_linear", "quantize_model", "bits_per_weight", "layer_bits", "collect_hessians",
    "load_strategy", "strategy_from_model", "LayerPlan", "cheapest_bpw", "candidate_bits",
]

WIDTHS = fmt.WIDTHS


def _build_layer(K: int, plan: LayerPlan, codes: Tensor, scales: Tensor, zeros: Tensor,
                 bias: Optional[Tensor], device) -> MBWQLinear:
    groups = fmt.mixed_groups([b for b, _ in plan.groups], [r for _, r in plan.groups])
    qweight = fmt.pack_groups(codes, groups)
    sd = {"qweight": qweight, "scales": scales.to(torch.float16), "zeros": zeros.to(torch.float16),
          "q_perm": fmt.as_int16(plan.order), "channel_scale": torch.ones(1, 1, K, dtype=torch.float16)}
    if plan.use_mbw:
        sd["q_groups"] = fmt.q_groups_tensor(groups)
    if bias is not None:
        sd["bias"] = bias.detach().to(torch.float16)
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    layer = MBWQLinear.from_stored(sd, K, use_mbw=plan.use_mbw, group_size=plan.group_size,
                                   w_bit=plan.groups[0][0] if plan.use_mbw else plan.w_bit)
    layer.to(device)
    layer.prepare_params()
    return layer


def _check_weight_values(linear: nn.Linear, name: Optional[str] = None) -> Tensor:
    """``linear.weight`` (detached), after checking it has values and all of them are finite."""
    where = (f" of layer {name!r}" if name else
             f" of nn.Linear({linear.in_features}, {linear.out_features})")
    W = linear.weight.detach()
    if W.device.type == "meta":
        raise ValueError(f"the linear layer's weight{where} is on the meta device (no values to "
                         "quantize)")
    finite = torch.isfinite(W)
    if not bool(finite.all()):
        n_nan, n_inf = int(torch.isnan(W).sum()), int(torch.isinf(W).sum())
        o, i = (int(v) for v in (~finite).nonzero()[0])
        raise ValueError(f"the weight{where} has non-finite values ({n_nan} NaN, {n_inf} inf; "
                         f"first at weight[{o}, {i}] = {float(W[o, i])}); it cannot be quantized")
    # scales and zeros are fp16, and so is every dequantized weight (FORMAT.md)
    big = W.to(torch.float32).abs() > FP16_MAX  # (in bf16, 65504 itself rounds to 65536)
    if bool(big.any()):
        o, i = (int(v) for v in big.nonzero()[0])
        raise ValueError(f"the weight{where} has {int(big.sum())} value(s) beyond the fp16 range "
                         f"(|w| <= {FP16_MAX:g}; first at weight[{o}, {i}] = {float(W[o, i]):g}); "
                         "the stored format (fp16 scales, zeros and dequantized weights) cannot "
                         "represent it")
    return W


def _weight_of(linear: nn.Linear, name: Optional[str] = None) -> Tensor:
    """The checked weight as ``W [K, N]`` in float32."""
    return _check_weight_values(linear, name).t().to(torch.float32)


def _check_linear(linear: nn.Linear) -> Tuple[int, int]:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
    K, N = linear.in_features, linear.out_features
    fmt.check_in_features(K)
    return K, N


def quantize_with_plan(linear: nn.Linear, plan: LayerPlan, H: Optional[Tensor] = None,
                       damp: float = 0.01, grid: str = DEFAULT_GRID,
                       static_groups: bool = False, name: Optional[str] = None) -> MBWQLinear:
    """Quantize ``linear`` into the layout ``plan`` (GPTQ when ``H`` is given, else RTN) on
    ``grid`` (quantizers.GRIDS)."""
    check_grid(grid)
    K, _ = _check_linear(linear)
    plan.check(K)
    W = _weight_of(linear, name)
    order = plan.order.to(W.device)
    Ws = W[order]
    if H is not None:
        if tuple(H.shape) != (K, K):
            raise ValueError(f"the Hessian must have shape [{K}, {K}], got {tuple(H.shape)}")
        H = H.to(W.device)
        codes, scales, zeros = gptq(Ws, H[order][:, order], plan.groups, damp, grid=grid,
                                    static_groups=static_groups)
    else:
        codes, scales, zeros = quantize_rtn(Ws, plan.groups, grid)
    return _build_layer(K, plan, codes, scales, zeros, linear.bias, linear.weight.device)


def quantize_with_grids(linear: nn.Linear, bits: int, group_size: int, scales: Tensor,
                        zeros: Tensor) -> MBWQLinear:
    """A single-width layer (groups of ``group_size`` input features in input order) on grids
    chosen elsewhere -- e.g. by a peer quantizer such as HQQ -- given as ``scales``, ``zeros``
    ``[G, N]`` (rounded to fp16); codes by round-to-nearest on those grids."""
    K, N = _check_linear(linear)
    b = _as_width(bits, "bits")
    _check_group_size(group_size)
    W = _weight_of(linear)
    groups = [(b, r) for r in _split(K, group_size)]
    sc, ze = scales.to(W.device, torch.float16), zeros.to(W.device, torch.float16)
    if tuple(sc.shape) != (len(groups), N) or tuple(ze.shape) != (len(groups), N):
        raise ValueError(f"scales and zeros must have shape [{len(groups)}, {N}], got "
                         f"{tuple(scales.shape)} and {tuple(zeros.shape)}")
    codes, first = [], 0
    for g, (_, r) in enumerate(groups):
        codes.append(quantize_to_grid(W[first:first + r], sc[g], ze[g], b)[0])
        first += r
    plan = LayerPlan(torch.arange(K), groups, b not in fmt.UNIFORM_WIDTHS, b, group_size)
    return _build_layer(K, plan, torch.cat(codes), sc, ze, linear.bias, linear.weight.device)


# ============================================================================ public: one layer
def quantize_linear(linear: nn.Linear, bits: Union[int, float, Sequence[int]] = 4,
                    group_size: Union[int, Sequence[int]] = 128, *,
                    calibration: Optional[Tensor] = None, method: str = "auto",
                    act_order: bool = True, damp: float = 0.01, use_mbw: Optional[bool] = None,
                    bits_prop: Optional[Sequence[float]] = None,
                    widths: Sequence[int] = WIDTHS, unit_rows: Optional[int] = None,
                    grid: str = DEFAULT_GRID, static_groups: bool = False) -> MBWQLinear:
    """Quantize one ``nn.Linear`` (fp16/bf16/fp32 weight) into an :class:`MBWQLinear`.

    * ``bits`` int: one width for the whole layer. 4 and 2 give a uniform layer
      (``use_mbw=False``, ``group_size`` rows per group); 8, 6, 5, 3 (or ``use_mbw=True``) give a
      mixed-mode layer whose groups all have that width.
    * ``bits`` float (e.g. ``3.0``, also ``4.0``): a mixed layer within that many bits per weight
      (codes + scales + zeros), widths chosen per unit of rows from ``widths`` to minimise the
      measured error.
      ``group_size`` may then be a tuple of candidate group sizes.
    * ``bits`` list with ``bits_prop`` (green-bit-llm strategy): that share of the input features
      at each width, the most important features at the highest width; ``group_size`` may be a
      dict ``{bits: group_size}``.
    * ``calibration``: inputs of the layer (``[..., K]``) or a float64 Hessian ``[K, K]``; with it
      ``method="auto"`` runs GPTQ (``act_order`` orders features by ``H_kk``), without it RTN.
    * ``grid``: how each group's fp16 scale and zero are chosen (``"mse"``, ``"zero-point"``,
      ``"minmax"``; quantizers.py); ``static_groups``: GPTQ takes every group's grid from the
      original weights rather than the error-updated ones.
    """
    K, N = _check_linear(linear)
    _check_method(method)
    _check_damp(damp)
    check_grid(grid)
    is_list = isinstance(bits, (list, tuple))
    if bits_prop is not None and not is_list:
        raise ValueError(f"bits_prop is only used with a list of widths (bits=[4, 2], ...), got "
                         f"bits={bits!r}")
    if use_mbw is False and (is_list or isinstance(bits, float)):
        raise ValueError(f"use_mbw=False (uniform) needs an int bits of 4 or 2, got bits={bits!r}")
    W = _weight_of(linear)
    H, rows = _hessian_from(calibration, K, W.device)
    if method == "gptq" and H is None:
        raise ValueError("method='gptq' needs calibration data (layer inputs or a Hessian)")
    use_h = H if method in ("auto", "gptq") else None
    if use_h is not None and rows is not None and rows < K:
        warnings.warn(f"quantize_linear: GPTQ with {rows} calibration rows for in_features "
                      f"K={K}: {_few_rows_advice(K)}", UserWarning, stacklevel=2)

    if is_list:
        plan = plan_from_strategy(W, H, {"bits": list(bits), "bits_prop": bits_prop,
                                         "group_size": group_size})
    elif isinstance(bits, float):
        bpw = _check_budget_value(bits, "bits")
        gss = _group_sizes(group_size)
        _check_widths(widths)
        if unit_rows is not None:
            _check_group_size(unit_rows, "unit_rows")
        m = _measure(W, H, unit_rows or max(gss), widths, gss, damp, grid, use_h is not None)
        hint = ""
        if bpw == int(bpw) and int(bpw) in WIDTHS:
            hint = (f" (a float bits={bits!r} is a budget in bits per weight including scales "
                    f"and zeros; an int bits={int(bpw)} means uniform {int(bpw)}-bit)")
        _check_min_budget(float(m.cost.min(1).values.sum()) / (K * N), bpw, "bits", hint)
        choice = _allocate(m.err / m.energy, m.cost, bpw * K * N)
        plan = _assemble(m.order, m.unit_rows, [m.cands[int(c)] for c in choice])
    else:
        b = _as_width(bits, "bits")
        if not isinstance(group_size, int):
            raise ValueError(f"group_size must be an int for a single width, got {group_size!r}")
        _check_group_size(group_size)
        mbw = (b not in fmt.UNIFORM_WIDTHS) if use_mbw is None else bool(use_mbw)
        if not mbw and b not in fmt.UNIFORM_WIDTHS:
            raise ValueError(f"uniform layers (use_mbw=False) take bits 4 or 2, got {b}")
        if H is not None and act_order:
            order = torch.argsort(torch.diagonal(H), descending=True, stable=True).cpu()
        else:
            order = torch.arange(K)
        plan = LayerPlan(order, [(b, r) for r in _split(K, group_size)], mbw, b, group_size)
    return quantize_with_plan(linear, plan, use_h, damp, grid, static_groups)


# ============================================================================ strategies
# (reading a strategy file and finding a layer's entry: strategy.py)
def plan_from_strategy(W: Tensor, H: Optional[Tensor], entry: Dict) -> LayerPlan:
    """A layer plan from one green-bit-llm strategy entry
    ``{"bits": [4, 2], "bits_prop": [0.75, 0.25], "group_size": {"4": 32, "2": 32}}``.

    Feature counts per width follow green-bit-llm: every width but the last gets
    ``max(1, int(K * prop) // gs) * gs`` features, the last one the rest. The most important
    features (``H_kk * |W_k|^2``) get the highest width.

    ``bits_prop`` holds shares of the input features: each in [0, 1], summing to 1 (within
    0.01, for rounded values in strategy files)."""
    K = W.shape[0]
    raw_bits = entry["bits"]
    if not isinstance(raw_bits, (list, tuple)) or not raw_bits:
        raise ValueError(f"strategy bits must be a non-empty list of widths, got {raw_bits!r}")
    bits = [_as_width(b, "strategy width") for b in raw_bits]
    if len(set(bits)) != len(bits):
        raise ValueError(f"strategy bits {bits} name a width twice")
    check_entry(entry)  # bits_prop / group_size values: real numbers and integers, not truncated
    prop = entry.get("bits_prop")
    if prop is None:
        if len(bits) != 1:
            raise ValueError(f"strategy entry with bits {bits} needs bits_prop")
        prop = [1.0]
    if not isinstance(prop, (list, tuple)):
        raise ValueError(f"bits_prop must be a list of shares, one per width, got {prop!r}")
    prop = [float(p) for p in prop]
    if len(prop) != len(bits):
        raise ValueError(f"bits {bits} and bits_prop {prop} differ in length")
    if any(not 0.0 <= p <= 1.0 for p in prop):  # also rejects NaN
        raise ValueError(f"bits_prop entries are shares of the input features and must lie in "
                         f"[0, 1], got {prop}")
    if abs(sum(prop) - 1.0) > 0.01:
        raise ValueError(f"bits_prop {prop} sums to {sum(prop):g}; the shares of the widths "
                         f"{bits} must sum to 1")
    gs_raw = entry.get("group_size", 128)
    if isinstance(gs_raw, dict):
        missing = [b for b in bits if str(b) not in gs_raw and b not in gs_raw]
        if missing:
            raise ValueError(f"group_size {gs_raw} has no entry for width(s) {missing}")
        gs = [int(gs_raw.get(str(b), gs_raw.get(b))) for b in bits]
    elif isinstance(gs_raw, (list, tuple)):
        gs = [int(g) for g in gs_raw]
        if len(gs) != len(bits):
            raise ValueError(f"bits {bits} and group_size {gs} differ in length")
    else:
        gs = [int(gs_raw)] * len(bits)
    for g in gs:
        _check_group_size(g)
    pairs = sorted(zip(bits, prop, gs), key=lambda t: WIDTHS.index(t[0]))
    counts, used = [], 0
    for i, (b, p, g) in enumerate(pairs):
        n = K - used if i == len(pairs) - 1 else max(1, int(K * p) // g) * g
        n = max(0, min(n, K - used))
        n -= n % fmt.BLOCK_ROWS
        counts.append(n)
        used += n
    counts[-1] += K - used  # any remainder (whole blocks) goes to the last width
    order = torch.argsort(_importance(W, H), descending=True, stable=True).cpu()
    groups = []
    for (b, _, g), n in zip(pairs, counts):
        groups += [(b, r) for r in _split(n, g)]
    plan = LayerPlan(order, groups, True, groups[0][0], pairs[0][2])
    plan.check(K)
    return plan


def strategy_from_model(model: nn.Module) -> Dict:
    """A green-bit-llm style ``{"measurement": {name: {bits, bits_prop, group_size}}}`` that
    describes the MBWQ layers of ``model`` (flat keys).

    The format has one group size per width: a layer whose groups of one width are not that
    size's even split (``group_size=(32, 64, 128)`` allocations) is written with the largest,
    and a warning names it, since the strategy then gives a slightly different layout."""
    out, lossy = {}, []
    for name, m in model.named_modules():
        if isinstance(m, MBWQLinear):
            info = layer_bits(m)
            rows, gsz = info["rows_per_width"], info["group_size_per_width"]
            bits = [b for b in WIDTHS if rows.get(b)]
            out[name] = {"bits": bits,
                         "bits_prop": [rows[b] / m.in_channels for b in bits],
                         "group_size": {str(b): gsz[b] for b in bits}}
            if any([r for w, r in info["groups"] if w == b] != _split(rows[b], gsz[b])
                   for b in bits):
                lossy.append(name)
    if lossy:
        warnings.warn(f"strategy_from_model: a strategy file holds one group size per width, "
                      f"so it reproduces the layout of {len(lossy)} layer(s) only approximately "
                      f"(written with each width's largest group): "
                      f"{', '.join(lossy[:8])}" + (" ..." if len(lossy) > 8 else ""),
                      UserWarning, stacklevel=2)
    return {"measurement": out}


# ============================================================================ model level
DEFAULT_SKIP = ("lm_head",)


def _skip_patterns(skip) -> Tuple[str, ...]:
    """``skip`` as a tuple of names/patterns: a string is one pattern, None skips nothing."""
    if skip is None:
        return ()
    pats = (skip,) if isinstance(skip, str) else tuple(skip) if hasattr(skip, "__iter__") else None
    if pats is None or not all(isinstance(p, str) for p in pats):
        raise ValueError(f"skip must be a layer name/pattern or a sequence of them, got {skip!r}")
    return pats


def _matches(name: str, patterns: Iterable[str]) -> bool:
    for p in patterns:
        if name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p):
            return True
    return False


def quantize_model(model: nn.Module, bpw: Optional[float] = 3.0, calibration=None,
                   skip: Sequence[str] = DEFAULT_SKIP, group_size: Union[int, Sequence[int]] = 128,
                   *, bits: Optional[int] = None, strategy=None, widths: Sequence[int] = WIDTHS,
                   method: str = "auto", act_order: bool = True, damp: float = 0.01,
                   grid: str = DEFAULT_GRID, static_groups: bool = False,
                   objective: str = "output", verbose: bool = True,
                   input_shards: Optional[Dict[str, int]] = None,
                   shared_layout: Optional[Sequence[Sequence[str]]] = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (except names matching ``skip``; layers whose
    ``in_features`` is not a multiple of 32 are kept too, with a warning) by an
    :class:`MBWQLinear`, in place; returns ``model``.

    * ``bpw`` (default 3.0): mixed widths chosen per unit of ``group_size`` rows *and* per layer
      to minimise the summed, normalised output error of all layers under a total budget of
      ``bpw`` bits per weight (codes + scales + zeros). ``group_size`` may be a tuple of
      candidates, e.g. ``(32, 64, 128)``: units then have ``max`` rows and each picks its groups.
    * ``bits`` (4 or 2: uniform layers; 8/6/5/3: single-width mixed layers) instead of ``bpw``.
    * ``strategy``: a green-bit-llm ``quant_strategy.json`` path or dict; layers it names use its
      widths and proportions, the others fall back to ``bits``/``bpw``.
    * ``calibration``: model inputs (see :func:`collect_hessians`); with it the error is measured
      under the inputs' Hessian and layers are quantized with GPTQ (``method="auto"``).
    * ``objective``: ``"output"`` (default) weighs each layer's errors by how much of them
      reaches the model's output on the calibration batches (one extra calibration pass per
      layer); ``"layer"`` by the layer's own output energy (the only choice without an output).
    * ``grid``: the per-group fp16 grid (``"mse"``, ``"zero-point"``, ``"minmax"``; see
      quantizers.py); ``static_groups``: GPTQ grids from the original weights; ``damp``: GPTQ's
      damping, ``damp * mean(diag H)`` added to the diagonal (raise it, e.g. to 0.1, when the
      calibration has fewer tokens than a layer has inputs).
    * ``input_shards``: ``{name pattern: S}``; every group of those layers reads features of one
      of S equal input shards, so a tensor-parallel rank needs only its own input
      (:func:`mbwq_ops.parallel.keep_rows_in_shards`, :func:`mbwq_ops.parallel.input_shards`).
    * ``shared_layout``: sibling layers that read one input and should store it the same way,
      by their own names, e.g. ``[("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")]``:
      the allocation gives each such set one row order and one width per unit (weighing each
      member's errors as it would alone), so that :func:`mbwq_ops.fuse_linears` can run them
      as one GEMM. Uniform layouts (``bits``) need no help: layers of one input already share
      theirs.
    """
    _check_method(method)
    _check_damp(damp)
    check_grid(grid)
    if objective not in ("output", "layer"):
        raise ValueError(f"objective must be 'output' or 'layer', got {objective!r}")
    _check_widths(widths)
    shared = _check_shared_layout(shared_layout)
    gss = _group_sizes(group_size)
    if bpw is not None:
        bpw = _check_budget_value(bpw, "bpw")
    if bits is not None:
        if isinstance(bits, float):  # quantize_linear reads a float as a budget: never guess here
            raise ValueError(f"bits takes an int width from {WIDTHS}, got {bits!r}; for a budget "
                             f"in bits per weight use bpw={bits!r}")
        bits = _as_width(bits, "bits")
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_model needs an nn.Module, got {type(model).__name__}")
    skip = _skip_patterns(skip)
    mods = dict(model.named_modules())
    targets = []
    for name, m in mods.items():
        if isinstance(m, nn.Linear) and not isinstance(m, MBWQLinear):
            if _matches(name, skip):
                continue
            if m.in_features % fmt.BLOCK_ROWS or m.in_features > fmt.MAX_IN_FEATURES:
                warnings.warn(f"quantize_model: keeping {name} unquantized (in_features="
                              f"{m.in_features} is not a multiple of {fmt.BLOCK_ROWS}"
                              + (")" if m.in_features % fmt.BLOCK_ROWS else
                                 f", or is above {fmt.MAX_IN_FEATURES})"))
                continue
            targets.append(name)
    if not targets:
        raise ValueError("quantize_model: no nn.Linear layer to quantize")
    unused = [p for p in skip if not any(_matches(n, (p,)) for n in mods)]
    if unused and skip != DEFAULT_SKIP:  # the default is for models that have an lm_head
        warnings.warn(f"quantize_model: skip pattern(s) {unused} match no module of the model; "
                      "check the names", UserWarning, stacklevel=2)
    for name in targets:  # fail before the (slow) calibration run
        _check_weight_values(mods[name], name)
    strat = load_strategy(strategy) if strategy is not None else None
    if strat is not None:
        unknown = unmatched_entries(strat, [n for n, m in mods.items() if isinstance(m, nn.Linear)])
        if unknown:
            shown = ", ".join(repr(k) for k in unknown[:8])
            more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
            raise ValueError(f"quantize_model: the strategy names {len(unknown)} layer(s) that "
                             f"are not nn.Linear layers of the model: {shown}{more}; check the "
                             "names (the layers they were meant for would silently get the "
                             "defaults)")
    if bits is None and bpw is not None:  # arithmetic: fail before calibrating and measuring
        alloc = [n for n in targets if strat is None or strategy_entry(strat, n) is None]
        if alloc:
            shapes = [(mods[n].in_features, mods[n].out_features) for n in alloc]
            _check_min_budget(cheapest_bpw(shapes, gss, widths), bpw, "bpw",
                              " (bpw counts codes + scales + zeros per weight; bits=2 gives "
                              "uniform 2-bit layers)")
    rows: Dict[str, int] = {}
    hessians = (collect_hessians(model, targets, calibration, rows)
                if calibration is not None else {})
    if calibration is not None and not any(rows.values()):
        raise ValueError("quantize_model: the calibration ran no input rows through any layer to "
                         "quantize (an empty list or tensor, or a callable that runs nothing?)")
    for name, H in hessians.items():
        if not bool(torch.isfinite(H).all()):
            raise ValueError(f"quantize_model: the calibration inputs of {name} contain NaN/inf "
                             "values (overflow in a low-precision dtype?)")
    use_h = method in ("auto", "gptq")
    if method == "gptq" and not hessians:
        raise ValueError("method='gptq' needs calibration data")
    if use_h and hessians:
        missing = [n for n in targets if n not in hessians]
        if missing:
            warnings.warn(f"quantize_model: {len(missing)} layer(s) saw no calibration input and "
                          f"are quantized with round-to-nearest: {', '.join(missing[:8])}"
                          + (" ..." if len(missing) > 8 else ""), UserWarning, stacklevel=2)
        few = [(n, rows[n], mods[n].in_features) for n in targets
               if n in rows and rows[n] < mods[n].in_features]
        if few:
            listed = ", ".join(f"{n} ({r} rows, K={k})" for n, r, k in few[:8])
            warnings.warn(f"quantize_model: GPTQ calibration has fewer rows (tokens) than "
                          f"in_features K for {len(few)} layer(s): {listed}"
                          + (" ..." if len(few) > 8 else "") + f"; {_few_rows_advice()}",
                          UserWarning, stacklevel=2)

    plans: Dict[str, LayerPlan] = {}
    to_allocate = []
    for name in targets:
        lin = mods[name]
        entry = strategy_entry(strat, name) if strat is not None else None
        if entry is not None:
            try:
                plans[name] = plan_from_strategy(_weight_of(lin), hessians.get(name), entry)
            except ValueError as e:
                raise ValueError(f"strategy entry for {name}: {e}") from None
        elif bits is not None:
            b = bits
            gs = max(gss)
            K = lin.in_features
            H = hessians.get(name)
            order = (torch.argsort(torch.diagonal(H), descending=True, stable=True).cpu()
                     if H is not None and act_order else torch.arange(K))
            plans[name] = LayerPlan(order, [(b, r) for r in _split(K, gs)],
                                    b not in fmt.UNIFORM_WIDTHS, b, gs)
        else:
            to_allocate.append(name)

    if to_allocate:
        if bpw is None:
            raise ValueError("quantize_model: give bpw, bits or a strategy covering every layer")
        units, unused_shared = _shared_units(to_allocate, shared)
        if unused_shared:
            warnings.warn(f"quantize_model: shared_layout entries {unused_shared} match no set of "
                          "sibling layers being allocated; check the names", UserWarning,
                          stacklevel=2)
        gains = None
        if objective == "output" and hessians:
            gains = _output_gains(model, to_allocate, calibration, hessians, bpw, widths,
                                  max(gss), grid, verbose)
        measured = []
        for unit in _progress(units, verbose, "measuring"):
            Ws = [_weight_of(mods[n], n) for n in unit]
            H = hessians.get(unit[0])
            gptq_est = use_h and unit[0] in hessians
            if len(unit) == 1:
                m = _measure(Ws[0], H, max(gss), widths, gss, damp, grid, gptq_est)
                weight = gains[unit[0]] if gains is not None else 1.0 / m.energy
            else:  # one layout for layers of one input: each member weighed as it would be alone
                Hd = damped_hessian(H, damp) if H is not None else None
                ws = [gains[n] if gains is not None else 1.0 / output_energy(W, Hd)
                      for n, W in zip(unit, Ws)]
                m = _measure_shared(Ws, ws, H, max(gss), widths, gss, damp, grid, gptq_est)
                weight = 1.0
            measured.append((unit, m, weight))
        # every error in units of the model's output error (gains), or else relative to the
        # layer's output energy
        err = torch.cat([m.err * w for _, m, w in measured])
        cost = torch.cat([m.cost for _, m, _ in measured])
        weights = sum(m.K * m.N for _, m, _ in measured)
        budget = float(bpw) * weights
        choice = _allocate(err, cost, budget)
        at = 0
        for unit, m, _ in measured:
            U = len(m.unit_rows)
            plan = _assemble(m.order, m.unit_rows, [m.cands[int(c)] for c in choice[at:at + U]])
            for n in unit:
                plans[n] = plan
            at += U

    for pattern, shards in (input_shards or {}).items():
        from ..parallel import keep_rows_in_shards
        for name in targets:
            if shards > 1 and _matches(name, (pattern,)):
                plans[name] = keep_rows_in_shards(plans[name], shards, name)

    for name in _progress(targets, verbose, "quantizing"):
        lin = mods[name]
        H = hessians.pop(name, None) if use_h else None
        q = quantize_with_plan(lin, plans[name], H, damp, grid, static_groups, name)
        set_module(model, name, q)
    _record_for_transformers(model)
    return model


def _record_for_transformers(model: nn.Module) -> None:
    # A transformers model records its layout in model.config (quantization_config), so that
    # save_pretrained writes a folder from_pretrained restores. transformers is looked up, never
    # imported: a model of it means it is loaded already.
    tf = sys.modules.get("transformers")
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        from ..hf import attach
        attach(model)
