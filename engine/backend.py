"""The array backend: NumPy on the CPU, CuPy on the GPU, chosen once per process.

Ops never ask this module which backend is active; they take the array module from
their inputs (``xp = get_array_module(x)``), so the same code runs on both. Only code
that *creates* arrays from nothing (parameter init, data batches) asks ``xp()``.
This is the only file that imports CuPy.

``ENGINE_DEVICE`` sets the process's default device, which ``--device`` overrides:
``cpu``, ``gpu`` (CuPy), or ``gpu-emulated``, for tests: "the GPU" is then
engine/device_double.py, a strict CuPy stand-in on NumPy that refuses implicit
host/device conversions and counts transfers and device bytes, so every GPU code path
runs on a machine without one (``ENGINE_DEVICE=gpu-emulated python -m pytest``).
"""
import os

import numpy as np

DEVICES = ("cpu", "gpu", "gpu-emulated")
_ENV = os.environ.get("ENGINE_DEVICE", "cpu").strip() or "cpu"
if _ENV not in DEVICES:
    raise SystemExit(f"error: ENGINE_DEVICE={_ENV!r}: expected one of {', '.join(DEVICES)}")
_EMULATED = _ENV == "gpu-emulated"
_DEVICE = "cpu" if _ENV == "cpu" else "gpu"     # CuPy (or the double) loads on first use
_cupy = None
_cupyx = None


def _import_cupy():
    global _cupy, _cupyx
    if _cupy is None:
        if _EMULATED:
            from engine import device_double
            _cupy = _cupyx = device_double
            return _cupy
        try:
            import cupy  # noqa: F401  (the only CuPy import in the project)
            import cupyx
        except ImportError as e:  # pragma: no cover - depends on the machine
            raise RuntimeError("--device gpu needs CuPy: pip install -e .[gpu] (CUDA 12) or "
                               ".[gpu-cuda13] (CUDA 13), or any cupy-cudaNNx wheel matching your CUDA") from e
        _cupy, _cupyx = cupy, cupyx
    return _cupy


def use_double():
    """Make "the GPU" the device double from now on (for tests in a CPU process; the
    environment's ENGINE_DEVICE=gpu-emulated does it at start). Arrays are still created on
    the CPU until set_device('gpu')."""
    global _EMULATED
    if _cupy is not None and not _EMULATED:
        raise RuntimeError("CuPy is already loaded in this process: the double cannot replace it")
    _EMULATED = True
    return _import_cupy()


def default_device():
    """The device ENGINE_DEVICE names ('gpu' for gpu-emulated), 'cpu' when unset."""
    return "cpu" if _ENV == "cpu" else "gpu"


def emulated():
    """Whether 'gpu' is the device double (ENGINE_DEVICE=gpu-emulated)."""
    return _EMULATED


def set_device(device):
    """Select 'cpu' (NumPy) or 'gpu' (CuPy, or the double under gpu-emulated) for arrays
    created from now on."""
    global _DEVICE
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        _import_cupy()
    _DEVICE = device


def device():
    return _DEVICE


def real_gpu_count():
    """GPUs that real CuPy sees (0 without CuPy, a driver or a GPU), whatever ENGINE_DEVICE
    says: for tests that run only on the real thing."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # ImportError, CUDARuntimeError: no usable GPU here
        return 0


def device_count():
    """GPUs this process can see (CUDA's count; the double's ENGINE_GPU_DOUBLE_DEVICES)."""
    return int(_import_cupy().cuda.runtime.getDeviceCount())


def use_device(index):
    """Make GPU `index` current: arrays created from now on live there (cupy.cuda.Device.use).
    Which index a rank takes is collectives/devices.py's select_gpu (it needs MPI)."""
    _import_cupy().cuda.Device(index).use()


def current_device():
    """The index of the current GPU."""
    return int(_import_cupy().cuda.Device().id)


def xp():
    """The array module for newly created arrays (numpy or cupy)."""
    return _import_cupy() if _DEVICE == "gpu" else np


def get_array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for plain Python values)."""
    if _cupy is not None:
        for a in arrays:
            if isinstance(a, _cupy.ndarray):
                return _cupy
    return np


def is_gpu_array(a):
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def to_numpy(a):
    """A host (NumPy) copy or view of any array."""
    if is_gpu_array(a):
        return _cupy.asnumpy(a)
    return np.asarray(a)


def to_device(a, dtype=None):
    """Move a host array to the active device (no copy on the CPU when dtype matches)."""
    a = xp().asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


def synchronize():
    """Wait for the GPU's current stream (no-op on the CPU); MPI must not read a buffer
    a kernel is still writing."""
    if _cupy is not None:
        _cupy.cuda.get_current_stream().synchronize()


def empty_pinned(shape, dtype):
    """A host array for device transfers: page-locked (cupyx.empty_pinned) once CuPy is
    loaded, so copies to and from the device run at full bus speed; plain NumPy otherwise."""
    if _cupyx is not None:
        return _cupyx.empty_pinned(shape, dtype=dtype)
    return np.empty(shape, dtype=dtype)


def device_bytes():
    """Device memory held by live arrays (CuPy's pool: bytes in use), 0 before CuPy loads."""
    if _cupy is None:
        return 0
    return int(_cupy.get_default_memory_pool().used_bytes())


_peak_hook = None


def device_peak(reset=False):
    """Peak device bytes in use since the last ``device_peak(reset=True)``.

    The double counts every array itself (engine/device_double.py, memory.peak). CuPy's pool
    keeps no peak, so on a real GPU a memory hook (cupy.cuda.MemoryHook, entered once for
    this thread) adds each pool malloc and subtracts each free."""
    global _peak_hook
    cp = _import_cupy()
    if _EMULATED:
        if reset:
            cp.memory.reset_peak()
        return cp.memory.peak
    if _peak_hook is None:
        class PeakHook(cp.cuda.MemoryHook):
            name = "engine_device_peak"

            def __init__(self, used):
                super().__init__()
                self.used = self.peak = used

            def malloc_postprocess(self, device_id, size, mem_size, mem_ptr, pmem_id):
                self.used += mem_size
                self.peak = max(self.peak, self.used)

            def free_postprocess(self, device_id, mem_size, mem_ptr, pmem_id):
                self.used -= mem_size
        _peak_hook = PeakHook(device_bytes())
        _peak_hook.__enter__()
    if reset:
        _peak_hook.peak = _peak_hook.used
    return _peak_hook.peak


def tune_host_allocator():
    """Keep freed NumPy buffers inside the process (glibc's mallopt; a no-op elsewhere).

    By default glibc serves every buffer over 128 KiB with its own mmap and unmaps it when
    freed, so each fresh activation or gradient array costs page faults and kernel zeroing:
    about a third of a small GPT's training step on the CPU. Serving buffers up to 32 MiB
    (glibc's ceiling) from the heap and trimming the heap only above 1 GiB free removes
    that, at the price of keeping freed memory for reuse. Set ENGINE_MALLOC_TUNE=0 to skip."""
    import ctypes
    import os
    import sys
    if not sys.platform.startswith("linux") or os.environ.get("ENGINE_MALLOC_TUNE", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the default allocator
        return False


tune_host_allocator()


def scatter_add(a, indices, values):
    """``a[indices] += values`` with repeated indices accumulated, in place (unbuffered:
    np.add.at on the CPU, cupyx.scatter_add on the GPU). Fastest with a 1-D ``a`` and
    1-D integer ``indices`` (NumPy's ufunc.at fast path)."""
    if is_gpu_array(a):
        _cupyx.scatter_add(a, indices, values)
    else:
        np.add.at(a, indices, values)


def bfloat16():
    """NumPy has no bfloat16; ml_dtypes provides one that NumPy (and MPI as raw bytes) can carry."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def copy_into(dst, src):
    """Copy src's values into the existing array dst (same shape), across host and device:
    host->device with cupy's set(), device->host with get(out=), else an ordinary copy."""
    if is_gpu_array(dst):
        if is_gpu_array(src):
            dst[...] = src
        elif dst.flags.c_contiguous:
            dst.set(np.ascontiguousarray(src, dtype=dst.dtype))
        else:
            dst[...] = _cupy.asarray(src)
    elif is_gpu_array(src):
        if dst.flags.c_contiguous:
            src.get(out=dst)
        else:
            dst[...] = src.get()
    else:
        np.copyto(dst, src)


def is_device_array(a):
    """Whether a is a GPU array (exposes __cuda_array_interface__), loading CuPy if the array
    arrived before set_device('gpu') did, so is_gpu_array / to_numpy / copy_into know it."""
    if not hasattr(a, "__cuda_array_interface__"):
        return False
    _import_cupy()
    return True
