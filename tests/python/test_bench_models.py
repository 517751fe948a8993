"""Smoke test of scripts/benchmarks/bench_models.py: --quick on resnet18 at batch 1 with
a batch-2 training step. Checks that it runs, that the variants' outputs
matched (the script stops otherwise) and that the tables are printed; it
times nothing and asserts no speed."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks" / "bench_models.py"


def table_rows(output: str, first_cell: str):
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in output.splitlines()
        if line.startswith(f"| {first_cell} |")
    ]


def test_bench_models_quick(tmp_path):
    out_file = tmp_path / "tables.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "resnet18", "--batches", "1", "--out", str(out_file)],
        capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout
    assert "max |output - eager output|" in output

    rows = table_rows(output, "resnet18")
    inference = [r for r in rows if len(r) == 11]
    assert len(inference) == 1 and inference[0][1] == "1"
    diffs = [float(d) for d in inference[0][9].split(" / ")]
    assert len(diffs) == 3 and all(d <= 1e-4 for d in diffs)
    assert all(float(v) > 0 for v in inference[0][2:9])  # times and ratios

    memory = {r[1]: r for r in rows if r[1] in ("eager", "traced", "scripted", "squashed")}
    assert set(memory) == {"eager", "traced", "scripted", "squashed"}
    assert float(memory["scripted"][3]) > 0  # masks
    assert float(memory["squashed"][3]) == 0  # no masks left
    assert float(memory["squashed"][2]) < float(memory["scripted"][2])
    assert memory["scripted"][4] != "-"  # the cache's size is reported

    training = [r for r in rows if len(r) == 7 and r[1] == "2"]
    assert len(training) == 1 and float(training[0][5]) <= 1e-4  # same state after one step

    assert "Targets:" in output
    assert out_file.read_text().count("| resnet18 |") == len(rows)
