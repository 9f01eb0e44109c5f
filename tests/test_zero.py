"""ZeRO / DDP (parallel/data/zero.py, parallel/data/buckets.py, parallel/data/fsdp.py): the main test of the
issue, plus faults. One mpiexec launch per rank count N = 1..4 runs every stage 0..3 in
float64 and float32, with and without activation recomputation (full, selective), against the
single-process step, ZeRO-3's slot pool poisoned on release (tests/mpi_workers/zero_equiv.py),
and shows that the poison catches a stale read."""
import re
import time

import pytest

from mpi_util import TRAIN, describe, losses, mpi_library, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_every_stage_equals_one_process(n):
    proc = run_mpi(n, "zero_equiv.py", timeout=240, env={"ENGINE_POOL_POISON": "1"})
    assert proc.returncode == 0, describe(proc)
    cases = [line for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert len(cases) == 2 * 14 and all(line.endswith(" ok") for line in cases), describe(proc)
    for stage in range(4):
        assert any(f"float64 stage={stage}" in line for line in cases)
        assert any(f"float32 stage={stage}" in line for line in cases)
    for mode in ("none", "full", "selective"):
        assert any(f"stage=3 accum=1 recompute={mode}" in line or f"stage=3 accum=2 recompute={mode}" in line
                   for line in cases), mode
    assert sum(" pool=resident: " in line for line in cases) == 2 * 2, describe(proc)
    pool = [line for line in proc.stdout.splitlines() if line.startswith("pool ")]
    assert len(pool) == 1 and pool[0].endswith(" ok") and "with poison NaN True" in pool[0], describe(proc)
    assert "reused {'gathered': 4, 'reused': 2}" in pool[0] and "bitwise equal True" in pool[0], describe(proc)
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


def test_recompute_refusals_name_the_problem():
    """--recompute full|selective where it is not built: one line each (train.py exits 2 on it)."""
    from parallel.config import LayoutError, ParallelConfig, check_layout
    model = dict(block_size=32, n_layer=2, n_head=2, n_embd=32)
    bad = [(dict(pp=2, zero=1), {}, "--recompute full with --pp 2 is not supported yet"),
           (dict(sp=2), {}, "--recompute full with --sp 2 is not supported yet"),
           (dict(tp=2), {}, "--recompute full with --tp 2 is not supported yet"),
           (dict(), dict(reversible=True), "the reversible stack recomputes every layer already")]
    for par, extra, msg in bad:
        with pytest.raises(LayoutError, match=re.escape(msg)):
            check_layout(ParallelConfig(recompute="full", **par), dict(model, **extra), 8)
    with pytest.raises(LayoutError, match="--recompute selective needs a GPT without Terraformer layers"):
        check_layout(ParallelConfig(recompute="selective"), dict(model, attention="lsh"), 8)
    for mode in ("none", "full", "selective"):
        check_layout(ParallelConfig(dp=2, zero=3, recompute=mode), model, 8)   # accepted at every stage


def test_train_takes_the_recompute_flag(corpus, tmp_path):
    """train.py --dp 2 --zero 3 --recompute full (the pool poisoned) logs the losses of
    --recompute none: the flag reaches the engine, and the banner says so."""
    tiny = ["--data", corpus, "--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16",
            "--batch-size", "4", "--eval-iters", "1", "--eval-interval", "0", "--dtype", "float64", "--max-steps", "2",
            "--ckpt-interval", "0", "--dp", "2", "--zero", "3", "--dropout", "0.1"]
    got = {}
    for mode in ("none", "full"):
        proc = run_mpi(2, TRAIN, *tiny, "--recompute", mode, "--out-dir", tmp_path / mode,
                       "--metrics", tmp_path / f"{mode}.jsonl", timeout=120, env={"ENGINE_POOL_POISON": "1"})
        assert proc.returncode == 0, describe(proc)
        assert ("recompute full" in proc.stdout) == (mode == "full"), describe(proc)
        got[mode] = losses(tmp_path / f"{mode}.jsonl")
    assert sorted(got["full"]) == [1, 2]
    for step, (loss, _) in got["none"].items():
        assert abs(got["full"][step][0] - loss) <= 1e-10 * abs(loss), (step, got)
