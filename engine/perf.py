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


# ---------------------------------------------------------------------------- time per op kind
KINDS = {   # Function class -> what its work mostly is (anything else: "other ops")
    "matmul": ("Linear", "MatMul"),
    "attention": ("HeadsAttention", "Attention"),            # QK^T and PV matmuls + the softmax
    "elementwise": ("Add", "Sub", "Mul", "Div", "Neg", "Pow", "Exp", "Log", "Tanh", "GELU", "Dropout",
                    "LayerNorm"),
    "reductions": ("CrossEntropy", "Sum", "Mean"),
    "gather/scatter": ("Embedding", "GetItem", "Concat"),
    "views": ("Reshape", "Transpose"),
}
_KIND_OF = {name: kind for kind, names in KINDS.items() for name in names}


def _subclasses(cls):
    out, todo = [], list(cls.__subclasses__())
    while todo:
        c = todo.pop()
        out.append(c)
        todo += c.__subclasses__()
    return out


class OpProfile:
    """Wall seconds inside every autograd Function's forward and backward, by class and by kind
    (KINDS), plus named phases (``phase(name)``: the optimizer, the norm, the data). Nested
    calls count once, in the outermost. What a step spends outside all of them is Python:
    the graph walk, the Tensor objects, the model's forward code (``breakdown``).

        with OpProfile() as prof:
            for b in batches: step(b)
        prof.breakdown(total_seconds, steps)

    ``clock``: time.perf_counter (wall), or time.process_time at one thread: CPU seconds, less
    sensitive to other processes sharing the cores. The wrappers cost about a microsecond per
    call; patching is undone on exit."""

    def __init__(self, clock=time.perf_counter):
        self.clock, self.seconds, self.calls, self._depth, self._saved = clock, {}, {}, 0, []

    def _add(self, key, dt):
        self.seconds[key] = self.seconds.get(key, 0.0) + dt
        self.calls[key] = self.calls.get(key, 0) + 1

    def _wrap(self, fn, key):
        prof, clock = self, self.clock

        def timed(*args, **kwargs):
            if prof._depth:
                return fn(*args, **kwargs)
            prof._depth += 1
            t0 = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                prof._depth -= 1
                prof._add(key, clock() - t0)
        return timed

    def patch(self, owner, attr, key):
        """Time ``owner.attr`` (a class or an instance) under ``key`` until exit."""
        had = attr in vars(owner)
        self._saved.append((owner, attr, vars(owner).get(attr), had))
        setattr(owner, attr, self._wrap(getattr(owner, attr), key))

    def __enter__(self):
        from .autograd import Function
        for cls in _subclasses(Function):
            for attr in ("forward", "backward"):
                if attr in vars(cls):
                    self.patch(cls, attr, f"{cls.__name__}.{attr}")
        return self

    def __exit__(self, *exc):
        for owner, attr, old, had in reversed(self._saved):
            if had:
                setattr(owner, attr, old)
            else:
                delattr(owner, attr)
        self._saved.clear()

    def breakdown(self, total_s, steps):
        """{"ms_per_step", "kinds_ms": {kind: ms/step}, "ops_ms": {Class.method: ms/step},
        "calls_per_step": {...}}; kind "python" = total - everything timed."""
        per = 1e3 / steps
        kinds = {}
        for key, s in self.seconds.items():
            name = key.split(".")[0]
            kind = key.split(":")[0] if ":" in key else _KIND_OF.get(name, "other ops")
            kinds[kind] = kinds.get(kind, 0.0) + s * per
        kinds["python"] = total_s * per - sum(kinds.values())
        ops = {k: round(s * per, 3) for k, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        return {"ms_per_step": total_s * per, "kinds_ms": {k: round(v, 3) for k, v in
                                                           sorted(kinds.items(), key=lambda kv: -kv[1])},
                "ops_ms": ops, "calls_per_step": {k: n / steps for k, n in self.calls.items()}}
