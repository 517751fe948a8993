"""Smoke tests of the GPU benchmarks on the CPU (their --device cpu), so
that what a GPU session runs has run before: scripts/benchmarks/bench_gpu.py
(the operator against `mask * x`, its bitwise check, the JSON the issue asks
for) and scripts/benchmarks/bench_gpu_train.py (a small resnet18 training
step, batch 8, 64 x 64, of every default variant, the export-target model
under torch.compile included). They check that the scripts' own checks
passed and what the JSON holds; they assert no speed."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"
SCRIPT = BENCHMARKS / "bench_gpu_train.py"


def test_bench_gpu_checks_and_reports_every_row(tmp_path):
    report_file = tmp_path / "bench_gpu.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--device", "cpu", "--sizes", "12", "14", "--runs", "3",
         "--check", "--commit", "abc123", "--json", str(report_file)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["device_name"] == "CPU" and report["commit"] == "abc123" and report["torch"]
    assert report["check"]["ok"] and report["check"]["cases"] > 1000
    rows = {(row["elements"], row["case"], row["mask"]): row for row in report["rows"]}
    for elements in (1 << 12, 1 << 14):
        assert rows[(elements, "copy y.copy_(x)", None)]["of_copy"] == 1.0
        for mask in ("float32", "bool", "uint8"):
            ours, theirs = rows[(elements, "fake_sparsity", mask)], rows[(elements, "mask * x", mask)]
            assert ours["ms"] > 0 and ours["vs_same_mask"] > 0 and ours["vs_float_mask"] > 0
            assert theirs["vs_same_mask"] == 1.0
    assert len(rows) == 2 * 7


def test_bench_gpu_train_runs_and_checks_every_variant(tmp_path):
    report_file = tmp_path / "train.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--batch", "8", "--image-size", "64", "--rounds", "2",
         "--warmup", "1", "--budget", "1", "--commit", "abc123", "--json", str(report_file)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["device_name"] == "CPU" and report["commit"] == "abc123"
    assert report["torch"] and report["model"] == "resnet18" and report["batch"] == 8
    variants = ["eager", "scripted", "export", "export-compiled"]
    assert report["check"]["ok"] and list(report["check"]["variants"]) == variants
    for figures in report["check"]["variants"].values():
        assert figures["problems"] == [] and figures["update_relative_diff"] <= 0.05
    assert [row["variant"] for row in report["rows"]] == variants
    assert all(row["step_ms"] > 0 and row["vs_eager"] > 0 for row in report["rows"])
    assert report["rows"][0]["vs_eager"] == 1.0
    assert "export-compiled" in result.stdout and "vs eager" in result.stdout


def test_bench_gpu_train_refuses_unknown_variants():
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--variants", "eager,jitted"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown ['jitted']" in result.stderr
