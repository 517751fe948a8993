"""Smoke test of scripts/benchmarks/bench_channel_pruner.py: resnet18 eager
only, batch 1, one round, then --merge of its JSON. Checks that it runs, that
ours matched the masked model (the script stops otherwise), that the figures
and targets are printed and that ours and Torch-Pruning's resnet18 have the
same size; it times nothing and asserts no speed."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks" / "bench_channel_pruner.py"


def run(*args):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_bench_channel_pruner_eager_resnet18(tmp_path):
    out_file = tmp_path / "results.json"
    output = run("--models", "resnet18", "--batches", "1", "--rounds", "1", "--eager-only", "--out", str(out_file))
    results = json.loads(out_file.read_text())
    figures = results["figures"]["resnet18"]
    assert figures["diff_ours_vs_masked"] <= 1e-5
    assert figures["ours"]["multiply_adds"] < figures["dense"]["multiply_adds"] / 3
    for key in ("parameters", "multiply_adds"):
        assert figures["ours"][key] == figures["tp"][key], key
    (row,) = results["latency"]
    assert row["rounds"] == 1 and set(row["speedup"]) == {"eager ours", "eager tp"}
    assert all(t > 0 for t in row["ms"].values())
    assert output.count("| resnet18 |") == 2
    assert "target: resnet18 parameters of ours within 5% of TP's: +0.0%: met" in output

    merged = run("--merge", str(out_file), str(out_file))
    assert merged.count("| resnet18 |") == 3  # one figures row, the latency row twice
    assert "target: resnet18 batch 1: not measured (no packages)" in merged
