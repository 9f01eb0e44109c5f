"""The collectives on device arrays (tests/mpi_workers/gpu_worker.py), staged through pinned host
buffers and handed to a CUDA-aware MPI directly, and how each rank picks its GPU.

Always under the device double (ENGINE_DEVICE=gpu-emulated, engine/device_double.py): one
launch per CUDA awareness (ENGINE_GPU_DOUBLE_CUDA_AWARE=0 at N=4 with 2 "GPUs", so ranks
take devices 0, 1, 0, 1; =1 at N=3), each running the worker's whole sweep (a few seconds
per launch). On a machine with CuPy and a GPU, also the real thing at N = 1..4 staged, and at
N = 2 as the MPI library answers (CUDA-aware or not).
The detection order of CUDA awareness (collectives/devices.py) is checked in process.
"""
import types

import numpy as np
import pytest

from engine import backend
from mpi_util import describe, run_mpi

has_gpu = backend.real_gpu_count() > 0


def _assert_ran(proc, n):
    assert proc.returncode == 0 and f"gpu collectives N={n}: 0 failures" in proc.stdout, describe(proc)
    assert "growth after warm-up 0 B" in proc.stdout, describe(proc)


def test_gpu_double_staged_two_devices():
    """Not CUDA-aware: every device buffer staged (the guard in transport.to_mpi would raise
    otherwise), one copy each way, the pinned pool flat after warm-up; 4 ranks on 2 devices."""
    proc = run_mpi(4, "gpu_worker.py", timeout=300, env={"ENGINE_DEVICE": "gpu-emulated",
                   "ENGINE_GPU_DOUBLE_CUDA_AWARE": "0", "ENGINE_GPU_DOUBLE_DEVICES": "2"})
    _assert_ran(proc, 4)
    assert "devices: [0, 1, 0, 1] (of 2)" in proc.stdout, describe(proc)
    assert "cuda-aware: False (the device double" in proc.stdout, describe(proc)
    staged = [line for line in proc.stdout.splitlines() if line.startswith("boundary:")]
    assert staged and not staged[0].startswith("boundary: 0 of"), describe(proc)


def test_gpu_double_cuda_aware():
    """CUDA-aware: device buffers go to MPI as they are; no call crosses the host/device
    boundary and nothing pinned is allocated."""
    proc = run_mpi(3, "gpu_worker.py", timeout=300, env={"ENGINE_DEVICE": "gpu-emulated",
                   "ENGINE_GPU_DOUBLE_CUDA_AWARE": "1"})
    _assert_ran(proc, 3)
    assert "devices: [0, 0, 0] (of 1)" in proc.stdout, describe(proc)
    assert "boundary: 0 of " in proc.stdout and "pinned pool: 0 B allocated" in proc.stdout, describe(proc)


@pytest.mark.skipif(not has_gpu, reason="no CuPy or no GPU")
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_gpu_collectives_staged(n):
    proc = run_mpi(n, "gpu_worker.py", env={"ENGINE_CUDA_AWARE_MPI": "0", "ENGINE_DEVICE": "gpu"}, timeout=300)
    _assert_ran(proc, n)


@pytest.mark.skipif(not has_gpu, reason="no CuPy or no GPU")
def test_gpu_collectives_as_detected():
    """The MPI's own answer (no override): device buffers go straight to it where it is CUDA-aware."""
    proc = run_mpi(2, "gpu_worker.py", env={"ENGINE_DEVICE": "gpu"}, timeout=300)
    _assert_ran(proc, 2)


def test_cuda_aware_detection_order(monkeypatch):
    from collectives import devices
    from engine import device_double
    yes = types.SimpleNamespace(Query_cuda_support=lambda: True)
    no_query = types.SimpleNamespace()
    never = lambda: pytest.fail("the ctypes query was asked after an earlier answer")   # noqa: E731
    assert devices.detect({"ENGINE_CUDA_AWARE_MPI": "0"}, yes, never) == (False, "ENGINE_CUDA_AWARE_MPI")
    assert devices.detect({"ENGINE_CUDA_AWARE_MPI": "1"}, no_query, never)[0] is True
    monkeypatch.setattr(devices.backend, "emulated", lambda: True)
    for flag, want in (("1", True), ("0", False)):
        monkeypatch.setenv("ENGINE_GPU_DOUBLE_CUDA_AWARE", flag)
        assert devices.detect({}, yes, never)[0] is want and device_double.mpi_cuda_aware() is want
    monkeypatch.setattr(devices.backend, "emulated", lambda: False)
    assert devices.detect({}, yes, never) == (True, "MPI.Query_cuda_support")
    assert devices.detect({}, no_query, lambda: True) == (True, "MPIX_Query_cuda_support")
    assert devices.detect({}, no_query, lambda: None)[0] is False
    from mpi4py import MPI                        # the loaded libmpi, through ctypes: MPICH >= 4 exports it
    lib = MPI.Get_library_version().split()
    if lib[:2] == ["MPICH", "Version:"] and int(lib[2].split(".")[0]) >= 4:
        assert isinstance(devices._mpix_query(), bool)     # found (a CPU build answers False)


def test_pinned_pool_lends_a_buffer_only_when_free():
    from collectives.devices import PinnedPool
    pool = PinnedPool(keep=2)
    a = pool.array(1000, np.dtype("float32"))
    b = pool.array(1000, a.dtype)                 # a still referenced: a second buffer
    assert pool.allocated == 2 * 4096 and a.base is not b.base
    view = a[10:20]
    del a
    c = pool.array(900, view.dtype)               # a's buffer still held through its view
    assert pool.allocated == 3 * 4096 and c.base is not view.base
    del view, c
    d = pool.array(1024, b.dtype)                 # a's buffer free again: lent, nothing allocated
    assert pool.allocated == 3 * 4096 and d.base is not b.base
    assert pool.kept() == (2, 2 * 4096)           # keep=2: the third buffer was not kept
