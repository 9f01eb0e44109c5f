"""Training that survives dead ranks (python -m elastic, elastic/supervisor.py; buddy replicas,
parallel/checkpoint/replicas.py and recover.py), held to the invariant: ranks killed (SIGKILL) or
stopped (SIGSTOP) at a seeded random step, the supervisor relaunches on the survivors, and the
losses after the recovery point equal, within 1e-10 (float64, dropout on), those of a clean run
resumed at the new layout from the same step. Faults come from tests/mpi_workers/train_faults.py.

Cases: dp4 losing one rank (-> dp3); dp2 x pp2 losing a stage rank (-> dp1 x pp2); ZeRO 3 losing
a shard whose buddy lived; two failures in a row; a failure during the recovery; a rank and its
buddy lost together (both copies: the disk checkpoint, said so); a stuck rank. Every launch is
bounded by the watchdog (--comm-timeout) and the subprocess timeout.
"""
import os
import random
import re
import shlex
import subprocess
import sys

import pytest

from elastic_cases import LAYOUTS, TINY, CleanRuns, assert_losses_after, dp_of, write_corpus
from mpi_util import ROOT, describe, launcher, run_mpi

FAULTS = os.path.join(ROOT, "tests", "mpi_workers", "train_faults.py")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus):
    return CleanRuns(tmp_path_factory, corpus, lambda n, *args: run_mpi(n, *args, timeout=180))


def elastic(tmp_path, corpus, layout, faults, *extra, ckpt=100, timeout=240):
    """python -m elastic -n 4 on train_faults.py with ENGINE_FAULTS=faults: the process."""
    env = dict(os.environ, ENGINE_FAULTS=faults, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for key in ("ENGINE_COMM_TIMEOUT", "ENGINE_COMM_DEBUG"):
        env.pop(key, None)
    dp = dp_of(layout)
    cmd = [sys.executable, "-m", "elastic", "-n", "4", "--replica-every", "2", "--comm-timeout", "2",
           "--mpiexec", shlex.join(launcher()), *extra, "--", FAULTS, "--data", corpus, *TINY, *LAYOUTS[layout], "--dp", str(dp),
           "--ckpt-interval", str(ckpt), "--out-dir", str(tmp_path / "out"), "--metrics", str(tmp_path / "elastic.jsonl")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def last_resume(proc):
    """(step, ranks, dp, source) of the last relaunch the supervisor announced."""
    got = re.findall(r"restoring from (buddy replicas|the disk checkpoint) ?\S* \(step (\d+).*? onto (\d+) ranks "
                     r"\(dp (\d+)\)", proc.stdout)
    assert got, describe(proc)
    what, step, n, dp = got[-1]
    return int(step), int(n), int(dp), what


def assert_exact_after(tmp_path, corpus, clean, proc, layout, want_ranks, want_source):
    assert proc.returncode == 0, describe(proc)
    assert "elastic: finished after" in proc.stdout, describe(proc)
    step, n, dp, source = last_resume(proc)
    assert (n, source) == (want_ranks, want_source), describe(proc)
    ref = clean.resumed(tmp_path, layout, step, dp, dp * (2 if layout == "pp2" else 1))
    assert_losses_after(tmp_path / "elastic.jsonl", ref, step)
    return step


@pytest.mark.parametrize("layout,seed", [("dp4", 1), ("pp2", 2), ("zero3", 3)])
def test_one_rank_killed_relaunch_is_exact(tmp_path, corpus, clean, layout, seed):
    k = random.Random(seed).randint(5, 8)
    rank = 1 if layout != "pp2" else 3                 # pp2: a rank of the last stage
    proc = elastic(tmp_path, corpus, layout, f"0:{rank}:{k}")
    step = assert_exact_after(tmp_path, corpus, clean, proc, layout, 2 if layout == "pp2" else 3, "buddy replicas")
    assert k - 1 - step <= 2, (k, step)                # lost completed steps <= K
    assert re.search(rf"failed .*; rank {rank} died", proc.stdout), describe(proc)


def test_two_failures_in_a_row(tmp_path, corpus, clean):
    rng = random.Random(4)
    k1 = rng.randint(4, 5)
    k2 = rng.randint(k1 + 3, 9)
    proc = elastic(tmp_path, corpus, "dp4", f"0:2:{k1};1:0:{k2}")
    assert_exact_after(tmp_path, corpus, clean, proc, "dp4", 2, "buddy replicas")
    assert proc.stdout.count("failed (exit code") == 2


def test_failure_during_recovery_falls_back_to_the_same_state(tmp_path, corpus, clean):
    k = random.Random(5).randint(5, 8)
    proc = elastic(tmp_path, corpus, "dp4", f"0:1:{k};1:0:0")       # launch 1 loses rank 0 while restoring
    step = assert_exact_after(tmp_path, corpus, clean, proc, "dp4", 2, "buddy replicas")
    assert "no whole state in the buddy replicas: no replica was taken yet" in proc.stdout, describe(proc)
    assert set(re.findall(r"buddy replicas \(step (\d+)", proc.stdout)) == {str(step)}, describe(proc)


def test_rank_and_its_buddy_lost_falls_back_to_disk(tmp_path, corpus, clean):
    """Ranks 1 and 2 (rank 1's buddy on one host) die together, their replica files with them.
    Where MPICH tears the job down within milliseconds of the deaths, the supervisor may see only
    the first of the two as killed (it relaunches on 3 ranks then, not 2); either way no copy of
    rank 1's shard is left, and the run goes on from the disk checkpoint, exactly."""
    k = random.Random(6).randint(6, 8)                # after the step-4 disk checkpoint
    proc = elastic(tmp_path, corpus, "dp4", f"0:1+2:{k}", ckpt=4)
    assert "both copies of rank 1's shard are lost" in proc.stdout, describe(proc)
    step, n, _, _ = last_resume(proc)
    assert assert_exact_after(tmp_path, corpus, clean, proc, "dp4", n, "the disk checkpoint") == 4
    assert n in (2, 3)


def test_stuck_rank_is_treated_as_dead(tmp_path, corpus, clean):
    k = random.Random(7).randint(5, 8)
    proc = elastic(tmp_path, corpus, "dp4", f"0:3:{k}:stop")
    assert re.search(r"rank 3 did not answer the watchdog", proc.stdout), describe(proc)
    assert_exact_after(tmp_path, corpus, clean, proc, "dp4", 3, "buddy replicas")


def test_ranks_that_return_grow_the_job_back(tmp_path, corpus, clean):
    """--capacity-file: at the restart 4 ranks are available again, so the job goes on at dp4."""
    (tmp_path / "capacity").write_text("4\n")
    k = random.Random(8).randint(5, 8)
    proc = elastic(tmp_path, corpus, "dp4", f"0:2:{k}", "--capacity-file", str(tmp_path / "capacity"))
    assert re.search(r"failed .*; rank 2 died", proc.stdout), describe(proc)
    assert_exact_after(tmp_path, corpus, clean, proc, "dp4", 4, "buddy replicas")
