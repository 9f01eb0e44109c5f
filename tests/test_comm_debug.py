"""No silent failure: ENGINE_COMM_DEBUG names mismatching ranks, the ENGINE_COMM_TIMEOUT watchdog
aborts a job in which a rank never arrives (naming it), ENGINE_TRACE prints every message."""
import time

from mpi_util import describe, run_mpi


def test_debug_names_the_mismatching_rank():
    proc = run_mpi(3, "debug_worker.py", "mismatch", env={"ENGINE_COMM_DEBUG": "1"}, timeout=60)
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    for r in range(3):
        assert out.count(f"rank {r} caught:") == 6 and f"rank {r} done" in out, describe(proc)
    rd = "algo=recursive_doubling"
    expected = [
        f"ranks 0,1 called call #0 all_reduce(count=4, dtype=float64, op=sum, {rd}); "
        f"but rank 2 called call #0 all_reduce(count=5, dtype=float64, op=sum, {rd})",
        f"but rank 2 called call #1 all_reduce(count=4, dtype=float32, op=sum, {rd})",
        f"but rank 2 called call #2 all_reduce(count=4, dtype=float64, op=max, {rd})",
        "but rank 2 called call #3 barrier(algo=dissemination)",
        "ranks 0,1 called call #4 broadcast(count=4, dtype=float64, root=0, algo=tree); "
        "but rank 2 called call #4 broadcast(count=4, dtype=float64, root=1, algo=tree)",
        "ranks 0,1 called call #5 barrier(algo=dissemination); "
        "but rank 2 called call #5 barrier(algo=dissemination, async_op=True)",
    ]
    for text in expected:
        assert out.count(text) == 3, f"{text!r} not reported by every rank\n" + describe(proc)


def test_watchdog_aborts_and_names_the_missing_rank():
    start = time.monotonic()
    proc = run_mpi(3, "debug_worker.py", "skip", env={"ENGINE_COMM_TIMEOUT": "2"}, timeout=50)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, describe(proc)
    assert elapsed < 30, f"took {elapsed:.1f} s: the watchdog did not stop the job\n" + describe(proc)
    assert "ENGINE_COMM_TIMEOUT: rank 2 never arrived at call #1 all_reduce" in proc.stdout + proc.stderr, \
        describe(proc)
    assert "passed the skipped collective" not in proc.stdout, describe(proc)


def test_trace_prints_rank_peer_op_bytes():
    proc = run_mpi(2, "debug_worker.py", "trace", env={"ENGINE_TRACE": "1"}, timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert "[trace] rank 0 -> 1 send all_reduce/ring" in proc.stderr and "8 B" in proc.stderr, describe(proc)
    assert "[trace] rank 1 <- 0 irecv p2p tag=0 16 B" in proc.stderr, describe(proc)
