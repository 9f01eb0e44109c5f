"""Shrinking in place (train.py --on-failure shrink, elastic/inplace.py, collectives/ulfm.py) under
Open MPI's ULFM: ranks killed (SIGKILL) or stopped (SIGSTOP) at a seeded random step, the
survivors agree, shrink the world, restore from the buddy replicas and go on in the same job;
the losses after the recovery point equal, within 1e-10 (float64, dropout on), those of a clean
run resumed at the new layout from the same step. Needs the Open MPI wheel (CI runs it in its
own environment, .ci/run); under MPICH, whose ULFM does not work, it is skipped with that reason.
"""
import os
import random
import re
import shutil
import subprocess
import sys

import pytest

from elastic_cases import LAYOUTS, TINY, CleanRuns, assert_losses_after, dp_of, write_corpus
from mpi_util import ROOT, ULFM, describe, has_ulfm, launch as mpi_launch

FAULTS = os.path.join(ROOT, "tests", "mpi_workers", "train_faults.py")
HEARTBEATS = ["--mca", "mpi_ft_detector_thread", "true", "--mca", "mpi_ft_detector_period", "1",
              "--mca", "mpi_ft_detector_timeout", "10"]   # heartbeats from a thread: a busy rank misses none
pytestmark = [pytest.mark.ulfm,
              pytest.mark.skipif(not has_ulfm(), reason="needs Open MPI's ULFM (the MPICH wheel's does not work); "
                                                        ".ci/run runs it (pytest -m ulfm) with the Open MPI wheel")]


def launch(n, script, *args, faults="", ft=False, timeout=180):
    """mpiexec (Open MPI) of a script; ft: under ULFM (the clean references run without)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", ENGINE_FAULTS=faults)
    env.pop("ENGINE_COMM_TIMEOUT", None)
    cmd = [*mpi_launch(n, *((*ULFM, *HEARTBEATS) if ft else ())), sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def clean(tmp_path_factory, corpus):
    return CleanRuns(tmp_path_factory, corpus, launch)


def shrink_run(tmp_path, corpus, layout, faults):
    store = f"/dev/shm/test-ulfm-{os.getpid()}-{tmp_path.name}"
    dp = dp_of(layout)
    try:
        return launch(4, FAULTS, "--data", corpus, *TINY, *LAYOUTS[layout], "--dp", dp, "--ckpt-interval", 100,
                      "--replica-every", 2, "--replica-dir", store, "--on-failure", "shrink", "--comm-timeout", 30,
                      "--out-dir", tmp_path / "out", "--metrics", tmp_path / "run.jsonl", faults=faults, ft=True)
    finally:
        shutil.rmtree(store, ignore_errors=True)


def assert_exact(tmp_path, corpus, clean, proc, layout, ranks):
    assert proc.returncode == 0, describe(proc)
    got = re.findall(r"shrink: lost .*?restoring from buddy replicas \(step (\d+)\) onto (\d+) ranks \(dp (\d+)\)",
                     proc.stdout)
    assert got, describe(proc)
    step, n, dp = map(int, got[-1])
    assert n == ranks, describe(proc)
    assert_losses_after(tmp_path / "run.jsonl", clean.resumed(tmp_path, layout, step, dp, n), step)
    return step


@pytest.mark.parametrize("layout,seed,rank,ranks", [("dp4", 11, 1, 3), ("zero3", 12, 2, 3), ("pp2", 13, 3, 2)])
def test_one_rank_lost_shrinks_in_place_exactly(tmp_path, corpus, clean, layout, seed, rank, ranks):
    k = random.Random(seed).randint(5, 8)
    proc = shrink_run(tmp_path, corpus, layout, f"0:{rank}:{k}")
    step = assert_exact(tmp_path, corpus, clean, proc, layout, ranks)
    assert k - 1 - step <= 2, (k, step)                 # at most K completed steps lost
    t = float(re.search(r"agreed and shrunk in ([\d.]+) s", proc.stdout).group(1))
    assert t < 2.0, describe(proc)


def test_two_failures_in_a_row_and_a_stuck_rank(tmp_path, corpus, clean):
    rng = random.Random(14)
    k1 = rng.randint(4, 5)
    k2 = rng.randint(k1 + 3, 9)
    proc = shrink_run(tmp_path, corpus, "dp4", f"0:2:{k1};1:0:{k2}:stop")   # the second one stops (SIGSTOP)
    assert proc.stdout.count("shrink: lost") == 2, describe(proc)
    assert_exact(tmp_path, corpus, clean, proc, "dp4", 2)
