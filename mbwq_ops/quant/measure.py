"""Measuring what each layout choice costs in accuracy, and choosing: the Hessians of the
layers' inputs (calibration), the output gain of each layer (how much of its error reaches the
model's output), every unit's error per candidate width and group size, and the knapsack
allocation under the bit budget. quantize.py runs this when a budget (bpw) is given."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .layout import _importance, _split, candidate_bits
from .quantizers import DEFAULT_GRID, damped_hessian, quantize_rtn, quantize_to_grid, rtn_grid


# ============================================================================ measurement
def _hessian_from(calibration: Optional[Tensor], K: int,
                  device) -> Tuple[Optional[Tensor], Optional[int]]:
    """``(H, rows)``: the Hessian and the number of input rows it came from (``None`` when a
    Hessian was given)."""
    if calibration is None:
        return None, None
    if not isinstance(calibration, Tensor):
        raise TypeError(f"calibration must be a tensor of layer inputs [..., {K}] or a float64 "
                        f"Hessian [{K}, {K}], got {type(calibration).__name__}")
    if not bool(torch.isfinite(calibration).all()):
        raise ValueError(f"calibration has {int((~torch.isfinite(calibration)).sum())} NaN/inf "
                         "values")
    if calibration.dim() == 2 and calibration.shape[0] == K and calibration.shape[1] == K \
            and calibration.dtype == torch.float64:
        asym = float((calibration - calibration.t()).abs().max())
        if asym > 1e-6 * float(calibration.abs().max()):
            raise ValueError(f"a float64 [{K}, {K}] calibration is read as a Hessian, but this one "
                             f"is not symmetric (max |H - H^T| = {asym:.3g}); pass layer inputs in "
                             "another dtype (e.g. float32) or a symmetric Hessian")
        return calibration.to(device), None  # already a Hessian (float64 [K, K])
    if calibration.dim() == 0 or calibration.shape[-1] != K:
        last = calibration.shape[-1] if calibration.dim() else "none (a scalar)"
        raise ValueError(f"calibration's last dimension ({last}) must equal the layer's "
                         f"in_features ({K}); pass layer inputs [..., {K}] or a float64 Hessian "
                         f"[{K}, {K}], got shape {tuple(calibration.shape)}")
    x = calibration.reshape(-1, K).to(device=device, dtype=torch.float64)
    return (x.t() @ x) / max(1, x.shape[0]), x.shape[0]


def _few_rows_advice(K: Optional[int] = None) -> str:
    """Why GPTQ wants at least as many calibration rows as input features (both warnings say
    it), for one layer's K or for K in general."""
    need, example = (f"K={K}", f" (e.g. {4 * K})") if K is not None else ("K", "")
    return ("with fewer rows than K the Hessian is rank-deficient and GPTQ usually gives a worse "
            f"layer than plain round-to-nearest. Use at least {need} rows (tokens), better "
            f"several times K{example}, or method='rtn'")


@dataclass
class _Measured:
    K: int
    N: int
    order: Tensor
    unit_rows: List[int]
    cands: List[Tuple[int, int]]
    err: Tensor  # [U, C] output errors (mean over input rows), not normalised
    cost: Tensor  # [U, C] bits
    energy: float  # the layer's output energy tr(W^T H W)


def _gptq_row_weights(Hs: Tensor) -> Tensor:
    """``d_k = 1 / U_kk^2`` (``U``: upper Cholesky factor of ``H^-1``, rows in GPTQ's order): the
    output error that rounding row ``k`` by ``e`` adds once GPTQ has spread ``e`` over the
    rows after it is ``d_k |e|^2`` (the OBQ/GPTQ step's loss). The last rows, with no one left
    to absorb their error, weigh ``H_kk``-like; early ones much less."""
    K = Hs.shape[0]
    try:
        L = torch.linalg.cholesky(Hs)
    except RuntimeError:  # the same fallback as gptq()
        Hs = Hs + torch.eye(K, dtype=Hs.dtype, device=Hs.device) * float(torch.diagonal(Hs).mean())
        L = torch.linalg.cholesky(Hs)
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    return torch.diagonal(U).pow(-2)


def _measure(W: Tensor, H: Optional[Tensor], unit_rows_size: int, widths: Sequence[int],
             group_sizes: Sequence[int], damp: float = 0.01, grid: str = DEFAULT_GRID,
             gptq_estimate: bool = False) -> _Measured:
    """Output error of every candidate (width, group size) for every unit of rows.

    Round-to-nearest is measured as ``tr(dW^T H_uu dW)``; for a layer GPTQ will quantize
    (``gptq_estimate``) the error of each row is weighted by what GPTQ leaves of it,
    ``sum_k d_k |dW_k|^2`` (:func:`_gptq_row_weights`, rows in importance order), since GPTQ
    removes most of what a plain ``H`` weighting would count."""
    K, N = W.shape
    if H is not None:  # the same damping as GPTQ: a few calibration tokens must not mislead
        H = damped_hessian(H, damp)
    order = torch.argsort(_importance(W, H), descending=True, stable=True)
    unit_rows = _split(K, unit_rows_size)
    Ws = W[order]
    Hs = H[order][:, order].to(torch.float32) if H is not None else None
    d = (_gptq_row_weights(H[order][:, order]).to(torch.float32)
         if H is not None and gptq_estimate else None)
    cands = [(b, gs) for b in widths for gs in group_sizes]
    err = torch.empty(len(unit_rows), len(cands), dtype=torch.float64)
    cost = torch.empty_like(err)
    # Units of equal size are measured together ([U, rows, N] batches).
    first = 0
    spans: Dict[int, List[Tuple[int, int]]] = {}
    for u, r in enumerate(unit_rows):
        spans.setdefault(r, []).append((u, first))
        first += r
    for r, items in spans.items():
        idx = torch.tensor([u for u, _ in items])
        w = torch.stack([Ws[f:f + r] for _, f in items])  # [U, r, N]
        Hu = (torch.stack([Hs[f:f + r, f:f + r] for _, f in items]) if Hs is not None else None)
        du = torch.stack([d[f:f + r] for _, f in items]) if d is not None else None
        hu = torch.diagonal(Hu, dim1=1, dim2=2) if Hu is not None else None  # [U, r]
        for c, (b, gs) in enumerate(cands):
            n_groups = -(-r // gs)
            pad = n_groups * gs - r
            wg = w if pad == 0 else torch.cat([w, w[:, -1:].expand(-1, pad, -1)], 1)
            wg = wg.reshape(len(items), n_groups, gs, N)
            hg = None
            if hu is not None:
                hg = hu if pad == 0 else torch.cat([hu, hu[:, -1:].expand(-1, pad)], 1)
                hg = hg.reshape(len(items), n_groups, gs)
            sc, ze = rtn_grid(wg, b, grid, hg)
            _, deq = quantize_to_grid(wg, sc[:, :, None], ze[:, :, None], b)
            dW = (deq - wg.to(torch.float64)).to(torch.float32).reshape(len(items), -1, N)[:, :r]
            if du is not None:
                e = (dW.pow(2).sum(2) * du).sum(1)
            elif Hu is not None:
                e = (dW * (Hu @ dW)).sum((1, 2))
            else:
                e = dW.pow(2).sum((1, 2))
            err[idx, c] = e.to("cpu", torch.float64)
            cost[idx, c] = float(candidate_bits(r, N, b, gs))
    return _Measured(K, N, order.cpu(), unit_rows, cands, err, cost, output_energy(W, H))


def output_energy(W: Tensor, H: Optional[Tensor]) -> float:
    """``tr(W^T H W)`` (``|W|^2`` without ``H``): the layer's mean squared output, the unit
    its errors are measured in when the model's output is not (``objective="layer"``)."""
    energy = float((W * (H.to(torch.float32) @ W)).sum()) if H is not None else float(W.pow(2).sum())
    return max(energy, 1e-30)


def _measure_shared(Ws: Sequence[Tensor], weights: Sequence[float], H: Optional[Tensor],
                    unit_rows_size: int, widths: Sequence[int], group_sizes: Sequence[int],
                    damp: float, grid: str, gptq_estimate: bool) -> _Measured:
    """:func:`_measure` for layers that read one input and get one layout (``shared_layout``):
    the layers side by side, layer ``i``'s columns scaled by ``sqrt(weights[i])``. Every error
    measured is a sum over columns and the grids are per column, so the result's error of a
    candidate is ``sum_i weights[i] * err_i``: each layer weighed as the allocation weighs it
    alone, in one shared row order and one choice per unit. Energy 1: the weights already
    normalise."""
    W = torch.cat([w * float(c) ** 0.5 for w, c in zip(Ws, weights)], dim=1)
    m = _measure(W, H, unit_rows_size, widths, group_sizes, damp, grid, gptq_estimate)
    m.energy = 1.0
    return m


def _allocate(err: Tensor, cost: Tensor, budget: float) -> Tensor:
    """Multiple-choice knapsack: one candidate per row of ``err``/``cost`` minimising the summed
    error with summed cost <= budget. Lagrangian bisection, then a greedy fill."""
    U = err.shape[0]
    rows = torch.arange(U)
    min_cost = float(cost.min(1).values.sum())
    if budget < min_cost - 1e-6:
        raise ValueError(f"the bit budget is below the cheapest layout ({min_cost / 1:.0f} bits "
                         f"needed, {budget:.0f} allowed)")

    def pick(lam: float) -> Tensor:
        score = err + lam * cost
        # ties: the cheaper candidate
        best = score.min(1, keepdim=True).values
        tie = score <= best + 1e-18
        return torch.where(tie, cost, torch.full_like(cost, float("inf"))).argmin(1)

    choice = pick(0.0)
    if float(cost[rows, choice].sum()) > budget:
        lo, hi = 0.0, 1.0
        while float(cost[rows, pick(hi)].sum()) > budget:
            hi *= 4.0
            if hi > 1e30:
                break
        for _ in range(100):
            mid = (lo + hi) / 2
            if float(cost[rows, pick(mid)].sum()) > budget:
                lo = mid
            else:
                hi = mid
        choice = pick(hi)
    # greedy fill: best error decrease per extra bit that still fits
    spent = float(cost[rows, choice].sum())
    while True:
        cur_e = err[rows, choice].unsqueeze(1)
        cur_c = cost[rows, choice].unsqueeze(1)
        de = cur_e - err  # gain
        dc = cost - cur_c
        ok = (de > 0) & (dc <= budget - spent + 1e-6)
        if not bool(ok.any()):
            break
        ratio = torch.where(ok, de / dc.clamp_min(1e-9), torch.full_like(de, -1.0))
        ratio = torch.where(ok & (dc <= 0), torch.full_like(de, float("inf")), ratio)
        flat = int(ratio.argmax())
        u, c = divmod(flat, err.shape[1])
        spent += float(dc[u, c])
        choice[u] = c
    return choice


def _run_calibration(model: nn.Module, calibration) -> List:
    """Run ``model`` on every calibration batch; returns what each call returned."""
    with torch.no_grad():
        if callable(calibration) and not isinstance(calibration, (Tensor, nn.Module)):
            return [calibration(model)]
        items = [calibration] if isinstance(calibration, (Tensor, dict)) else list(calibration)
        outs = []
        for item in items:
            if isinstance(item, dict):
                outs.append(model(**item))
            elif isinstance(item, (tuple, list)):
                outs.append(model(*item))
            else:
                outs.append(model(item))
        return outs


def _output_tensor(out) -> Optional[Tensor]:
    """The tensor a model output stands for: itself, ``logits`` (Hugging Face outputs), else the
    first tensor of a tuple, list or dict; None when there is none."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor):
                return o
    return None


def _model_outputs(model: nn.Module, calibration) -> Optional[List[Tensor]]:
    outs = [_output_tensor(o) for o in _run_calibration(model, calibration)]
    if not outs or any(o is None or not o.is_floating_point() for o in outs):
        return None
    return [o.detach().to(torch.float64) for o in outs]


def _output_gains(model: nn.Module, names: Sequence[str], calibration,
                  hessians: Dict[str, Tensor], bpw: float, widths: Sequence[int],
                  group_size: int, grid: str, verbose: bool) -> Optional[Dict[str, float]]:
    """How much of a layer's output error reaches the model's output, per layer: ``D / E`` with
    ``E = tr(dW^T H dW)`` the layer's mean squared output error under a round-to-nearest
    perturbation ``dW`` (the width nearest the budget) and ``D`` the mean squared change of the
    model's output on the calibration batches with only that layer perturbed. One calibration
    pass per layer. None when the model's output is not a float tensor (or a dict/tuple holding
    ``logits`` or one first): then layers are weighed by their own output energy instead."""
    ref = _model_outputs(model, calibration)
    if ref is None:
        return None
    rows = sum(o.numel() // max(1, o.shape[-1]) if o.dim() else 1 for o in ref)
    b = min(widths, key=lambda w: (abs(w + 32 / group_size - bpw), w))
    mods = dict(model.named_modules())
    gains = {}
    for name in _progress(names, verbose, "output gains"):
        lin = mods[name]
        H = hessians.get(name)
        if H is None:
            continue
        W = lin.weight.detach().t().to(torch.float32)
        K = W.shape[0]
        groups = [(b, r) for r in _split(K, group_size)]
        codes, sc, ze = quantize_rtn(W, groups, grid)
        gid = torch.cat([torch.full((r,), g, device=W.device) for g, (_, r) in enumerate(groups)])
        deq = codes.to(torch.float64) * sc.double()[gid] - ze.double()[gid]
        dW = deq - W.double()
        E = float((dW * (H.to(W.device, torch.float64) @ dW)).sum())
        saved = lin.weight.detach().clone()
        try:
            with torch.no_grad():
                lin.weight.copy_(deq.t().to(lin.weight.dtype))
            out = _model_outputs(model, calibration)
        finally:
            with torch.no_grad():
                lin.weight.copy_(saved)
        if out is None or E <= 0:
            continue
        D = sum(float((o - r).pow(2).sum()) for o, r in zip(out, ref)) / rows
        gains[name] = D / E
    if not gains:
        return None
    low = min(gains.values())
    return {n: gains.get(n, low) for n in names}


def collect_hessians(model: nn.Module, names: Sequence[str], calibration,
                     rows: Optional[Dict[str, int]] = None) -> Dict[str, Tensor]:
    """``H = mean(x x^T)`` (float64 ``[K, K]``) of the inputs of each named ``nn.Linear``, from
    running ``model`` on ``calibration`` (a tensor, a list of batches -- dicts are passed as
    keyword arguments, tuples as positional ones -- or a callable ``f(model)``). A dict passed
    as ``rows`` receives the number of input rows (tokens) each layer saw."""
    if isinstance(names, str):
        names = [names]
    mods = dict(model.named_modules())
    H: Dict[str, Tensor] = {}
    count: Dict[str, int] = {}
    hooks = []

    def make(name):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, mod.in_features).to(torch.float64)
            if name not in H:
                H[name] = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64,
                                      device=x.device)
                count[name] = 0
            H[name] += x.t() @ x
            count[name] += x.shape[0]
        return hook

    for n in names:
        if not isinstance(mods.get(n), nn.Linear):
            raise ValueError(f"collect_hessians: {n!r} is not an nn.Linear of the model"
                             + (f" (it is a {type(mods[n]).__name__})" if n in mods else ""))
    for n in names:
        hooks.append(mods[n].register_forward_pre_hook(make(n)))
    try:
        _run_calibration(model, calibration)
    finally:
        for h in hooks:
            h.remove()
    if rows is not None:
        rows.update(count)
    return {n: H[n] / max(1, count[n]) for n in H}


def _progress(it, verbose: bool, desc: str, total: Optional[int] = None):
    if not verbose:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, unit="layer")
