"""Hand-written collectives equal the MPI library's own, for every rank count 1..8.

One mpiexec launch per rank count runs the whole matrix (tests/mpi_workers/
collectives_worker.py: every algorithm x counts 0, 1, N-1, 13, 10007 x six dtypes x five
ops x in place / out of place, against algo="mpi" and the exact reduction) and the API
tests (comm_api_worker.py: non-blocking, layouts, errors, point-to-point, split).
"""
import pytest

from mpi_util import describe, run_mpi


@pytest.mark.parametrize("n", range(1, 9))
def test_collectives_match_mpi(n):
    proc = run_mpi(n, "collectives_worker.py", timeout=240)
    assert proc.returncode == 0, describe(proc)
    assert f"collectives N={n}:" in proc.stdout and " 0 failures" in proc.stdout, describe(proc)
    assert f"comm api N={n}: 0 failures" in proc.stdout, describe(proc)
