"""The thought-attention benchmark runs, checks its providers against the reference, and counts FLOPs correctly."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_thought_attention as bench  # noqa: E402


def test_useful_flops_counts_exactly_the_visible_pairs():
    length, steps = 7, 3
    rows = torch.arange(length * steps)[:, None]
    cols = torch.arange(length + length * steps)[None, :]
    visible_pairs = bench.thought_mask_mod(length, steps)(0, 0, rows, cols).sum().item()
    batch, n_thoughts, n_heads, head_dim = 2, 3, 5, 8
    expected = 4 * batch * n_thoughts * n_heads * head_dim * visible_pairs
    assert bench.useful_flops(batch, n_thoughts, n_heads, length, steps, head_dim, "fwd") == expected


def test_quick_cpu_run_prints_measured_rows_and_json(tmp_path, capsys):
    csv = tmp_path / "rows.csv"
    bench.main(["--device", "cpu", "--quick", "--providers", "torch_ref,dense_sdpa,sdpa_floor", "--csv", str(csv)])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = report["rows"]
    assert {(r["provider"], r["mode"]) for r in rows} == {
        (p, m) for p in ("torch_ref", "dense_sdpa", "sdpa_floor") for m in ("fwd", "bwd", "fwd_bwd")
    }
    for row in rows:
        assert row["ms_p50"] > 0 and row["device"] == "cpu"
        flops = bench.useful_flops(row["B"], row["N"], row["Hq"], row["L"], row["S"], row["D"], row["mode"])
        assert abs(row["tflops"] - flops / (row["ms_p50"] * 1e-3) / 1e12) < 1e-9
    assert len(csv.read_text().splitlines()) == len(rows) + 1
