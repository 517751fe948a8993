#!/usr/bin/env python3
"""Runs the fuzz targets of fuzz_targets.py and saves what they find.

    run_fuzz.py [--target all|pickled_state|module_utils_fqn|set_mask]
                [--seed 14] (--cases N | --seconds S) [--out DIR]
                [--replay-corpus] [--skip-known-torch] [--timeout 10]
    run_fuzz.py --run-case FILE       # one case (a corpus entry or a finding), in this process

Case i of a target is drawn from random.Random(f"{seed}:{target}:{i}") (and
the committed corpus, which it may start from and mutate), so a run is
reproducible from (seed, target, number of cases) and any one case from
(seed, target, i). --seconds S is the total for all targets, split evenly
(each target's setup included: the AOTInductor package of set_mask takes
about 15 s to compile).

Cases run in a worker process, which writes each case to
OUT/<target>/current.json before running it. A worker that dies by a signal
or hangs is replaced, and the case is saved as a finding under
OUT/findings/<target>/ (a .json file with the case and what happened; the
case alone, ready to become a corpus entry, in the .case.json file next to
it). Oracle violations reported by the worker are saved the same way. A case
hangs when it has run past --timeout in both wall and CPU time (so that a
loaded machine does not turn a slow case into a hang), or past
HANG_WALL_FACTOR times --timeout in wall time alone (a case blocked without
using the CPU); where /proc gives no CPU time, past --timeout in wall time.

Findings are "ours" or "torch": a crash or hang of a case that hits one of
torch's known limits (a huge memo index, a storage element count larger than
its record; fuzz_targets.known_torch_limit_of_jit_archive) is torch's; so is
one whose backtrace, under gdb (when gdb is installed), has no frame of the
plugin, for the archive cases, which go through torch's unpickler first.
Everything else is ours. --skip-known-torch does not run the cases known to
hit torch's limits (the CI run): they may hang for a minute or crash.

Prints one line per target: cases run, findings (ours / torch's), seconds;
writes OUT/summary.json. Exits 1 when there is a finding of ours.
"""

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS_DIR = os.path.join(HERE, "corpus")
TARGETS = ["pickled_state", "module_utils_fqn", "set_mask"]
WORKER_SETUP_TIMEOUT = 600  # seconds: importing torch, scripting, compiling the AOTInductor package
HANG_WALL_FACTOR = 6


def cpu_seconds(pid):
    """The CPU time (user and system, all threads) of a process, or None
    where /proc does not give it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_for_line(stream, pid, timeout):
    """Whether ``stream`` has a line to read (or its end: the process died)
    before the process hangs (see the module docstring)."""
    started, cpu_at_start = time.monotonic(), cpu_seconds(pid)
    wall_cap = timeout if cpu_at_start is None else HANG_WALL_FACTOR * timeout
    while True:
        wall = time.monotonic() - started
        if wall >= wall_cap:
            return False
        if wall >= timeout:
            cpu = cpu_seconds(pid)
            if cpu is None or cpu - cpu_at_start >= timeout:
                return False
        ready, _, _ = select.select([stream], [], [], min(0.25, wall_cap - wall))
        if ready:
            return True


def load_corpus(corpus_dir, target):
    """The committed corpus entries of a target, in file-name order, each
    with its file name in "_file"."""
    folder = os.path.join(corpus_dir, target)
    entries = []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                entries.append(dict(json.load(f), _file=name))
    return entries


# ------------------------------------------------------------------ worker


def worker_main(args):
    """Reads requests (one JSON object a line) on stdin, answers each on the
    original stdout; everything else the process prints goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.path.insert(0, HERE)
    import torch_sparsity  # noqa: F401  (loads the plugin)
    import fuzz_targets as ft

    target = ft.make_target(args.worker, args.workdir)
    corpus = load_corpus(args.corpus, args.worker)
    current = os.path.join(args.workdir, args.worker, "current.json")
    os.makedirs(os.path.dirname(current), exist_ok=True)
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if "index" in request:
            case = target.generate(random.Random(f"{args.seed}:{args.worker}:{request['index']}"), corpus)
            for key in ("_file", "xfail", "expect_known_torch", "comment"):  # what a corpus entry says of itself
                case.pop(key, None)
        else:
            case = request["case"]
        answer = run_one(ft, target, case, current, args.skip_known_torch)
        answer.update(index=request.get("index"), file=request.get("file"))
        protocol.write(json.dumps(answer) + "\n")


def run_one(ft, target, case, current_path, skip_known_torch):
    """Runs one case after writing it to current_path: {"status": "ok" |
    "violation" | "skipped_torch", "detail", "known_torch", "case"}."""
    known = target.known_torch_limit(case)
    with open(current_path, "w") as f:
        json.dump({"case": case, "known_torch": known}, f)
    answer = {"case": case, "known_torch": known}
    expected_known = case.get("expect_known_torch")
    if expected_known is not None and bool(known) != bool(expected_known):
        return dict(answer, status="violation",
                    detail=f"known_torch_limit gives {known!r}, but the corpus entry expects {expected_known!r}")
    if known and skip_known_torch:
        return dict(answer, status="skipped_torch", detail=known)
    try:
        answer = dict(answer, status="ok", detail=target.run(case))
    except ft.Violation as violation:
        known_name = ft.known_finding(str(violation))
        answer = dict(answer, status="known" if known_name else "violation", detail=str(violation), known=known_name)
    except Exception as error:  # escaped the oracle: a harness bug or ours, to look at
        answer = dict(answer, status="violation", detail=f"the oracle itself raised {type(error).__name__}: {ft.short(error)}")
    if case.get("xfail") and answer["status"] == "ok":
        answer.update(status="xpass", detail=f"the known finding {case['xfail']!r} no longer shows: drop the entry's xfail")
    return answer


def run_case_main(args):
    """--run-case FILE: one case in this process (for a person, or for gdb)."""
    sys.path.insert(0, HERE)
    import torch_sparsity  # noqa: F401
    import fuzz_targets as ft

    with open(args.run_case) as f:
        entry = json.load(f)
    case = entry.get("case", entry)
    workdir = args.workdir or tempfile.mkdtemp(prefix="fuzz-case-")
    target = ft.make_target(case["target"], workdir)
    if args.alarm:
        signal.alarm(args.alarm)  # a hang ends by SIGALRM, where gdb stops to take the backtrace
    answer = run_one(ft, target, case, os.path.join(workdir, "current.json"), False)
    signal.alarm(0)
    print(json.dumps({k: v for k, v in answer.items() if k != "case"}))
    return 1 if answer["status"] == "violation" else 0


# ------------------------------------------------------------------ parent


class Worker:
    def __init__(self, target, args, log):
        command = [sys.executable, os.path.abspath(__file__), "--worker", target, "--seed", str(args.seed),
                   "--workdir", args.out, "--corpus", args.corpus]
        if args.skip_known_torch:
            command.append("--skip-known-torch")
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                        text=True, start_new_session=True, bufsize=1)
        self.answer(WORKER_SETUP_TIMEOUT, what="setup")

    def answer(self, timeout, what="case"):
        """The next line of the worker, or None when it died or hung (its
        setup: ran past timeout in wall time)."""
        if what == "setup":
            ready = select.select([self.process.stdout], [], [], timeout)[0]
        else:
            ready = wait_for_line(self.process.stdout, self.process.pid, timeout)
        line = self.process.stdout.readline() if ready else ""
        if not line:
            if what == "setup":
                self.stop()
                raise RuntimeError(f"the fuzz worker did not start (exit status {self.process.returncode}); see its log")
            return None
        return json.loads(line)

    def ask(self, request, timeout):
        try:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return None
        return self.answer(timeout)

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def gdb_backtrace(case_file, args, timeout_s):
    """The backtraces of the case rerun under gdb, or None without gdb."""
    gdb = shutil.which("gdb")
    if gdb is None or args.no_gdb:
        return None
    command = [gdb, "-q", "-batch", "-ex", "set pagination off", "-ex", "handle SIGALRM stop print nopass",
               "-ex", "handle SIGPIPE nostop noprint pass", "-ex", "run", "-ex", "thread apply all bt 40",
               "--args", sys.executable, os.path.abspath(__file__), "--run-case", case_file,
               "--alarm", str(int(timeout_s)), "--workdir", args.out]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 240)
    except subprocess.TimeoutExpired:
        return "gdb timed out"
    return result.stdout[-20000:] + result.stderr[-4000:]


def owner_of(case, known_torch, backtrace):
    """ours or torch (see the module docstring)."""
    if known_torch:
        return "torch"
    archive_case = case.get("target") == "pickled_state"
    if archive_case and backtrace and "#0" in backtrace and not re.search(r"sparsity::|libtorch_sparsity", backtrace):
        return "torch"
    return "ours"


def save_finding(args, target, index, case, owner, outcome, detail, known_torch, backtrace):
    folder = os.path.join(args.out, "findings", target)
    os.makedirs(folder, exist_ok=True)
    stem = f"{owner}-{outcome}-{index if index is not None else 'corpus'}"
    case = {k: v for k, v in case.items() if k != "_file"}
    record = {"owner": owner, "outcome": outcome, "detail": detail, "known_torch": known_torch,
              "seed": args.seed, "index": index, "case": case, "backtrace": backtrace}
    with open(os.path.join(folder, stem + ".json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(folder, stem + ".case.json"), "w") as f:
        json.dump(case, f, indent=1)
    return os.path.join(folder, stem + ".json")


def signature(detail: str) -> str:
    """A finding's detail without numbers, to count distinct findings."""
    return re.sub(r"\d+", "N", detail.split("\n")[0])[:160]


def fuzz_target(target, args, deadline):
    """Runs a target's cases; returns its summary."""
    started = time.monotonic()
    summary = {"target": target, "cases": 0, "corpus_replayed": 0, "ours": 0, "torch": 0, "skipped_known_torch": 0,
               "known_torch_ran": 0, "known_ours": 0, "xpass": [], "restarts": 0, "distinct_ours": [], "findings": []}
    os.makedirs(os.path.join(args.out, target), exist_ok=True)
    log = open(os.path.join(args.out, target, "worker.log"), "a")
    worker = Worker(target, args, log)
    requests = [{"case": entry, "file": entry["_file"]} for entry in load_corpus(args.corpus, target)] \
        if args.replay_corpus else []
    index = 0

    def next_request():
        nonlocal index
        if requests:
            return requests.pop(0)
        if args.cases is not None and index >= args.cases:
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return None
        index += 1
        return {"index": index - 1}

    while True:
        request = next_request()
        if request is None:
            break
        summary["cases"] += 1
        summary["corpus_replayed"] += "file" in request
        answer = worker.ask(request, args.timeout)
        if answer is None:  # died or hung: the case is in current.json
            hung = worker.process.poll() is None
            worker.stop()
            code = worker.process.returncode
            outcome = "hang" if hung else (f"signal-{signal.Signals(-code).name}" if code < 0 else f"exit-{code}")
            with open(os.path.join(args.out, target, "current.json")) as f:
                current = json.load(f)
            case, known = current["case"], current["known_torch"]
            case_file = os.path.join(args.out, target, f"crashed-{index}.json")
            with open(case_file, "w") as f:
                json.dump(case, f)
            backtrace = None if known else gdb_backtrace(case_file, args, args.timeout)
            owner = owner_of(case, known, backtrace)
            detail = f"{outcome}" + (f" ({known})" if known else "")
            path = save_finding(args, target, request.get("index"), case, owner, outcome, detail, known, backtrace)
            summary[owner] += 1
            summary["findings"].append({"owner": owner, "outcome": outcome, "detail": detail, "file": path,
                                        "corpus_file": request.get("file")})
            if owner == "ours" and signature(detail) not in summary["distinct_ours"]:
                summary["distinct_ours"].append(signature(detail))
            summary["restarts"] += 1
            worker = Worker(target, args, log)
            continue
        if answer["status"] == "skipped_torch":
            summary["skipped_known_torch"] += 1
        elif answer["status"] == "known":
            summary["known_ours"] += 1
        elif answer["status"] == "xpass":
            summary["xpass"].append(request.get("file"))
        elif answer["known_torch"]:
            summary["known_torch_ran"] += 1
        if answer["status"] == "violation":
            path = save_finding(args, target, answer.get("index"), answer["case"], "ours", "violation",
                                answer["detail"], answer["known_torch"], None)
            summary["ours"] += 1
            summary["findings"].append({"owner": "ours", "outcome": "violation", "detail": answer["detail"],
                                        "file": path, "corpus_file": request.get("file")})
            if signature(answer["detail"]) not in summary["distinct_ours"]:
                summary["distinct_ours"].append(signature(answer["detail"]))
    worker.stop()
    log.close()
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["generated"] = index
    return summary


def summary_line(s) -> str:
    return (f"{s['target']}: {s['cases']} cases ({s['corpus_replayed']} corpus entries, {s['generated']} generated, "
            f"seed {s['seed']}), findings: ours {s['ours']}, torch {s['torch']} "
            f"(known torch limits: {s['skipped_known_torch']} skipped, {s['known_torch_ran']} run; "
            f"known findings of ours, reported: {s['known_ours']}"
            + (f"; xfail corpus entries that now pass: {', '.join(s['xpass'])}" if s["xpass"] else "")
            + f"), {s['restarts']} worker restarts, {s['seconds']} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="all", help="all, or one of " + ", ".join(TARGETS))
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--cases", type=int, help="generated cases per target")
    parser.add_argument("--seconds", type=float, help="wall time for all targets together, split evenly")
    parser.add_argument("--out", help="where findings and logs go (default: a new temporary folder)")
    parser.add_argument("--corpus", default=CORPUS_DIR)
    parser.add_argument("--replay-corpus", action="store_true", help="run every corpus entry first")
    parser.add_argument("--skip-known-torch", action="store_true", help="do not run cases known to hit torch's limits")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help=f"seconds per case, of CPU time (and at most {HANG_WALL_FACTOR} times that of wall time)")
    parser.add_argument("--no-gdb", action="store_true", help="do not rerun crashes under gdb for a backtrace")
    parser.add_argument("--summary-json", help="also write the summaries here")
    parser.add_argument("--run-case", help=argparse.SUPPRESS)
    parser.add_argument("--alarm", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        return worker_main(args)
    if args.run_case:
        return run_case_main(args)
    targets = TARGETS if args.target == "all" else [args.target]
    if any(t not in TARGETS for t in targets):
        parser.error(f"--target: one of all, {', '.join(TARGETS)}")
    if args.cases is None and args.seconds is None:
        parser.error("give --cases N or --seconds S")
    args.out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="torch-sparsity-fuzz-"))
    os.makedirs(args.out, exist_ok=True)
    print(f"fuzzing {', '.join(targets)} (seed {args.seed}); findings and logs in {args.out}", flush=True)
    summaries = []
    started = time.monotonic()
    for n, target in enumerate(targets):
        deadline = None
        if args.seconds is not None:
            share = (args.seconds - (time.monotonic() - started)) / (len(targets) - n)
            deadline = time.monotonic() + share
        summary = fuzz_target(target, args, deadline)
        summary["seed"] = args.seed
        summaries.append(summary)
        print(summary_line(summary), flush=True)
        for finding in summary["findings"]:
            print(f"  {finding['owner']}: {finding['detail'][:200]}  ->  {finding['file']}", flush=True)
    total = {key: sum(s[key] for s in summaries) for key in ("cases", "ours", "torch")}
    print(f"total: {total['cases']} cases, findings: ours {total['ours']}, torch {total['torch']}, "
          f"{time.monotonic() - started:.1f} s", flush=True)
    for path in [os.path.join(args.out, "summary.json")] + ([args.summary_json] if args.summary_json else []):
        with open(path, "w") as f:
            json.dump(summaries, f, indent=1)
    return 1 if total["ours"] or any(s["xpass"] for s in summaries) else 0


if __name__ == "__main__":
    sys.exit(main())
