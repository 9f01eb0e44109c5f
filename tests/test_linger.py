"""collectives/ulfm.linger (tests/mpi_workers/linger_worker.py), under whichever MPI is installed:
a rank about to end without MPI_Finalize waits until every rank got there (so a peer still
receiving its last message does not see it die: a CI run of tests/mpi_workers/ulfm_smoke.py
failed so), and no longer than its deadline."""
import re

from mpi_util import describe, run_mpi


def test_linger_waits_for_the_last_rank_and_no_longer_than_its_deadline():
    n = 3
    proc = run_mpi(n, "linger_worker.py", timeout=60)
    assert proc.returncode == 0, describe(proc)
    left = {(int(r), case): float(t) for r, case, t in
            re.findall(r"^rank (\d+): (\w+) left at ([\d.]+) s$", proc.stdout, re.M)}
    assert len(left) == 2 * n, describe(proc)
    for r in range(n):
        assert left[r, "late"] >= 0.3 * (n - 1) - 0.02, describe(proc)     # not before the last arrival
    for r in range(n - 1):
        assert 0.5 - 0.02 <= left[r, "deadline"] < 1.4, describe(proc)     # its deadline, not the late rank
    assert left[n - 1, "deadline"] >= 1.5 - 0.02, describe(proc)
