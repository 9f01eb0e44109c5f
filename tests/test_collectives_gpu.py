"""The collectives on CuPy arrays, staged through the host and (if the MPI is CUDA-aware) direct.
Skipped without CuPy and a GPU."""
import pytest

from mpi_util import describe, run_mpi

cupy = pytest.importorskip("cupy")
try:
    has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
except Exception:  # pragma: no cover - depends on the machine
    has_gpu = False
pytestmark = pytest.mark.skipif(not has_gpu, reason="no GPU")


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gpu_collectives_staged(n):
    proc = run_mpi(n, "gpu_worker.py", env={"ENGINE_CUDA_AWARE_MPI": "0"}, timeout=300)
    assert proc.returncode == 0 and f"gpu collectives N={n}: 0 failures" in proc.stdout, describe(proc)
