"""Golden layers produced by the original implementation (../shared/golden, see its README):
they load through MBWQLinear.load_state_dict, dequantize to the stored W exactly, run forward
within the README's tolerance, and survive a prepare_params() -> state_dict() round trip.

These tests are how the specification of the stored format, docs/FORMAT.md, is checked bit for
bit against the original: every layout the golden files hold must decode to the original's own
fp16 W."""
import glob
import io
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mbwq_ops import MBWQLinear, reference

from layers import device_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared/golden beside the repository, or shared/golden inside it, or $MBWQ_GOLDEN_DIR
CANDIDATES = [os.environ.get("MBWQ_GOLDEN_DIR", ""), os.path.join(ROOT, "..", "shared", "golden"),
              os.path.join(ROOT, "shared", "golden")]
GOLDEN_DIR = next((os.path.normpath(d) for d in CANDIDATES if d and os.path.isdir(d)), "")
FILES = sorted(glob.glob(os.path.join(GOLDEN_DIR, "*.safetensors"))) if GOLDEN_DIR else []
STORED = ("qweight", "scales", "zeros", "q_perm", "channel_scale", "q_groups", "bias")
TOL = 4 * 2.0 ** -11  # golden/README.md: |y_mine - y_golden| <= 4 * 2^-11 * S

def test_all_golden_files_present():
    names = {os.path.basename(f)[:2] for f in FILES}
    assert names == {"g1", "g2", "g3", "g4"}, f"golden files not found in {CANDIDATES}: {FILES}"


def read(path):
    t = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    return t, json.loads(meta["config"]), json.loads(meta["rows"])


def new_layer(cfg, has_bias, device="cpu"):
    return MBWQLinear(cfg["in_features"], cfg["out_features"], w_bit=cfg["w_bit"],
                      group_size=cfg["group_size"], use_mbw=cfg["use_mbw"],
                      disable_bias=not has_bias).to(device)


def load(path, device="cpu", legacy=False):
    t, cfg, rows = read(path)
    sd = {k: v for k, v in t.items() if k in STORED}
    if legacy:  # what a checkpoint of the original also holds (ignored by the math)
        K, N = cfg["in_features"], cfg["out_features"]
        sd.update(g_idx=torch.arange(K, dtype=torch.int32) // cfg["group_size"],
                  wf=torch.arange(0, 32, cfg["w_bit"], dtype=torch.int32).view(1, -1),
                  qstatistic=torch.ones(1, 1, N, dtype=torch.uint8),
                  qzeros_zeros=torch.ones(1, 1, 1).half(), qzeros_scales=torch.ones(1, 1, 1).half(),
                  qscales_zeros=torch.ones(1, 1, 1).half(), qscales_scales=torch.ones(1, 1, 1).half())
    layer = new_layer(cfg, "bias" in t, device)
    layer.load_state_dict(sd)
    layer.prepare_params()
    return layer, t, cfg, rows


def golden_weight(layer, cfg):
    if cfg["use_mbw"]:
        return MBWQLinear.exl2fp_weight(layer.qweight, layer.scales, layer.zeros, layer.q_perm,
                                        layer.q_group_map, layer.rows)
    return MBWQLinear.q42fp_weight(layer.qweight, layer.scales, layer.zeros, cfg["group_size"],
                                   cfg["w_bit"], layer.q_perm)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_dequant_exact(path, device):
    layer, t, cfg, rows = load(path, device)
    W = golden_weight(layer, cfg)
    assert W.dtype == torch.float16 and W.device.type == device
    assert torch.equal(W.cpu(), t["W"])
    assert torch.equal(layer.dequantized_weight().cpu(), t["W"])
    if cfg["use_mbw"]:
        assert layer.rows == rows  # the original's rows list, from the file's metadata
        assert layer.q_group_map is not None and layer.q_group_map.numel() == 2 * cfg["in_features"]
    else:
        assert layer.rows == [0] * 7


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("inp", ["x", "x_large"])
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_forward(path, inp, device):
    layer, t, cfg, _ = load(path, device)
    x, y_gold = t[inp], t["y" if inp == "x" else "y_large"]
    y = layer(x.to(device))
    assert y.dtype == torch.float16 and y.shape == y_gold.shape  # [M, N], not [1, M, N]
    xs = (x * t["channel_scale"].reshape(-1)).float()
    S = xs.abs() @ t["W"].float().abs() + (t["bias"].float().abs() if "bias" in t else 0)
    err = (y.cpu().float() - y_gold.float()).abs()
    assert (err <= TOL * S).all(), f"max error {(err / S).max().item() / 2 ** -11:.2f} u"
    # leading dimensions are kept
    y3 = layer(x.to(device).view(1, *x.shape))
    assert y3.shape == (1, *y_gold.shape) and torch.equal(y3[0], y)


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_loads_with_legacy_keys(path):
    layer, t, cfg, _ = load(path, legacy=True)
    assert torch.equal(golden_weight(layer, cfg), t["W"])
    assert not set(layer.state_dict()) - set(STORED)  # legacy buffers are not kept


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_golden_state_dict_round_trip(path, device):
    layer, t, cfg, _ = load(path, device)
    sd = layer.state_dict()
    want = {k: v for k, v in t.items() if k in STORED}
    assert set(sd) == set(want)
    for k, v in want.items():  # bit for bit: same dtype, shape and values
        assert sd[k].dtype == v.dtype and sd[k].shape == v.shape, k
        assert torch.equal(sd[k].cpu(), v), k
    # through torch.save / torch.load into a fresh layer with the constructor's default shapes
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in sd.items()}, buf)
    buf.seek(0)
    fresh = new_layer(cfg, "bias" in t, device)
    fresh.load_state_dict(torch.load(buf))
    fresh.prepare_params()
    assert torch.equal(golden_weight(fresh, cfg).cpu(), t["W"])
    x = t["x"].to(device)
    assert torch.equal(fresh(x), layer(x))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in
               zip(fresh.state_dict().values(), layer.state_dict().values()))


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_reference_reproduces_golden(path):
    # the oracle the property tests trust agrees with the original on its own outputs
    t, cfg, _ = read(path)
    W = reference.dequant_reference(t["qweight"], t["scales"], t["zeros"], t["q_perm"],
                                    cfg["in_features"], use_mbw=cfg["use_mbw"],
                                    q_groups=t.get("q_groups"), group_size=cfg["group_size"])
    assert torch.equal(W, t["W"])
    for inp, out in (("x", "y"), ("x_large", "y_large")):
        ref = reference.gemm_reference(t[inp], W, t["channel_scale"], t.get("bias"))
        S = reference.error_scale(t[inp], W, t["channel_scale"], t.get("bias"))
        assert ((ref - t[out].double()).abs() <= TOL * S).all()
