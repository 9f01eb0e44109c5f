"""Elementwise work in cache-sized chunks, spread over a small thread pool on the CPU.

NumPy's ufuncs release the GIL on large arrays, so a chain of in-place ufuncs on disjoint
slices runs in parallel on several threads. BLAS already uses every thread for the matmuls;
this gives the elementwise chains (GELU, AdamW) the same threads, so that one process uses
its cores between the matmuls too. Each chunk holds CHUNK elements (256 KiB in float32), so
every pass of a chain over a chunk stays in the core's L2 cache instead of streaming the
whole array through memory once per pass.

    for_chunks(n, fn, xp)      # fn(a, b) for [a, b) covering [0, n), chunk by chunk
    for_parts(n, fn, xp)       # fn(a, b) for threads() contiguous parts of [0, n): independent rows
    run_ranges(fn, ranges)     # fn(a, b) for given ranges (a backward over its forward's parts)

The chunks are the same whatever the thread count and each element sees the same ufuncs in
the same order, so results are bitwise identical at 1 thread and at N. Threads: ENGINE_THREADS,
else OPENBLAS_NUM_THREADS / OMP_NUM_THREADS (the BLAS's own), else every core; at 1 thread,
under CuPy (one stream does the work) or below two chunks everything runs inline, no pool.
Cost: one pool task per thread, which walks its contiguous run of chunks (with a task per
chunk the pool's handoffs ate the gain: GELU forward and backward on 2 threads ran 1.06x faster
than on one at (12, 64, 512) and 1.02x at (12, 256, 1024); with a task per thread 1.11x and
1.48x. Not 2x: each ufunc call of a part takes the GIL back, and that handoff costs about as
much as one pass over a chunk); memory: none.

Beside a BLAS with threads of its own (OpenBLAS's threads spin for a while after each call), arrays
under BESIDE_BLAS_MIN elements stay on this thread: every ufunc call of a part must take the
GIL back from a thread the spinning BLAS threads compete with. Measured, train.py's step in one
process, 2 cores, 2-thread OpenBLAS (medians of three in-process A/Bs): at the baby shape
(4 x 128, block 64; arrays up to 393K elements) pooled 78.6 / 59.0 / 72.1 ms against inline
65.6 / 55.7 / 70.3 ms; at 2 x 512, block 128 (GELU over 3.1M elements) pooled 415 ms against
inline 436 ms.

``for_parts`` is for work whose rows are independent and each row's result does not depend on
which rows share its call (attention: each (batch, head) is its own softmax and its own small
GEMMs), so it is cut into as many parts as there are threads, and is bitwise the same at any
count. A task already running on the pool runs nested work inline (no deadlock on a full pool).
"""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

CHUNK = 1 << 16
BESIDE_BLAS_MIN = 1 << 20   # beside a BLAS with threads of its own, smaller arrays stay on this thread
_PREFIX = "engine-elementwise"
_pool = {}


def _first_count(names):
    """The first of these environment variables set to a positive integer, else every core."""
    for var in names:
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) > 0:
            return int(v)
    return os.cpu_count() or 1


def threads():
    """The thread count for elementwise work (see the module docstring)."""
    return _first_count(("ENGINE_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"))


def for_chunks(n, fn, xp=np, chunk=CHUNK, beside_blas_min=BESIDE_BLAS_MIN):
    """Call fn(a, b) for consecutive [a, b) of at most ``chunk`` covering [0, n): in a pool of
    threads() threads on NumPy arrays, each thread one contiguous run of the chunks, in order
    (one pool task per thread); else in order on this thread (CuPy: one call, [0, n)). Beside a
    BLAS with threads of its own, n below ``beside_blas_min`` stays on this thread (see the
    module docstring: the pool would fight the BLAS's threads and lose)."""
    if xp is not np or n <= chunk:         # one chunk (or one stream): no pool, no thread count to read
        if n:
            fn(0, n)
        return
    ranges = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    k = chunk_threads(n, chunk, beside_blas_min)
    if k == 1:
        for a, b in ranges:
            fn(a, b)
        return

    def run_chunks(i, j):                  # one task per thread: its contiguous run of chunks, in order
        for a, b in ranges[i:j]:
            fn(a, b)
    run_ranges(run_chunks, parts(len(ranges), k))


def chunk_threads(n, chunk=CHUNK, beside_blas_min=BESIDE_BLAS_MIN):
    """How many threads for_chunks(n, ..., chunk, beside_blas_min) on NumPy arrays runs on (1: this
    thread only, in order)."""
    if n < beside_blas_min and blas_threads() > 1:
        return 1
    return max(1, min(threads(), -(-n // chunk)))


def blas_threads():
    """The BLAS's own thread count as its environment sets it (all cores when unset)."""
    return _first_count(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"))


def for_parts(n, fn, xp=np):
    """Call fn(a, b) for min(threads(), n) contiguous near-equal [a, b) covering [0, n), on the
    pool (NumPy, the BLAS on one thread) or as one call fn(0, n) (CuPy, one thread, or a BLAS
    with threads of its own: parts that run GEMMs would then fight its spinning threads; measured
    on attention at (8, 256, 12 heads of 64): 98 ms inline against 121 ms in two parts with a
    two-thread OpenBLAS, and 122 ms against 64 ms with a one-thread OpenBLAS)."""
    k = 1 if xp is not np or blas_threads() > 1 else min(threads(), n)
    if k <= 1:
        if n:
            fn(0, n)
        return
    run_ranges(fn, parts(n, k))


def parts(n, k):
    """k contiguous near-equal ranges [a, b) covering [0, n)."""
    cuts = [n * i // k for i in range(k + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


def run_ranges(fn, ranges):
    """fn(a, b) for each of the given ranges: on the pool, or in order on this thread (one
    thread, one range, or called from a pool task: nested work runs inline)."""
    k = threads()
    if k == 1 or len(ranges) < 2 or threading.current_thread().name.startswith(_PREFIX):
        for a, b in ranges:
            fn(a, b)
        return
    pool = _pool.get(k)
    if pool is None:
        pool = _pool[k] = ThreadPoolExecutor(k, thread_name_prefix=_PREFIX)
    for f in [pool.submit(fn, a, b) for a, b in ranges]:
        f.result()                                              # re-raises a part's error here
