"""Measuring a training step: peak FLOP/s for MFU, and peak traced memory.

MFU, model FLOPs utilisation (Chowdhery et al. 2022, PaLM, appendix B; nanoGPT's
``estimate_mfu``): the FLOPs a step must do (6N + 12 L T C per token, forward and
backward, ``GPT.flops_per_token``) times tokens/s, over the machine's peak FLOP/s. The
peak is not a datasheet number but measured at start-up: the best of a few square
matmuls in the training dtype on the training device, so MFU says how far the step is
from the matmul speed this very process gets (on a shared CPU, from what it gets now).

Memory: NumPy reports its buffers to tracemalloc, so traced bytes are every array plus
Python objects; CuPy device memory is not traced (host memory only).
"""
import time
import tracemalloc

import numpy as np

from . import backend


def measure_peak_flops(dtype, n=None, reps=5):
    """FLOP/s of the fastest of ``reps`` (n x n) @ (n x n) matmuls (2 n^3 FLOPs each);
    n = 1024 on the CPU (and the device double), 4096 on a GPU. The fastest hides a cold first call."""
    xp = backend.xp()
    n = n or (4096 if backend.device() == "gpu" and not backend.emulated() else 1024)
    a = backend.to_device(np.random.default_rng(0).standard_normal((n, n)), dtype)   # (n, n)
    b, best = a.T.copy(), float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        xp.matmul(a, b)
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


class DeviceMemoryTracer:
    """Peak bytes of device memory per step (backend.device_peak), for --device gpu: the
    arrays live there, and tracemalloc would see only the host's share. Every step is
    measured (the count costs nothing per allocation that matters)."""

    every = 1
    what = "device peak"

    def begin(self, step):
        backend.device_peak(reset=True)

    def end(self):
        return backend.device_peak()


class MemoryTracer:
    """Peak bytes of host memory per step, from tracemalloc (which sees every NumPy buffer).

    Tracing starts before the data and the model are built, so a traced step's peak holds
    the resident state (data, parameters, gradients, optimizer moments) plus the step's
    temporaries. Tracing slows every small Python allocation of the autograd graph, so
    with ``every > 1`` it stays on only until the end of the first step; the resident
    bytes are remembered, and later steps k, 2k, ... are traced alone (start, step,
    stop): peak = resident + that step's traced peak. Other steps repeat the last value.

    Cost measured here (1 CPU core, median step time traced vs untraced): about 3-8% for
    train.py's default GPT (4 layers, C 128, B 12, T 128), 15-40% for nanoGPT's CPU
    config (T 64), 100% for a tiny test model: hence train.py's ``--mem-trace-interval``
    default of 25, announced in the log header."""

    what = "tracemalloc peak"

    def __init__(self):
        tracemalloc.start()
        self.every, self.resident, self.last, self.first = 1, 0, 0, True

    def stop(self):
        tracemalloc.stop()

    def begin(self, step):
        if not tracemalloc.is_tracing() and step % self.every == 0:
            tracemalloc.start()
        if tracemalloc.is_tracing():
            if self.first:
                self.resident = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()

    def end(self):
        if tracemalloc.is_tracing():
            peak = tracemalloc.get_traced_memory()[1]
            self.last = peak if self.first or self.every == 1 else self.resident + peak
            if self.every > 1:
                tracemalloc.stop()
        self.first = False
        return self.last
