"""The fuzzers of tests/fuzz, CI-sized: every committed corpus
entry is replayed and each target runs a fixed number of cases with the
fixed seed, in a worker process of tests/fuzz/run_fuzz.py (so that a crash
fails a test instead of killing pytest). The long run is scripts/fuzz.sh.

Cases known to hit torch's own unpickler limits (a huge memo index, a
storage record shorter than its element count) are not run here: they can
hang for a minute or crash. test_a_crash_is_caught_and_classified runs one
of them on purpose, with a short timeout, to check that the driver survives
it and counts it as torch's."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from torch_sparsity import utils

FUZZ_DIR = Path(__file__).resolve().parents[1] / "fuzz"
RUN_FUZZ = FUZZ_DIR / "run_fuzz.py"
TARGETS = ["pickled_state", "module_utils_fqn", "set_mask"]
CI_SEED = 14
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")

CI_CASES = 250  # per target; about 60 s for all three here (2 cores), the package compile included


def corpus_files(target):
    return sorted((FUZZ_DIR / "corpus" / target).glob("*.json"))


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz")
    command = [sys.executable, str(RUN_FUZZ), "--target", "all", "--seed", str(CI_SEED), "--cases", str(CI_CASES),
               "--replay-corpus", "--skip-known-torch", "--out", str(out), "--summary-json", str(out / "ci.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    summaries = json.loads((out / "ci.json").read_text()) if (out / "ci.json").exists() else []
    return result, {s["target"]: s for s in summaries}


def test_the_ci_run_completes(ci_run):
    result, summaries = ci_run
    print(result.stdout)
    assert set(summaries) == set(TARGETS), result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("target", TARGETS)
def test_no_finding_of_ours(ci_run, target):
    result, summaries = ci_run
    summary = summaries[target]
    details = "\n".join(f"{f['owner']}: {f['detail']} ({f['file']})" for f in summary["findings"])
    assert summary["ours"] == 0, details
    assert summary["torch"] == 0, details  # the cases that could are skipped
    assert summary["cases"] == len(corpus_files(target)) + CI_CASES
    assert summary["corpus_replayed"] == len(corpus_files(target))
    assert summary["xpass"] == [], "these corpus entries' known findings are fixed: drop their xfail"


def test_the_corpus_is_small_and_readable():
    files = [f for target in TARGETS for f in corpus_files(target)]
    assert all(corpus_files(target) for target in TARGETS)
    assert sum(f.stat().st_size for f in files) < 256 * 1024
    for f in files:
        assert f.stat().st_size <= 8 * 1024, f.name
        entry = json.loads(f.read_text())
        assert entry["target"] == f.parent.name, f.name


def test_a_crash_is_caught_and_classified(tmp_path):
    """A storage record truncated below its element count makes torch's
    unpickler read past it (a crash or a hang): the driver restarts its
    worker, carries on, and counts the case as torch's, not ours."""
    corpus = tmp_path / "corpus"
    (corpus / "pickled_state").mkdir(parents=True)
    entry = FUZZ_DIR / "corpus" / "pickled_state" / "jit-bytes-truncated-storage-record.json"
    (corpus / "pickled_state" / entry.name).write_text(entry.read_text())
    well_formed = FUZZ_DIR / "corpus" / "pickled_state" / "state-well-formed-float.json"
    (corpus / "pickled_state" / "z-after.json").write_text(well_formed.read_text())
    command = [sys.executable, str(RUN_FUZZ), "--target", "pickled_state", "--cases", "0", "--replay-corpus",
               "--corpus", str(corpus), "--timeout", "5", "--no-gdb", "--out", str(tmp_path / "out"),
               "--summary-json", str(tmp_path / "s.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    summary, = json.loads((tmp_path / "s.json").read_text())
    if summary["torch"] == 0:
        pytest.skip("this torch read the truncated record without a crash or hang: " + result.stdout)
    assert summary["ours"] == 0 and summary["torch"] == 1 and summary["cases"] == 2, result.stdout
    assert summary["restarts"] == 1
    finding, = summary["findings"]
    assert "the unpickler trusts the count" in finding["detail"]


BUSY_FOR = "import time\nwhile time.process_time() < {}: pass\nprint('done', flush=True)"


@pytest.mark.parametrize("child, stopped_for, hangs", [
    ("import time; time.sleep(1.5); print('done', flush=True)", 0, False),  # slow without the CPU
    (BUSY_FOR.format(0.2), 1.5, False),  # kept off the CPU, as on a loaded machine
    (BUSY_FOR.format(1e9), 0, True),  # a busy hang
    ("import time; time.sleep(60)", 0, True),  # blocked: a hang at the wall-time cap
], ids=["sleeps", "starved", "busy-hang", "blocked-hang"])
def test_a_hang_is_cpu_time_past_the_timeout(monkeypatch, child, stopped_for, hangs):
    """A case hangs when it runs past the timeout in CPU time, not wall time
    (a case slowed down by another process on the machine is no hang), or
    past HANG_WALL_FACTOR times the timeout in wall time."""
    monkeypatch.syspath_prepend(str(FUZZ_DIR))
    import run_fuzz

    timeout = 0.4
    process = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    resume = threading.Timer(stopped_for, os.kill, (process.pid, signal.SIGCONT))
    if stopped_for:
        process.send_signal(signal.SIGSTOP)
        resume.start()
    try:
        assert run_fuzz.wait_for_line(process.stdout, process.pid, timeout) is not hangs
        assert hangs or process.stdout.readline() == "done\n"
    finally:
        resume.cancel()
        process.kill()
        process.wait()


def test_known_torch_limits_are_recognised(monkeypatch):
    """The classifier of torch's limits, on the corpus entries that expect it."""
    monkeypatch.syspath_prepend(str(FUZZ_DIR))
    import fuzz_targets as ft

    target = ft.PickledState()
    for f in corpus_files("pickled_state"):
        case = json.loads(f.read_text())
        known = target.known_torch_limit(case)
        assert bool(known) == bool(case.get("expect_known_torch")), (f.name, known)


# ------------------------------------------------------------ findings of the fuzzers


@pytest.mark.parametrize("holder, mask", [
    ("FakeStructuredSparsity", lambda: torch.ones(1).expand(4)),
    ("FakeSparsity", lambda: torch.ones(4, 1).expand(4, 3)),
])
def test_a_mask_whose_elements_share_memory_is_refused(holder, mask):
    """Fuzz finding (corpus: pickled_state/state-expanded-row-mask.json,
    set_mask/class-held-mask-expanded.json): an expanded mask was accepted,
    and update_mask then always failed with torch's internal-overlap error.
    The class refuses it up front, with its own message; an empty one,
    which update_mask can write, stays accepted."""
    cls = getattr(torch.classes.sparsity, holder)
    with pytest.raises(RuntimeError, match=rf"{holder}: mask has elements that share memory"):
        cls(mask())
    empty = cls(torch.ones(1, 0).expand(4, 0) if holder == "FakeSparsity" else torch.ones(0))
    empty.update_mask(torch.zeros(empty.mask.shape))


class _PlainSlot(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.plain(x)


@pytest.mark.parametrize("via", ["op", "python"])
def test_set_submodule_refuses_a_path_with_an_empty_piece(via):
    """Fuzz finding (corpus: module_utils_fqn/set-submodule-leading-dot.json):
    '.plain' replaced 'plain'. fqn_to_module
    gives None for a path with an empty piece, and nn.Module.set_submodule
    raises; set_submodule must refuse it and leave the parent as it was."""
    model = torch.jit.script(_PlainSlot())
    before = model._c.getattr("plain")
    new = torch.jit.script(torch.nn.Linear(2, 2))
    assert utils.fqn_to_module(model, ".plain") is None
    with pytest.raises(RuntimeError, match="starts with an empty piece"):
        if via == "op":
            torch.ops.sparsity.set_submodule(model._c, ".plain", new._c)
        else:
            utils.set_submodule(model, ".plain", new)
    assert model._c.getattr("plain") == before
