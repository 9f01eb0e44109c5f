"""A bounded slice of the randomized differential test of every collective
(tests/mpi_workers/collectives_fuzz.py; one launch per rank count). The full sweep:

    mpiexec -n 8 python tests/mpi_workers/collectives_fuzz.py --cases 5000
"""
import pytest

from mpi_util import describe, run_mpi


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 8])
def test_collectives_fuzz(n):
    proc = run_mpi(n, "collectives_fuzz.py", "--cases", 300, "--seed", 0, timeout=120)
    assert proc.returncode == 0 and f"fuzz N={n}: 300 cases, 0 failures" in proc.stdout, describe(proc)
