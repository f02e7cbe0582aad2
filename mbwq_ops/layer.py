"""MBWQLinear: a drop-in for bitorch-engine's ``MBWQLinearCuda``.

Same constructor arguments and defaults, same buffers (names, dtypes, shapes), same methods.
Differences, all deliberate:

* ``prepare_params()`` validates the layer and builds the kernels' tables as non-persistent
  buffers; it deletes nothing, so ``state_dict()`` always returns the stored format.
* ``forward`` keeps the input's leading dimensions (``[M, K] -> [M, N]``, the original gave
  ``[1, M, N]``), accepts fp16 and bf16 activations (fp32 on CPU too) and never syncs the host.
* Malformed layers raise ``ValueError`` naming the field instead of decoding garbage.
* ``.to(dtype)`` / ``.bfloat16()`` leave the stored fp16 tensors alone (they are part of the
  format); activations choose the compute dtype.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from . import format as fmt
from . import ops

# Buffers of the original that carry no weight information (FORMAT.md §2.2): accepted in a
# state_dict and dropped.
LEGACY_KEYS = ("g_idx", "wf", "qstatistic", "qzeros_zeros", "qzeros_scales", "qscales_zeros",
               "qscales_scales", "privileged_grad")
# Stored tensors whose checkpoint shape replaces the buffer's, as the original does.
RESHAPEABLE_KEYS = ("qweight", "scales", "zeros", "q_perm", "q_groups")
# Stored tensors the kernel tables are derived from or validated against: an in-place change
# after prepare_params() (seen through the tensors' version counters) makes forward refuse to
# run until the layer is prepared again.
TABLE_SOURCES = ("qweight", "scales", "zeros", "q_perm", "q_groups")
STORED_DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.float16,
                 "q_perm": torch.int16, "q_groups": torch.int16, "channel_scale": torch.float16,
                 "bias": torch.float16}


class MBWQLinear(nn.Module):
    """Mixed-bit-width quantized linear layer, ``y = (x * channel_scale) @ W (+ bias)``.

    Arguments as in the original. Only these change the layer: ``in_channels``, ``out_channels``,
    ``w_bit`` and ``group_size`` (uniform mode), ``disable_bias``, ``use_mbw``, ``groups`` and
    ``rows_packed`` (initial buffer shapes in mixed mode; a checkpoint's shapes replace them).
    ``a_bit`` must be 16, ``dtype`` float16, ``use_gba_quant`` True and ``asym`` False (the only
    configuration of the original that works); ``dq_group_size``, ``dq_mode`` and
    ``requires_grad`` are accepted for compatibility and have no effect here.
    """

    def __init__(self, in_channels: int, out_channels: int, a_bit: int = 16, w_bit: int = 4,
                 dtype: torch.dtype = torch.half, group_size: int = -1, use_gba_quant: bool = True,
                 dq_group_size: int = -1, dq_mode: int = 2, disable_bias: bool = True,
                 asym: bool = False, requires_grad: bool = True, use_mbw: bool = True,
                 groups: int = 64, rows_packed: int = 64) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        fmt.check_in_features(in_channels)
        _check_int("out_channels", out_channels)
        if out_channels <= 0:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        if a_bit != 16:
            raise ValueError(f"a_bit must be 16 (activations are fp16/bf16), got {a_bit}")
        if dtype != torch.half:
            raise ValueError(f"dtype must be torch.float16 (the stored scales/zeros are fp16; "
                             f"activations may still be bf16), got {dtype}")
        if not use_gba_quant or asym:
            raise ValueError(f"only use_gba_quant=True, asym=False is a working MBWQ configuration, "
                             f"got use_gba_quant={use_gba_quant}, asym={asym}")
        if group_size == -1:
            group_size = in_channels
        _check_int("group_size", group_size)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.a_bit, self.w_bit, self.dtype = a_bit, w_bit, dtype
        self.group_size, self.use_mbw = group_size, bool(use_mbw)
        self.use_gba_quant, self.asym = use_gba_quant, asym
        self.dq_group_size, self.dq_mode = dq_group_size, dq_mode
        self.disable_bias, self.requires_grad = disable_bias, requires_grad
        self.groups, self.rows_packed = groups, rows_packed
        K, N = in_channels, out_channels
        if self.use_mbw:
            if w_bit not in fmt.WIDTHS:
                raise ValueError(f"w_bit must be one of {fmt.WIDTHS}, got {w_bit}")
            for name, v in (("groups", groups), ("rows_packed", rows_packed)):
                _check_int(name, v)
                if v <= 0:
                    raise ValueError(f"{name} must be positive, got {v}")
            G, R = groups, rows_packed
        else:
            fmt.uniform_groups(K, w_bit, group_size)  # validates w_bit and group_size
            G, R = math.ceil(K / group_size), K * w_bit // 32
        self.register_buffer("qweight", torch.zeros(R, N, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(G, N, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(G, N, dtype=torch.float16))
        self.register_buffer("q_perm", torch.zeros(K, dtype=torch.int16))
        self.register_buffer("channel_scale", torch.ones(1, 1, K, dtype=torch.float16))
        if self.use_mbw:
            self.register_buffer("q_groups", torch.zeros(2 * G, dtype=torch.int16))
        if not disable_bias:
            self.register_buffer("bias", torch.zeros(N, dtype=torch.float16))
        else:
            self.bias = None
        # Kernel tables, built by prepare_params(); never saved (the state_dict is the stored format).
        self.register_buffer("_blocks", torch.empty(0, 3, dtype=torch.int32), persistent=False)
        self.register_buffer("_perm", torch.empty(0, dtype=torch.int32), persistent=False)
        self.rows: List[int] = [0] * 7
        self.q_group_map: Optional[Tensor] = None
        self._prepared = False
        self._versions: tuple = ()

    @classmethod
    def from_stored(cls, state: Dict[str, Tensor], in_channels: int, *, use_mbw: bool,
                    w_bit: int, group_size: int) -> "MBWQLinear":
        """A layer holding ``state`` (stored-format tensors, as ``state_dict()`` gives them):
        out_channels, bias and the group / packed-row counts come from the tensors' shapes, the
        buffers live on ``state["qweight"]``'s device. Validated by ``load_state_dict``; not
        prepared (``prepare_params()`` once it sits where it runs)."""
        counts = ({"groups": state["scales"].shape[0], "rows_packed": state["qweight"].shape[0]}
                  if use_mbw else {})  # uniform layers derive theirs from K, w_bit, group_size
        layer = cls(in_channels, state["qweight"].shape[1], w_bit=w_bit, group_size=group_size,
                    use_mbw=use_mbw, disable_bias="bias" not in state, **counts)
        layer.to(state["qweight"].device)
        layer.load_state_dict(state)
        return layer

    # ------------------------------------------------------------------ stored tensors
    def __setattr__(self, name, value):
        if name in STORED_DTYPES and "_prepared" in self.__dict__:
            self.__dict__["_prepared"] = False  # any new weight data needs prepare_params()
        super().__setattr__(name, value)

    def set_qweight_data(self, data: Tensor) -> None:
        self.qweight = _stored("qweight", data)

    def set_scales(self, scales: Tensor) -> None:
        self.scales = _stored("scales", scales)

    def set_zeros(self, zeros: Tensor) -> None:
        self.zeros = _stored("zeros", zeros)

    def stored_groups(self) -> List[fmt.Group]:
        """The layer's groups, read from the stored tensors and validated (ValueError)."""
        K, N = self.in_channels, self.out_channels
        for name, want in STORED_DTYPES.items():
            t = getattr(self, name, None)
            if t is not None and t.dtype != want:
                raise ValueError(f"{name} must be {want}, got {t.dtype}")
        if self.qweight.dim() != 2 or self.qweight.shape[1] != N:
            raise ValueError(f"qweight must have shape [rows, {N}], got {tuple(self.qweight.shape)}")
        if self.use_mbw:
            groups = fmt.parse_q_groups(self.q_groups, K, self.qweight.shape[0])
        else:
            if self.qweight.shape[0] != K * self.w_bit // 32:
                raise ValueError(f"qweight must have shape [{K * self.w_bit // 32}, {N}] for "
                                 f"{self.w_bit}-bit uniform weights, got {tuple(self.qweight.shape)}")
            groups = fmt.uniform_groups(K, self.w_bit, self.group_size)
        G = len(groups)
        for name in ("scales", "zeros"):
            t = getattr(self, name)
            if tuple(t.shape) != (G, N):
                raise ValueError(f"{name} must have shape [{G}, {N}] ({G} groups), got {tuple(t.shape)}")
        if self.channel_scale.numel() != K:
            raise ValueError(f"channel_scale must have {K} elements, got {tuple(self.channel_scale.shape)}")
        if self.bias is not None and tuple(self.bias.shape) != (N,):
            raise ValueError(f"bias must have shape [{N}], got {tuple(self.bias.shape)}")
        devices = {t.device for t in (self.qweight, self.scales, self.zeros, self.q_perm,
                                      self.channel_scale)}
        if len(devices) > 1:
            raise ValueError(f"all stored tensors must be on one device, found {sorted(map(str, devices))}")
        return groups

    def check_parameters(self) -> None:
        """Validate every stored tensor (FORMAT.md §10); raises ValueError naming the problem."""
        self.stored_groups()
        fmt.perm_index(self.q_perm, self.in_channels, self.use_mbw)

    def prepare_params(self) -> None:
        """Validate the layer and build the kernel tables (host work, once per layer).

        Assigning a stored tensor (``layer.q_perm = ...``, the setters, ``load_state_dict``)
        marks the layer unprepared. Changing ``qweight``, ``scales``, ``zeros``, ``q_perm`` or
        ``q_groups`` *in place* afterwards makes ``forward`` raise until this runs again (the
        tensors' version counters tell; writes through ``.data`` bypass them)."""
        groups = self.stored_groups()
        _check_finite("scales", self.scales)
        _check_finite("zeros", self.zeros)
        perm = fmt.perm_index(self.q_perm, self.in_channels, self.use_mbw)
        device = self.qweight.device
        self._blocks = fmt.make_blocks(groups).to(device)
        self._perm = perm.to(device)
        if self.use_mbw:
            self.rows = fmt.rows_list(groups)
            self.q_group_map = fmt.group_map(groups).to(device)
        else:
            self.rows = [0] * 7
        self._prepared = True
        self._versions = self._table_source_versions()

    def _table_source_versions(self) -> tuple:
        return tuple((n, getattr(self, n)._version) for n in TABLE_SOURCES
                     if getattr(self, n, None) is not None)

    def _check_prepared(self) -> None:
        if not self._prepared:
            raise RuntimeError("MBWQLinear: call prepare_params() after loading weights and "
                               "before forward() (mbwq_ops.prepare_model(model) prepares every "
                               "layer of a model)")
        # Version counters are host-side integers (no device sync), but dynamo traces them as
        # data-dependent values: the check runs in eager mode (and so before any CUDA-graph
        # capture), not inside a compiled graph.
        if torch.compiler.is_compiling():
            return
        now = self._table_source_versions()
        if now != self._versions:
            changed = [n for n, v in now if dict(self._versions).get(n) != v]
            raise RuntimeError(f"MBWQLinear: {', '.join(changed)} changed in place after "
                               f"prepare_params(); the kernel tables may be stale. Call "
                               f"prepare_params() again (mbwq_ops.prepare_model(model) for a "
                               f"whole model)")

    # ------------------------------------------------------------------ compute
    def forward(self, x: Tensor) -> Tensor:
        self._check_prepared()
        if x.dim() == 0:
            raise ValueError(f"MBWQLinear: input must have a feature dimension of "
                             f"{self.in_channels}, got a 0-D tensor")
        if x.shape[-1] != self.in_channels:
            raise ValueError(f"MBWQLinear: input has {x.shape[-1]} features (shape "
                             f"{tuple(x.shape)}), the layer expects {self.in_channels}")
        y = ops.gemm(x.reshape(-1, self.in_channels), self.qweight, self.scales, self.zeros,
                     self._blocks, self._perm, self.channel_scale.reshape(-1), self.bias)
        return y.reshape(*x.shape[:-1], self.out_channels)

    def dequantized_weight(self, dtype: torch.dtype = torch.float16) -> Tensor:
        """``W [in, out]`` with ``forward(x) == (x * channel_scale) @ W + bias``."""
        self._check_prepared()
        return ops.dequant(self.qweight, self.scales, self.zeros, self._blocks, self._perm, dtype)

    @staticmethod
    def q42fp_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bits: int,
                     q_perm: Tensor) -> Tensor:
        """Uniform-mode dequantization, original input order, fp16 ``[K, N]``."""
        if bits not in fmt.UNIFORM_WIDTHS:
            raise ValueError(f"bits must be 4 or 2 for q42fp_weight, got {bits}")
        _check_dequant_args(qweight, scales, zeros)
        K = qweight.shape[0] * 32 // bits
        groups = fmt.uniform_groups(K, bits, group_size)
        _check_group_count(scales, len(groups))
        blocks = fmt.make_blocks(groups).to(qweight.device)
        perm = fmt.perm_index(q_perm, K, use_mbw=False).to(qweight.device)
        return ops.dequant(qweight, scales, zeros, blocks, perm)

    @staticmethod
    def exl2fp_weight(qweight: Tensor, scales: Tensor, zeros: Tensor, q_perm: Tensor,
                      q_group_map: Tensor, rows: List[int]) -> Tensor:
        """Mixed-mode dequantization, original input order, fp16 ``[K, N]``."""
        _check_dequant_args(qweight, scales, zeros)
        groups = fmt.groups_from_group_map(q_group_map, rows)
        _check_group_count(scales, len(groups))
        K = groups[-1].first_row + groups[-1].rows
        end = groups[-1].start + groups[-1].packed_rows
        if end != qweight.shape[0]:
            raise ValueError(f"q_group_map and rows describe {end} packed rows but qweight has "
                             f"{qweight.shape[0]}")
        blocks = fmt.make_blocks(groups).to(qweight.device)
        perm = fmt.perm_index(q_perm, K, use_mbw=True).to(qweight.device)
        return ops.dequant(qweight, scales, zeros, blocks, perm)

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a stored-format dict (the original's keys). Missing keys keep their current
        values; legacy keys are ignored; other unknown keys raise ``KeyError`` when ``strict``."""
        known = set(self.state_dict().keys())
        unknown = [k for k in state_dict if k not in known and k not in LEGACY_KEYS
                   and not (k == "bias" and self.bias is None)]
        if strict and unknown:
            raise KeyError(f"MBWQLinear.load_state_dict: unexpected keys {unknown}")
        for k in known & set(state_dict):
            self._assign_stored(k, state_dict[k])
        if {"qweight", "scales", "zeros", "q_perm"} <= set(state_dict):
            self.check_parameters()  # reject a malformed layer now, not at the first kernel
        return nn.modules.module._IncompatibleKeys([], unknown)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Used when the layer sits inside a model: same rules as load_state_dict above.
        for k in LEGACY_KEYS + (("bias",) if self.bias is None else ()):
            state_dict.pop(prefix + k, None)
        for k in STORED_DTYPES:  # dtype checks and reshapeable keys, as in load_state_dict
            t = state_dict.get(prefix + k)
            if t is not None and getattr(self, k, None) is not None:
                self._assign_stored(k, t)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._prepared = False

    def _assign_stored(self, name: str, value: Tensor) -> None:
        value = _stored(name, value)
        current = getattr(self, name)
        with torch.no_grad():
            if current is not None and current.shape == value.shape:
                current.copy_(value)
                self._prepared = False
            elif name not in RESHAPEABLE_KEYS:
                raise ValueError(f"{name} must have shape {tuple(current.shape)}, got "
                                 f"{tuple(value.shape)}")
            else:  # a checkpoint with other group/row counts replaces the buffer, as the original
                setattr(self, name, value.to(self.qweight.device).clone())

    def __setstate__(self, state):
        # copy.deepcopy / pickle: the tensors are new objects with version counters of their
        # own, holding the values the tables were built from
        super().__setstate__(state)
        if self.__dict__.get("_prepared"):
            self._versions = self._table_source_versions()

    def _apply(self, fn, recurse=True):
        # Keep stored tensors in their format dtypes when the model is cast (model.bfloat16()):
        # move them to the new device only.
        before = {k: b for k, b in self._buffers.items() if b is not None and k in STORED_DTYPES}
        fresh = self._prepared and self._table_source_versions() == self._versions
        super()._apply(fn, recurse)
        for k, old in before.items():
            new = self._buffers[k]
            if new.dtype != old.dtype:
                self._buffers[k] = old.to(device=new.device)
        # the tables moved along with the tensors: still valid if they were before the move
        # (a move makes new tensors, with version counters of their own)
        self._versions = self._table_source_versions()
        self._prepared = fresh
        return self

    def extra_repr(self) -> str:
        mode = "mixed" if self.use_mbw else f"uniform {self.w_bit}-bit g{self.group_size}"
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, {mode}, "
                f"bias={self.bias is not None}")


MBWQLinearCuda = MBWQLinear


def prepare_model(model: nn.Module) -> nn.Module:
    """``prepare_params()`` on every MBWQLinear in ``model`` (after ``model.load_state_dict``
    or any change of stored tensors); a malformed layer's ``ValueError`` names the layer."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prepare_model needs an nn.Module, got {type(model).__name__}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MBWQLinear)]
    if not layers:
        raise ValueError(f"prepare_model: {type(model).__name__} has no MBWQLinear layer")
    for name, m in layers:
        try:
            m.prepare_params()
        except ValueError as e:
            raise ValueError(f"layer {name or '(the model itself)'}: {e}") from e
    return model


def _check_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")


def _check_finite(name: str, t: Tensor) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):  # host read: prepare_params is host work, never on the hot path
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name} must be finite, got {float(t[idx])} at {name}[{', '.join(map(str, idx))}]")


def _check_dequant_args(qweight: Tensor, scales: Tensor, zeros: Tensor) -> None:
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        _stored(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if scales.shape[1] != qweight.shape[1] or zeros.shape != scales.shape:
        raise ValueError(f"scales and zeros must have qweight's {qweight.shape[1]} columns and one "
                         f"shape, got scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}")


def _check_group_count(scales: Tensor, G: int) -> None:
    # checked here, before any kernel reads scales/zeros rows by group index
    if scales.shape[0] != G:
        raise ValueError(f"scales must have one row per group ({G}), got shape {tuple(scales.shape)}")


def _stored(name: str, value: Tensor) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(value).__name__}")
    want = STORED_DTYPES[name]
    if value.dtype != want:
        raise ValueError(f"{name} must be {want} (the stored format), got {value.dtype}")
    return value
