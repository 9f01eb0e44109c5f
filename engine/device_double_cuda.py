"""The device double's device (engine/device_double.py): its memory counters, pinned host
memory, and the `cuda` namespace CuPy code calls (devices, streams, events, the runtime, the
memory pools). The double runs every "kernel" at once on the host, so a stream or an event is
always reached; what is counted is what a test can assert on: synchronizations, pinned bytes,
and the device bytes live arrays hold (allocated at creation, freed at garbage collection).
"""
import os
import types

import numpy as np


class Counters:
    """Transfers and device memory since the process started (or reset())."""

    def __init__(self):
        self.reset()
        self.used = 0          # device bytes currently held by live arrays
        self.peak = 0

    def reset(self):
        self.h2d = self.h2d_bytes = 0
        self.d2h = self.d2h_bytes = 0
        self.implicit_h2d = 0
        self.allocated = self.freed = 0        # device bytes, cumulative
        self.pinned_bytes = 0
        self.syncs = 0

    def reset_peak(self):
        self.peak = self.used


memory = Counters()


def _alloc(nbytes):
    memory.used += nbytes
    memory.allocated += nbytes
    memory.peak = max(memory.peak, memory.used)


def _free(nbytes):
    memory.used -= nbytes
    memory.freed += nbytes


def empty_pinned(shape, dtype=np.float64, order="C"):
    """Page-locked host memory (cupyx.empty_pinned): a NumPy array; its bytes are counted."""
    h = np.empty(shape, dtype=dtype, order=order)
    memory.pinned_bytes += h.nbytes
    return h


def zeros_pinned(shape, dtype=np.float64, order="C"):
    h = empty_pinned(shape, dtype, order)
    h[...] = 0
    return h


# -- cuda: devices, streams, pinned memory, the runtime --------------------------------

class _Event:
    """cuda.Event: the double runs everything at once, so an event is always reached."""

    def synchronize(self):
        memory.syncs += 1


class _Stream:
    def __init__(self, null=False, non_blocking=False, ptds=False):
        pass

    def synchronize(self):
        memory.syncs += 1

    def record(self, event=None):
        return _Event() if event is None else event

    def wait_event(self, event):
        pass


class _Device:
    def __init__(self, device=None):
        self.id = cuda._current if device is None else int(device)
        if not 0 <= self.id < cuda.runtime.getDeviceCount():
            raise RuntimeError(f"cudaErrorInvalidDevice: device {self.id} (the double has "
                               f"{cuda.runtime.getDeviceCount()})")

    def use(self):
        cuda._current = self.id

    def synchronize(self):
        memory.syncs += 1

    def __enter__(self):
        self._before = cuda._current
        self.use()
        return self

    def __exit__(self, *exc):
        cuda._current = self._before

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return self.id


class _Runtime:
    CUDARuntimeError = RuntimeError

    @staticmethod
    def getDeviceCount():
        return int(os.environ.get("ENGINE_GPU_DOUBLE_DEVICES", "1"))

    @staticmethod
    def memGetInfo():
        total = 80 << 30
        return total - memory.used, total


class _Pool:
    """get_default_memory_pool(): what the live device arrays hold."""

    def used_bytes(self):
        return memory.used

    def total_bytes(self):
        return memory.used

    def free_all_blocks(self):
        pass


cuda = types.ModuleType("engine.device_double.cuda")
cuda._current = 0
cuda.Device = _Device
cuda.runtime = _Runtime()
cuda.get_current_stream = lambda: _Stream()
cuda.Stream = type("Stream", (_Stream,), {"null": _Stream()})
cuda.Event = _Event
cuda.alloc_pinned_memory = lambda nbytes: empty_pinned(nbytes, np.uint8)
_POOL = _Pool()
get_default_memory_pool = lambda: _POOL          # noqa: E731
get_default_pinned_memory_pool = lambda: _POOL   # noqa: E731
