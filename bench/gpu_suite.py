"""Running the GPU check's steps under time budgets (bench/gpu_check.py), and its test-suite step:
the test files split over a few pytest processes that share the GPU, their summaries summed.

Each step runs in its own process group with its output in a log; past its budget it gets SIGINT
(pytest then still prints the counts of what it ran), 15 s later SIGKILL. Test files go to workers
longest first by size (a stand-in for run time; LPT scheduling, Graham 1969: within 4/3 of the
best split), so one long file does not hold up the budget. pytest's last line ("3 failed, 120
passed, 5 skipped in 100.2s") gives the counts.
"""
import glob
import os
import re
import signal
import subprocess
import sys
import time

COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")


class Row(dict):
    """One line of the summary: check, status (PASS, FAIL, TIMEOUT, MISSING), goal, result."""

    def __init__(self, check, status, result, goal, **more):
        super().__init__(check=check, status=status, result=result, goal=goal, **more)


def start(cmd, env, cwd, log):
    """Start cmd in its own process group, stdout and stderr to the file ``log``."""
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def finish(p, deadline):
    """Wait for p until ``deadline`` (perf_counter); then SIGINT, 15 s later SIGKILL, to its group.
    Returns (return code, timed out)."""
    try:
        return p.wait(timeout=max(deadline - time.perf_counter(), 0.1)), False
    except subprocess.TimeoutExpired:
        pass
    for sig, grace in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
            return p.wait(timeout=grace), True
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
    return -9, True


def run_logged(cmd, env, cwd, timeout, log):
    """(return code, seconds, timed out) of cmd run with a budget of ``timeout`` seconds."""
    t0 = time.perf_counter()
    rc, timed_out = finish(start(cmd, env, cwd, log), t0 + timeout)
    return rc, time.perf_counter() - t0, timed_out


def parse_pytest(text):
    """({passed, failed, skipped, errors, ...} of pytest's final summary line, or None if it printed
    none; the test ids it listed as FAILED or ERROR)."""
    summary = [s for s in text.splitlines() if COUNT.search(s) and re.search(r" in [\d.]+s", s)]
    counts = None
    if summary:
        counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
        for n, kind in COUNT.findall(summary[-1]):
            counts["errors" if kind.startswith("error") else kind] = int(n)
    failed = [s.split()[1] for s in text.splitlines() if s.startswith(("FAILED ", "ERROR ")) and len(s.split()) > 1]
    return counts, failed


def split_files(files, workers):
    """Lists of files for at most ``workers`` processes, balanced by file size (longest first)."""
    groups = [[] for _ in range(max(1, min(workers, len(files))))]
    load = [0] * len(groups)
    for f in sorted(files, key=lambda f: -os.path.getsize(f)):
        i = load.index(min(load))
        groups[i].append(f)
        load[i] += os.path.getsize(f)
    return groups


SELF_TEST = "tests/test_gpu_check.py"     # runs this check itself (emulated): CI's test, not the GPU's


def suite_files(repo):
    """Every tests/test_*.py of the checkout but SELF_TEST, relative to ``repo``."""
    found = (os.path.relpath(f, repo) for f in glob.glob(os.path.join(repo, "tests", "test_*.py")))
    return sorted(f for f in found if f != SELF_TEST)


def run_suite(files, env, repo, budget, out, workers):
    """The suite's row: PASS when every worker finished within ``budget`` s with tests passed and
    no failure or error. ``files`` None: suite_files(repo)."""
    files = files or suite_files(repo)
    groups = split_files([os.path.join(repo, f) for f in files], workers)
    t0 = time.perf_counter()
    procs = [(os.path.join(out, f"suite_{i}.log"), g) for i, g in enumerate(groups)]
    procs = [(log, start([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *g], env, repo, log))
             for log, g in procs]
    done = [(log, *finish(p, t0 + budget)) for log, p in procs]
    total = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed, problems = [], []
    for log, rc, _ in done:
        with open(log, errors="replace") as f:
            counts, names = parse_pytest(f.read())
        failed += names
        if counts is None:
            problems.append(f"{os.path.basename(log)}: no pytest summary (rc {rc})")
            continue
        for k in total:
            total[k] += counts[k]
    secs = time.perf_counter() - t0
    interrupted = sum(t for _, _, t in done)
    result = (f"{total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped, "
              f"{total['errors']} errors in {secs:.0f} s ({len(groups)} worker{'s' * (len(groups) > 1)})")
    if interrupted:
        result += f"; {interrupted} interrupted at the {budget:.0f} s budget"
    result += "".join(f"; {s}" for s in problems)
    clean = not (problems or total["failed"] or total["errors"]) and total["passed"] > 0
    status = "TIMEOUT" if interrupted else "PASS" if clean else "FAIL"
    return Row("suite", status, result, "no failure or error", counts=total, failed_tests=failed[:50],
               seconds=round(secs, 1), files=len(files))
