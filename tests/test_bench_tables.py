"""scripts/bench_tables.py: the benchmark tables are rendered from bench.py's records as
recorded (random times, so that no value can come out right by accident), read from a folder
of run files; and the committed runs in benchmarks/runs/ are what their names say."""
import argparse
import glob
import json
import os
import random
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench_tables  # noqa: E402

SHAPES = [(8192, 28672), (28672, 8192), (4096, 4096)]


def make_records(rng, commit="abc1234"):
    recs = []
    for K, N in SHAPES:
        for M in (1, 16, 2048):
            # baselines are per layer and M, like bench.py's
            fp16, bf16 = rng.uniform(10, 2000), rng.uniform(10, 2000)
            int4 = None if M == 2048 else rng.uniform(5, 100)
            for fmt in ("q4_g128", "mixed_2.5"):
                us = rng.uniform(5, 3000)
                wbytes = rng.randrange(10 ** 6, 10 ** 8)
                recs.append({"commit": commit, "shape": [K, N], "format": fmt, "bpw": 4.25,
                             "M": M, "us": us, "matmul_fp16_us": fp16, "matmul_bf16_us": bf16,
                             "int4pack_us": int4,
                             "weight_bytes": wbytes, "read_bw_tbs": 4.5,
                             "pct_bw": round(rng.uniform(1, 99), 1),
                             "read_same_bytes_us": rng.uniform(3, 40),
                             "pct_read_same": round(rng.uniform(1, 99), 1),
                             "speedup_fp16": fp16 / us})
    recs.append({"commit": commit, "kind": "decode_stack", "blocks": 8, "format": "q4_g128",
                 "us_per_token": 659.7, "tokens_per_s": 1515.8, "fp16_us_per_token": 1162.6,
                 "fp16_tokens_per_s": 860.1, "speedup_fp16": 1.76})
    return recs


def test_shape_table_cells_match_records():
    rng = random.Random()
    recs = [r for r in make_records(rng) if r.get("shape") == [4096, 4096]]
    lines = bench_tables.shape_table(recs, 4096, 4096)
    assert lines[0] == "#### 4096 × 4096 (K × N)"
    assert lines[2] == "| M | q4_g128 | mixed_2.5 | fp16 | bf16 | int4pk |"
    for r in recs:
        row = next(line for line in lines if line.startswith(f"| {r['M']} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        col = 1 if r["format"] == "q4_g128" else 2
        assert cells[col] == f"{r['us']:.1f} ({r['speedup_fp16']:.2f}×)"
        assert cells[3] == f"{r['matmul_fp16_us']:.1f}"
        assert cells[5] == ("-" if r["int4pack_us"] is None else f"{r['int4pack_us']:.1f}")
    m1 = {r["format"]: r for r in recs if r["M"] == 1}
    bpw_line = next(line for line in lines if line.startswith("bpw:"))
    assert f"q4_g128 {m1['q4_g128']['pct_bw']} %" in bpw_line
    assert f"mixed_2.5 {m1['mixed_2.5']['pct_read_same']} %" in bpw_line


def test_bf16_records_get_their_own_table():
    """A run with bf16 activations: its records form a second table per shape, each cell's
    speed-up against bf16 torch.matmul; the fp16 table and the roofline keep the fp16 ones."""
    rng = random.Random()
    fp16 = [dict(r, dtype="fp16", speedup_matmul=r["speedup_fp16"])
            for r in make_records(rng) if r.get("shape") == [8192, 28672]]
    bf16 = []
    for r in fp16:
        us = rng.uniform(5, 3000)
        bf16.append(dict(r, dtype="bf16", us=us, speedup_fp16=r["matmul_fp16_us"] / us,
                         speedup_matmul=r["matmul_bf16_us"] / us))
    recs = fp16 + bf16
    text = bench_tables.render(recs)
    assert text.count("#### 8192 × 28672 (K × N)") == 2
    bf_table = text.split("#### 8192 × 28672 (K × N), bf16 activations")[1].split("####")[0]
    fp_table = text.split("#### 8192 × 28672 (K × N), bf16 activations")[0]
    for r in bf16:
        assert f"{r['us']:.1f} ({r['speedup_matmul']:.2f}×)" in bf_table
    for r in fp16:
        assert f"{r['us']:.1f} ({r['speedup_fp16']:.2f}×)" in fp_table
    assert "bpw:" not in bf_table
    roof = bench_tables.roofline([r for r in recs if bench_tables.dtype_of(r) == "fp16"])
    assert roof == bench_tables.roofline(fp16)
    # records of runs before "dtype" existed are fp16
    assert bench_tables.shape_table([dict(r) for r in make_records(rng)
                                     if r.get("shape") == [4096, 4096]], 4096, 4096, "bf16") == []


def test_roofline_floors():
    rng = random.Random()
    recs = [r for r in make_records(rng) if "shape" in r]
    lines = bench_tables.roofline(recs)
    by = {(tuple(r["shape"]), r["format"], r["M"]): r for r in recs}
    for M in (1, 16, 2048):
        row = next(line for line in lines if line.startswith(f"| {M} |"))
        q4 = by[((8192, 28672), "q4_g128", M)]
        floor = max(q4["weight_bytes"] / 4.5 / 1e6, 2 * M * 8192 * 28672 / 989.0 / 1e6)
        assert f"{q4['us']:.1f} µs ({100 * floor / q4['us']:.0f} %)" in row
        assert f"({q4['read_same_bytes_us']:.1f} / " in row


def write_run(folder, recs, date="2026-12-05"):
    path = folder / bench_tables.run_file_name(dict(recs[0], date=date))
    path.write_text(json.dumps(recs))
    return path


def test_cli_renders_one_commit_only_from_a_folder(tmp_path):
    rng = random.Random()
    a = [dict(r, device="NVIDIA H200") for r in make_records(rng, "abc1234")]
    b = [dict(r, device="NVIDIA H200") for r in make_records(rng, "def5678")]
    write_run(tmp_path, a, "2026-12-04")
    write_run(tmp_path, b)
    # a full commit id selects the run recorded under its short form
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_tables.py"),
                          str(tmp_path), "--commit", "def5678" + "0" * 33],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("#### ") == len(SHAPES)
    assert out.count("Decode stack (8 blocks), q4_g128: 659.7 µs/token") == 1
    first = next(r for r in b if r.get("M") == 16
                 and r.get("shape") == [28672, 8192] and r["format"] == "q4_g128")
    assert f"{first['us']:.1f} ({first['speedup_fp16']:.2f}×)" in out
    other = next(r for r in a if r.get("M") == 16
                 and r.get("shape") == [28672, 8192] and r["format"] == "q4_g128")
    assert f"{other['us']:.1f} ({other['speedup_fp16']:.2f}×)" not in out


def test_run_file_name_and_loading(tmp_path):
    rec = {"device": "NVIDIA H100 80GB HBM3", "commit": "0123456789abcdef", "date": "2026-11-25"}
    assert bench_tables.run_file_name(rec) == "2026-11-25_0123456_H100-80GB-HBM3.json"
    rng = random.Random()
    recs = [dict(r, device="NVIDIA H100 80GB HBM3") for r in make_records(rng)]
    path = write_run(tmp_path, recs)
    assert bench_tables.load_runs([str(tmp_path)]) == recs
    assert bench_tables.load_runs([str(path), str(path)]) == recs + recs
    (tmp_path / "bad.json").write_text(json.dumps({"records": recs}))
    with pytest.raises(ValueError, match="bad.json.*list of records"):
        bench_tables.load_runs([str(tmp_path)])


def test_records_made_under_knobs_stay_out_of_tables_and_targets(tmp_path):
    # bench.py marks each record with the knobs it ran under ("" = the plan's own choices);
    # only those "" (or older, unmarked) records may reach the README tables and the targets
    rng = random.Random()
    card = {"device": "NVIDIA H100 80GB HBM3"}
    plain = [dict(r, knobs="", **card) for r in make_records(rng)]
    older = [dict(r, **card) for r in make_records(rng)]  # runs from before the field
    forced = [dict(r, knobs="MBWQ_MMA_CONFIG=7", **card) for r in make_records(rng)]
    write_run(tmp_path, plain + forced + older)
    assert bench_tables.load_runs([str(tmp_path)]) == plain + older
    assert bench_tables.load_runs([str(tmp_path)], with_knobs=True) == plain + forced + older


def test_cli_asks_for_a_device_when_a_commit_ran_on_two_cards(tmp_path):
    rng = random.Random()
    write_run(tmp_path, [dict(r, device="NVIDIA H200") for r in make_records(rng)])
    write_run(tmp_path, [dict(r, device="NVIDIA H100 80GB HBM3") for r in make_records(rng)])
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_tables.py"), str(tmp_path),
           "--commit", "abc1234"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "--device" in res.stderr
    out = subprocess.run(cmd + ["--device", "H100"], capture_output=True, text=True,
                         check=True).stdout
    assert out.count("#### ") == len(SHAPES)


def test_committed_runs_match_their_names():
    """Each file of benchmarks/runs holds one run: one commit, one card, named after them
    (the date is the run's where records carry one; older runs are named by the measured
    commit's date)."""
    files = sorted(glob.glob(os.path.join(bench_tables.RUNS_DIR, "*.json")))
    assert files, "benchmarks/runs holds no run files"
    for path in files:
        recs = bench_tables.load_runs([path])
        assert recs, path
        date, commit, card = os.path.basename(path)[:-len(".json")].split("_")
        assert {r["commit"][:7] for r in recs} == {commit}, path
        assert {bench_tables.card_name(r["device"]) for r in recs} == {card}, path
        assert {r.get("date", date) for r in recs} == {date}, path
        assert len({r["torch"] for r in recs}) == 1, path


def test_readme_tables_are_the_rendered_runs():
    """benchmarks/README.md's tables between `<!-- bench_tables: ARGS -->` and
    `<!-- end bench_tables -->` are exactly what the script renders from benchmarks/runs."""
    path = os.path.join(ROOT, "benchmarks", "README.md")
    with open(path) as f:
        text = f.read()
    sections = re.findall(r"<!-- bench_tables: (.*?) -->\n(.*?)<!-- end bench_tables -->",
                          text, re.S)
    assert sections, f"{path} has no rendered tables"
    for args, body in sections:
        ap = argparse.ArgumentParser()
        ap.add_argument("--commit", required=True)
        ap.add_argument("--device")
        a = ap.parse_args(args.split())
        recs = bench_tables.select_run(bench_tables.load_runs([bench_tables.RUNS_DIR]),
                                       a.commit, a.device)
        assert body.strip() == bench_tables.render(recs).strip(), args
