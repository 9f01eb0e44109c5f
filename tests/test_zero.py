"""ZeRO / DDP (parallel/data/zero.py, parallel/data/buckets.py, parallel/data/fsdp.py): the main test of the
issue, plus faults. One mpiexec launch per rank count N = 1..4 runs every stage 0..3 in
float64 and float32, with and without activation recomputation (full, selective), against the
single-process step, ZeRO-3's slot pool poisoned on release (tests/mpi_workers/zero_equiv.py),
and shows that the poison catches a stale read."""
import re
import time

import pytest

from mpi_util import describe, mpi_library, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_stage_equals_one_process(n):
    proc = run_mpi(n, "zero_equiv.py", timeout=240, env={"ENGINE_POOL_POISON": "1"})
    assert proc.returncode == 0, describe(proc)
    cases = [line for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert len(cases) == 2 * 12 and all(line.endswith(" ok") for line in cases), describe(proc)
    for stage in range(4):
        assert any(f"float64 stage={stage}" in line for line in cases)
        assert any(f"float32 stage={stage}" in line for line in cases)
    for mode in ("none", "full", "selective"):
        assert any(f"stage=3 accum=1 recompute={mode}" in line or f"stage=3 accum=2 recompute={mode}" in line
                   for line in cases), mode
    pool = [line for line in proc.stdout.splitlines() if line.startswith("pool ")]
    assert len(pool) == 1 and pool[0].endswith(" ok") and "with poison NaN True" in pool[0], describe(proc)
    assert "0 failures" in proc.stdout and "engine checks ok" in proc.stdout, describe(proc)


@pytest.mark.parametrize("stage", [0, 3])
def test_a_stalled_rank_is_named_by_the_watchdog(stage):
    t0 = time.monotonic()
    proc = run_mpi(3, "zero_fault.py", "stall", stage, timeout=60, env={"ENGINE_COMM_TIMEOUT": "3"})
    assert proc.returncode != 0, describe(proc)
    assert time.monotonic() - t0 < 40, "the job should end seconds after the timeout, not after the stall"
    # the watchdog's line names the stalled rank (it waits collectives/watchdog.py ABORT_GRACE
    # before MPI_Abort, so that the launcher forwards it), and names nobody else
    named = [ln for ln in proc.stderr.splitlines() if "ENGINE_COMM_TIMEOUT" in ln]
    assert named and all("rank 2 never arrived" in ln for ln in named), describe(proc)
    assert "finished" not in proc.stdout


def test_a_killed_rank_ends_the_job():
    """SIGKILL leaves the victim no chance to speak, and the launcher kills the other ranks at
    once (before their watchdog could name it): the job must end, promptly, with the
    launcher's report (MPICH's "BAD TERMINATION ... signal 9", Open MPI's "prterun noticed
    that process rank 2 ... exited on signal 9"), instead of hanging."""
    t0 = time.monotonic()
    proc = run_mpi(3, "zero_fault.py", "kill", 2, timeout=60, env={"ENGINE_COMM_TIMEOUT": "3"})
    assert proc.returncode != 0, describe(proc)
    assert time.monotonic() - t0 < 40
    assert "rank 2: kill in the middle of backward" in proc.stdout, describe(proc)
    out = proc.stdout + proc.stderr
    if mpi_library() == "openmpi":
        launcher = re.search(r"noticed that process rank 2 with PID \d+ on node \S+ exited on\s+signal 9", out)
    else:
        launcher = "BAD TERMINATION" in out and "signal 9" in out
    assert "never arrived" in out or launcher, describe(proc)
    assert "finished" not in proc.stdout
