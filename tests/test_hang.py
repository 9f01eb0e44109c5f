"""No hang: a rank stopped (SIGSTOP) in any kind of wait ends the job within the timeout plus
a few seconds, with one ENGINE_COMM_TIMEOUT line that names the stopped rank as missing and a
rank that waited for it -- never a healthy rank that was itself waiting (collectives/watchdog.py).
One launch per kind of wait: a collective's algorithm step, a pipeline receive (train.py
--pp 2), a ring attention receive (--sp 2), a non-blocking handle's wait, and dp2 x pp2 with
world rank 2 stopped from outside, at a random point, from the "pids:" line train.py prints."""
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from mpi_util import ROOT, TRAIN, describe, launch, mpi_library

TIMEOUT = 4
SLACK = 6            # the answer grace, the notice grace, the pause before MPI_Abort, the teardown
TINY = ["--n-layer", "2", "--n-embd", "16", "--n-head", "2", "--block-size", "16", "--batch-size", "4",
        "--max-steps", "1000", "--eval-interval", "0", "--ckpt-interval", "0", "--mem-trace-interval", "1000",
        "--comm-timeout", str(TIMEOUT)]
LINE = re.compile(r"ENGINE_COMM_TIMEOUT: rank (\d+)(?: \(world rank (\d+)\))? never arrived at (.*) on communicator "
                  r"'([^']*)' \(size \d+\): rank (\d+)(?: \(world rank (\d+)\))? waited")


def reports(stderr):
    """[(missing world rank, what, communicator label, waiting world rank)] of the timeout lines,
    asserting that each is one (stderr may interleave lines of several ranks)."""
    lines = re.findall(r"ENGINE_COMM_TIMEOUT:.*?aborting the job", stderr)
    out = []
    for ln in lines:
        m = LINE.match(ln)
        assert m, f"unexpected report: {ln}"
        missing = int(m.group(2) or m.group(1))
        waiter = int(m.group(6) or m.group(5))
        out.append((missing, m.group(3), m.group(4), waiter))
    return out


def waits(what):
    """The waits that may be named for `what`: a point-to-point wait is the receive from the
    stopped rank, or under Open MPI also the send to it, which its shared-memory transport
    sends by rendezvous past the 4 KiB eager limit (ring attention's K/V blocks are 4 KiB)."""
    return (what, "send(") if what == "recv(" and mpi_library() == "openmpi" else (what,)


def check(proc, elapsed, victim, what, label):
    assert proc.returncode != 0, describe(proc)
    assert elapsed < TIMEOUT + SLACK, f"ended {elapsed:.1f} s after the stop\n" + describe(proc)
    got = reports(proc.stderr)
    assert len(got) == 1, describe(proc)                         # one line, and a true one
    missing, at, comm, waiter = got[0]
    assert missing == victim and waiter != victim, describe(proc)
    assert at.startswith(waits(what)) and comm == label, describe(proc)


class Launch:
    """mpiexec -n n python SCRIPT args, its stdout read line by line as it comes: `until(text)`
    returns the first line containing text; `finish()` the CompletedProcess-like result."""

    def __init__(self, n, script, *args):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        for key in ("ENGINE_COMM_DEBUG", "ENGINE_COMM_TIMEOUT", "ENGINE_TRACE"):
            env.pop(key, None)
        self.p = subprocess.Popen([*launch(n), sys.executable, script, *map(str, args)], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out, self.err = [], []
        threading.Thread(target=lambda: self.err.extend(self.p.stderr), daemon=True).start()

    def until(self, text, times=1):
        for line in self.p.stdout:
            self.out.append(line)
            if text in line:
                times -= 1
                if times == 0:
                    return line
        raise AssertionError(f"{text!r} never printed\n" + "".join(self.out[-20:]) + "".join(self.err[-20:]))

    def finish(self, timeout):
        """Wait for the job to end (killing it past timeout); (proc, seconds it took)."""
        t0 = time.monotonic()
        reader = threading.Thread(target=lambda: self.out.extend(self.p.stdout), daemon=True)
        reader.start()
        try:
            self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        elapsed = time.monotonic() - t0
        reader.join(5)
        time.sleep(0.2)
        return subprocess.CompletedProcess(self.p.args, self.p.returncode, "".join(self.out), "".join(self.err)), elapsed


@pytest.mark.parametrize("n,args,method,count,what,label", [
    (2, ["--dp", "2"], "transport.sendrecv", 40, "call #", "dp x sp"),   # a collective, stopped mid-algorithm
    (2, ["--pp", "2"], "p2p.irecv", 20, "recv(", "pp"),               # point-to-point: the pipeline
    (2, ["--sp", "2"], "p2p.irecv", 60, "recv(", "sp"),               # the ring of ring attention
], ids=["collective", "pipeline", "ring"])
def test_a_stopped_rank_ends_the_job_naming_it(tmp_path, n, args, method, count, what, label):
    job = Launch(n, os.path.join(ROOT, "tests", "mpi_workers", "hang_worker.py"), "train", 1, method, count,
                 *TINY, *args, "--out-dir", tmp_path / "out")
    job.until(f"world rank 1 stops at {method.split('.')[1]} #{count}")
    proc, elapsed = job.finish(TIMEOUT + SLACK + 20)
    check(proc, elapsed, 1, what, label)


def test_a_stopped_handle_wait_ends_the_job():
    job = Launch(2, os.path.join(ROOT, "tests", "mpi_workers", "hang_worker.py"), "handle", TIMEOUT)
    job.until("rank 1 stops after the handshake")
    proc, elapsed = job.finish(TIMEOUT + SLACK + 20)
    check(proc, elapsed, 1, "call #0 all_reduce/ring", "world")
    assert "passed the wait" not in proc.stdout, describe(proc)


def test_dp2_pp2_names_only_the_stopped_rank(tmp_path):
    """World rank 2 (stage 1 of replica 0) stopped from outside: world rank 0 waits for it in a
    pipeline receive, world rank 1 waits for rank 0 in the dp all-reduce. The one report names
    rank 2; rank 0, which was waiting, is never named."""
    job = Launch(4, TRAIN, *TINY, "--dp", "2", "--pp", "2", "--out-dir", tmp_path / "out")
    pids = {int(r): int(p) for r, p in re.findall(r"rank (\d+)=(\d+)", job.until("pids:"))}
    job.until("step", times=5)
    os.kill(pids[2], signal.SIGSTOP)
    try:
        proc, elapsed = job.finish(TIMEOUT + SLACK + 20)
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0, describe(proc)
    assert elapsed < TIMEOUT + SLACK, f"ended {elapsed:.1f} s after the stop\n" + describe(proc)
    got = reports(proc.stderr)
    assert len(got) == 1 and got[0][0] == 2 and got[0][3] != 2, describe(proc)
