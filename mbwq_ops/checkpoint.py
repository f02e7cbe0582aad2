"""Save and load quantized models: one safetensors file plus a JSON config.

A checkpoint is a directory::

    model.safetensors   the model's whole state_dict; MBWQ layers in the stored format
                        (FORMAT.md §2: qweight, scales, zeros, q_perm, q_groups, channel_scale, bias)
    mbwq_config.json    {"quant_method": "mbwq", "format_version": 1, "bpw": ..., "layers": {name:
                        {mode, w_bit, group_size, groups: [[bits, rows], ...], ...}},
                        "aliases": {...}, "metadata": {...}}

Loading needs the model's structure: a skeleton module (any weights, e.g. freshly initialised)
or a zero-argument factory. Every layer named in the config is replaced by an ``MBWQLinear`` of
the recorded shape before the tensors are loaded, so the round trip is bit-exact.

Both files are untrusted input. Loading checks, in this order and before it allocates anything
the files ask for: the config on its own (:func:`read_config`), the config against the tensor
index of the safetensors header, which is read without the data (:func:`read_tensor_index`), and
both against the skeleton (:func:`check_skeleton`). Only then are the tensors read; their values
are checked by the layers. Every problem raises one :class:`CheckpointError` (a ``ValueError``)
whose message starts with the file and the field, e.g.
``q3/mbwq_config.json: layers["model.layers.0.mlp.up_proj"].groups: group 2 has width 7; ...``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from . import format as fmt
from .accounting import bits_per_weight, layer_bits, set_module
from .layer import LEGACY_KEYS, STORED_DTYPES, MBWQLinear, prepare_model

__all__ = ["save_quantized", "load_quantized", "read_config", "read_tensor_index",
           "check_skeleton", "layer_ctor", "CheckpointError", "MissingCheckpointFile",
           "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "mbwq_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 256 << 20  # a config lists layers and groups: megabytes even for huge models

# safetensors dtype names -> torch dtypes (those this torch has)
ST_DTYPES = {name: getattr(torch, t) for name, t in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, t)}

Shape = Tuple[int, ...]
TensorIndex = Dict[str, Tuple[Shape, torch.dtype]]


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read or does not fit the model. The message starts
    with the file, then the field or tensor, then what is wrong with which value."""


class MissingCheckpointFile(CheckpointError, FileNotFoundError):
    """A checkpoint file that is not there: a CheckpointError that code catching
    FileNotFoundError (what loading raised before these checks) still catches."""


class _Bad(Exception):
    """A problem at ``field`` of a JSON document, turned into a CheckpointError by the caller,
    which knows the file."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)


# ============================================================================ save
def layer_record(layer: MBWQLinear) -> Dict:
    info = layer_bits(layer)
    return {
        "mode": "mixed" if layer.use_mbw else "uniform",
        "in_features": layer.in_channels,
        "out_features": layer.out_channels,
        "w_bit": layer.w_bit,
        "group_size": layer.group_size,
        "bias": layer.bias is not None,
        "groups": info["groups"],
        "widths": _widths(info["groups"]),
        "bpw": info["bpw"],
        "bytes": info["bytes"],
    }


def _widths(groups) -> Dict[str, int]:
    """Rows per width, ``{"4": 96, "2": 32}``, widest first."""
    rows: Dict[int, int] = {}
    for b, r in groups:
        rows[b] = rows.get(b, 0) + r
    return {str(b): r for b, r in sorted(rows.items(), reverse=True)}


def layer_records(model: nn.Module) -> Dict[str, Dict]:
    """``{name: record}`` of every MBWQ layer of ``model`` (the checkpoint's per-layer record)."""
    return {n: layer_record(m) for n, m in model.named_modules() if isinstance(m, MBWQLinear)}


def layer_ctor(lc: Dict) -> Dict:
    """``MBWQLinear`` keyword arguments for a layer record of :func:`layer_record`: buffers of
    the recorded shapes, so that the stored tensors load into them unchanged."""
    mixed = lc["mode"] == "mixed"
    G = len(lc["groups"])
    R = sum(r * b // 32 for b, r in lc["groups"])
    return dict(in_channels=lc["in_features"], out_channels=lc["out_features"],
                w_bit=lc["w_bit"], group_size=lc["group_size"], use_mbw=mixed,
                disable_bias=not lc["bias"], groups=G if mixed else 64,
                rows_packed=R if mixed else 64)


def save_quantized(model: nn.Module, path: Union[str, os.PathLike],
                   metadata: Optional[Dict] = None) -> str:
    """Write ``model`` (with its MBWQ layers) to the directory ``path``; returns the path.

    ``metadata`` (JSON-serialisable) is stored in the config, e.g. what is needed to rebuild the
    skeleton. Tensors shared between modules (tied embeddings) are stored once."""
    from safetensors.torch import save_file

    layers = layer_records(model)
    if not layers:
        raise ValueError("save_quantized: the model has no MBWQLinear layer (quantize it first)")
    tensors, aliases, seen = {}, {}, {}
    for k, t in model.state_dict().items():
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[k] = seen[key]
            continue
        if key is not None:
            seen[key] = k
        tensors[k] = t.detach().to("cpu").contiguous()
    config = {
        "quant_method": "mbwq",
        "format_version": FORMAT_VERSION,
        "bpw": bits_per_weight(model),
        "bpw_with_metadata": bits_per_weight(model, include_metadata=True),
        "layers": layers,
        "aliases": aliases,
        "metadata": metadata or {},
    }
    text = json.dumps(config, indent=1, allow_nan=False)  # fails before anything is written
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"quant_method": "mbwq"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        f.write(text)
    return str(path)


# ============================================================================ the config
def read_config(path: Union[str, os.PathLike]) -> Dict:
    """The JSON config of the checkpoint directory ``path``, checked on its own: JSON types,
    ranges and the layout of every layer (FORMAT.md rules, from ``format.py``). Raises
    :class:`CheckpointError` naming the file and the field."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    text = _read_text(file)
    try:
        cfg = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    try:
        _check_config(cfg)
    except _Bad as e:
        raise CheckpointError(f"{file}: {e}") from None
    cfg.setdefault("format_version", FORMAT_VERSION)
    cfg.setdefault("aliases", {})
    cfg.setdefault("metadata", {})
    return cfg


def _read_text(file: str) -> str:
    if not os.path.isfile(file):
        why = "is not a file" if os.path.exists(file) else "no such file"
        raise MissingCheckpointFile(f"{file}: {why} (not an MBWQ checkpoint; mbwq quantize "
                                    "and save_quantized write one)")
    try:
        if os.path.getsize(file) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{file}: {os.path.getsize(file)} bytes, too large for a "
                                  f"config (at most {MAX_CONFIG_BYTES})")
        with open(file, "rb") as f:
            return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON (not UTF-8 text: {e})") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e})") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_config(cfg) -> None:
    _expect(cfg, dict, "", "a JSON object")
    if cfg.get("quant_method") != "mbwq":
        raise _Bad("quant_method", f"expected 'mbwq', got {cfg.get('quant_method')!r}")
    version = cfg.get("format_version", FORMAT_VERSION)
    _int(version, "format_version", 1)
    if version > FORMAT_VERSION:
        raise _Bad("format_version", f"{version} is newer than this library's "
                   f"({FORMAT_VERSION}); upgrade mbwq_ops")
    _number(cfg.get("bpw"), "bpw")
    if cfg.get("bpw_with_metadata") is not None:
        _number(cfg["bpw_with_metadata"], "bpw_with_metadata")
    _expect(cfg.get("metadata", {}), dict, "metadata", "an object")
    layers = cfg.get("layers")
    _expect(layers, dict, "layers", "an object of layer names")
    if not layers:
        raise _Bad("layers", "names no layer (a checkpoint holds at least one MBWQ layer)")
    for name, lc in layers.items():
        _check_layer(name, lc, f"layers[{json.dumps(name)}]")
    aliases = cfg.get("aliases", {})
    _expect(aliases, dict, "aliases", "an object of tensor names")
    for alias, target in aliases.items():
        _expect(target, str, f"aliases[{json.dumps(alias)}]", "a tensor name")


def _check_layer(name: str, lc, at: str) -> None:
    if not name or name.startswith(".") or name.endswith(".") or ".." in name:
        raise _Bad(at, "is not a module name")
    _expect(lc, dict, at, "an object")
    for key in ("mode", "in_features", "out_features", "w_bit", "group_size", "bias", "groups",
                "widths", "bpw", "bytes"):
        if key not in lc:
            raise _Bad(at, f"has no {key!r}")
    if lc["mode"] not in ("mixed", "uniform"):
        raise _Bad(f"{at}.mode", f"must be 'mixed' or 'uniform', got {lc['mode']!r}")
    for key in ("in_features", "out_features", "w_bit", "group_size"):
        _int(lc[key], f"{at}.{key}", 1)
    _expect(lc["bias"], bool, f"{at}.bias", "true or false")
    K, w_bit = lc["in_features"], lc["w_bit"]
    groups = lc["groups"]
    _expect(groups, list, f"{at}.groups", "a list of [bits, rows] pairs")
    if not groups:
        raise _Bad(f"{at}.groups", "is empty")
    for g, pair in enumerate(groups):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise _Bad(f"{at}.groups[{g}]", f"must be a [bits, rows] pair, got {pair!r}")
        _int(pair[0], f"{at}.groups[{g}][0] (bits)")
        _int(pair[1], f"{at}.groups[{g}][1] (rows)")
    try:
        fmt.check_in_features(K)
    except ValueError as e:
        raise _Bad(f"{at}.in_features", str(e)) from None
    if lc["mode"] == "uniform":
        try:  # the uniform layout follows from in_features, w_bit and group_size
            want = [[g.bits, g.rows] for g in fmt.uniform_groups(K, w_bit, lc["group_size"])]
        except ValueError as e:
            raise _Bad(at, str(e)) from None
        if groups != want:
            raise _Bad(f"{at}.groups", f"{_short(groups)} is not the uniform {w_bit}-bit layout "
                       f"of {K} rows in groups of {lc['group_size']}: {_short(want)}")
    else:
        if w_bit not in fmt.WIDTHS:
            raise _Bad(f"{at}.w_bit", f"must be one of {fmt.WIDTHS}, got {w_bit}")
        try:
            parsed = fmt.mixed_groups([b for b, _ in groups], [r for _, r in groups])
        except ValueError as e:
            raise _Bad(f"{at}.groups", str(e)) from None
        covered = sum(r for _, r in groups)
        if covered != K:
            raise _Bad(f"{at}.groups", f"cover {covered} rows, in_features is {K}")
        packed = parsed[-1].start + parsed[-1].packed_rows
        try:  # the order of the widths, as the stored q_groups must have it
            fmt.parse_q_groups(fmt.q_groups_tensor(parsed), K, packed)
        except ValueError as e:
            raise _Bad(f"{at}.groups", str(e).removeprefix("q_groups: ")) from None
    widths = lc["widths"]
    if widths != _widths(groups):
        raise _Bad(f"{at}.widths", f"{_short(widths)} does not match the groups, which give "
                   f"{_short(_widths(groups))}")
    _number(lc["bpw"], f"{at}.bpw")
    _int(lc["bytes"], f"{at}.bytes", 0)


def _expect(v, kind: type, field: str, what: str) -> None:
    if not isinstance(v, kind):
        raise _Bad(field, f"must be {what}, got {_short(v)}")


def _int(v, field: str, low: Optional[int] = None) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(field, f"must be an integer, got {_short(v)}")
    if low is not None and v < low:
        raise _Bad(field, f"must be at least {low}, got {v}")


def _number(v, field: str) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise _Bad(field, f"must be a number >= 0, got {_short(v)}")


def _short(v, limit: int = 120) -> str:
    s = json.dumps(v) if isinstance(v, (dict, list, str, int, float, bool, type(None))) else repr(v)
    return s if len(s) <= limit else s[:limit] + " ..."


# ============================================================================ the tensor index
def _layer_tensors(lc: Dict) -> TensorIndex:
    """What the weights file must hold for a layer of the (checked) config ``lc``."""
    K, N, groups = lc["in_features"], lc["out_features"], lc["groups"]
    G, R = len(groups), sum(r * b // 32 for b, r in groups)
    shapes = {"qweight": (R, N), "scales": (G, N), "zeros": (G, N), "q_perm": (K,),
              "channel_scale": (1, 1, K)}
    if lc["mode"] == "mixed":
        shapes["q_groups"] = (2 * G,)
    if lc["bias"]:
        shapes["bias"] = (N,)
    return {k: (s, STORED_DTYPES[k]) for k, s in shapes.items()}


def read_tensor_index(path: Union[str, os.PathLike], cfg: Optional[Dict] = None) -> TensorIndex:
    """``{name: (shape, dtype)}`` of every tensor of the checkpoint's weights file (aliases
    included), read from the safetensors header without the data, and checked against the
    config ``cfg`` (read with :func:`read_config` when not given): every layer's tensors with
    the dtype and shape its config implies, every alias pointing at a stored tensor."""
    from safetensors import SafetensorError, safe_open

    cfg = read_config(path) if cfg is None else cfg
    file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    if not os.path.isfile(file):
        why = "is not a file" if os.path.exists(file) else "no such file"
        raise MissingCheckpointFile(f"{file}: {why}")
    index: TensorIndex = {}
    try:
        with safe_open(file, "pt") as f:
            for k in f.keys():
                sl = f.get_slice(k)
                name = sl.get_dtype()
                if name not in ST_DTYPES:
                    raise CheckpointError(f"{file}: {k}: dtype {name} is not one torch reads")
                index[k] = (tuple(sl.get_shape()), ST_DTYPES[name])
    except (SafetensorError, OSError) as e:  # truncated, corrupt, not safetensors at all
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    config = os.path.join(os.fspath(path), CONFIG_NAME)
    for alias, target in cfg["aliases"].items():
        at = f"{config}: aliases[{json.dumps(alias)}]"
        if alias in index:
            raise CheckpointError(f"{at}: {alias} is also stored in {file}; an alias would "
                                  "shadow it")
        if target not in index:
            raise CheckpointError(f"{at}: its target {target!r} is not stored in {file}")
    index.update({a: index[t] for a, t in cfg["aliases"].items()})
    for name, lc in cfg["layers"].items():
        for k, (shape, dtype) in _layer_tensors(lc).items():
            key = f"{name}.{k}"
            if key not in index:
                raise CheckpointError(f"{file}: {key} is missing (layers[{json.dumps(name)}] "
                                      f"of {CONFIG_NAME} needs it)")
            got_shape, got_dtype = index[key]
            if got_dtype != dtype:
                raise CheckpointError(f"{file}: {key}: dtype must be {dtype} (the stored "
                                      f"format), got {got_dtype}")
            if got_shape != shape:
                raise CheckpointError(f"{file}: {key}: shape must be {list(shape)} for "
                                      f"layers[{json.dumps(name)}] of {CONFIG_NAME}, got "
                                      f"{list(got_shape)}")
        if not lc["bias"] and f"{name}.bias" in index:
            raise CheckpointError(f"{file}: {name}.bias is stored but layers"
                                  f"[{json.dumps(name)}].bias is false in {CONFIG_NAME}")
    return index


def tensor_bytes(index: TensorIndex) -> int:
    """Bytes of the stored tensors of an index (aliases counted once: pass the stored ones)."""
    return sum(math.prod(s) * torch.empty(0, dtype=d).element_size() for s, d in index.values())


# ============================================================================ the skeleton
def check_skeleton(model: nn.Module, path: Union[str, os.PathLike], cfg: Optional[Dict] = None,
                   index: Optional[TensorIndex] = None, strict: bool = True) -> None:
    """Check that the checkpoint ``path`` fits ``model`` (which may live on the meta device)
    without changing or allocating anything: every configured layer is an ``nn.Linear`` (or
    ``MBWQLinear``) of the recorded shape, every other tensor of the file has the shape of the
    model's and a compatible dtype, and, with ``strict``, neither side has tensors the other
    lacks. Raises :class:`CheckpointError`."""
    cfg = read_config(path) if cfg is None else cfg
    index = read_tensor_index(path, cfg) if index is None else index
    config = os.path.join(os.fspath(path), CONFIG_NAME)
    file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    layers = cfg["layers"]
    for name, lc in layers.items():
        at = f"{config}: layers[{json.dumps(name)}]"
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{at}: the model has no module {name!r}") from None
        if isinstance(old, MBWQLinear):
            shape = (old.in_channels, old.out_channels)
        elif isinstance(old, nn.Linear):
            shape = (old.in_features, old.out_features)
        else:
            raise CheckpointError(f"{at}: the model's {name} is a {type(old).__name__}, not a "
                                  "linear layer")
        if shape != (lc["in_features"], lc["out_features"]):
            raise CheckpointError(f"{at}: {lc['in_features']}->{lc['out_features']} features, "
                                  f"but the model's {name} is {shape[0]}->{shape[1]}")
    own = {k: (tuple(t.shape), t.dtype) for k, t in model.state_dict(keep_vars=True).items()
           if t is not None and k.rpartition(".")[0] not in layers}
    for k, (shape, dtype) in own.items():
        if k not in index:
            continue
        got_shape, got_dtype = index[k]
        if got_shape != shape:
            raise CheckpointError(f"{file}: {k}: shape {list(got_shape)}, but the model's is "
                                  f"{list(shape)}")
        if not _compatible(dtype, got_dtype):
            raise CheckpointError(f"{file}: {k}: dtype {got_dtype} cannot stand for the "
                                  f"model's {dtype}")
    if strict:
        missing = sorted(k for k in own if k not in index)
        expected = {f"{n}.{k}" for n, lc in layers.items()
                    for k in (*_layer_tensors(lc), *LEGACY_KEYS)}
        unexpected = sorted(k for k in index if k not in own and k not in expected)
        if missing or unexpected:
            raise CheckpointError(f"{file}: does not fit the model: " + "; ".join(
                f"{what} {_names(keys)}" for what, keys in
                (("missing tensors", missing), ("tensors the model does not have", unexpected))
                if keys))


def _compatible(want: torch.dtype, got: torch.dtype) -> bool:
    # a float32 skeleton restores a bf16 model exactly: the checkpoint's float dtype wins
    if want.is_floating_point or got.is_floating_point:
        return want.is_floating_point and got.is_floating_point
    return want == got


def _names(keys: List[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ============================================================================ load
def load_quantized(model_skeleton_or_factory: Union[nn.Module, Callable[[], nn.Module]],
                   path: Union[str, os.PathLike], device=None, strict: bool = True) -> nn.Module:
    """Restore a model saved by :func:`save_quantized` into ``model_skeleton_or_factory`` (a
    module with the original structure -- its ``nn.Linear`` layers are replaced -- or a callable
    returning one). Layers are prepared and moved to ``device`` (default: CPU).

    ``strict=False`` tolerates tensors that only the file or only the model has (the MBWQ
    layers' own tensors are always required). A bad checkpoint raises :class:`CheckpointError`
    naming the file and the field; every check, the layers' tensor values included, runs
    before the skeleton is changed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    cfg = read_config(path)
    index = read_tensor_index(path, cfg)
    model = model_skeleton_or_factory
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(f"load_quantized needs an nn.Module or a callable returning one, "
                            f"got {type(model).__name__}")
        model = model()
        if not isinstance(model, nn.Module):
            raise TypeError(f"load_quantized: the factory returned a {type(model).__name__}, "
                            "not an nn.Module")
    check_skeleton(model, path, cfg, index, strict)
    file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    try:
        sd = load_file(file)
    except (SafetensorError, OSError) as e:  # changed since its header was read
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    aliases = cfg["aliases"]
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    layers = {}
    for name, lc in cfg["layers"].items():  # each layer built and checked on its own first
        layer = MBWQLinear(**layer_ctor(lc))
        try:  # the layer checks its tensors' values (q_perm, q_groups, scales...)
            layer.load_state_dict({k: sd.pop(f"{name}.{k}") for k in _layer_tensors(lc)})
            layer.prepare_params()
        except ValueError as e:
            raise CheckpointError(f"{file}: layer {name}: {e}") from None
        except KeyError as e:  # the file was replaced after its header was read
            raise CheckpointError(f"{file}: {e.args[0]} is missing (the file changed while "
                                  "it was loaded)") from None
        layers[name] = layer
    if any(p.device.type == "meta" for p in model.parameters()):
        model = model.to_empty(device="cpu")
    rest = {k: v for k, v in sd.items() if k.rpartition(".")[0] not in layers}
    try:
        # assign=True: parameters take the checkpoint's dtype (a float32 skeleton restores a
        # bf16 model exactly) and tied tensors stay tied.
        model.load_state_dict(rest, strict=False, assign=True)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{file}: does not fit the model: {' '.join(str(e).split())}"
                              ) from None
    for name, layer in layers.items():
        set_module(model, name, layer)
    own = model.state_dict(keep_vars=True)
    for alias, target in aliases.items():  # re-tie shared parameters
        if alias not in own or target not in own:
            continue  # strict=False: a tensor the model does not have
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        t_param = getattr(model.get_submodule(t_mod), t_name, None)
        if isinstance(t_param, nn.Parameter):
            setattr(model.get_submodule(a_mod), a_name, t_param)
    if device is not None:
        model.to(device)
        prepare_model(model)  # the tables on the new device; the values are checked already
    return model
