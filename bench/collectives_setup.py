"""Helpers of bench/collectives.py: sizes, the buffers of each case, the model fits, the ceiling.

Two fits of the alpha-beta-gamma model (Hockney 1994; Thakur, Rabenseifner & Gropp 2005,
section 3), both by least squares on the relative error (each point weighted 1/t) so that
microsecond latencies and millisecond transfers count alike:
    fit_rows     alpha, beta, gamma that best explain every hand-written algorithm's measured
                 times through its cost formula (collectives/cost.py); these give model_us
                 and are what algo="auto" should use on this machine (ENGINE_COMM_COST);
    fit_model    the raw library and memory: alpha, beta from an MPI_Sendrecv ping-pong
                 between rank pairs (2i, 2i+1), all pairs at once, 8 B .. 64 MiB; gamma from
                 np.add(a, b, out=c), 1 KiB .. 64 MiB (a reference: what MPI alone costs).
"""
import re
import time

import numpy as np
from mpi4py import MPI

from collectives.buffers import raw_bytes
from collectives.cost import coefficients
from collectives.ops import SUM, mpi_buffer, mpi_op, resolve
from engine import backend

BUSBW = {  # nccl-tests' bus bandwidth factors
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "reduce": lambda n: 1.0,
}
FLOOR = "floor"   # Case._floor's pseudo-algorithm: bare persistent requests + np.add, the least Python costs
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text):
    m = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"bad size {text!r}: use e.g. 8B, 4KB, 64MB")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_sizes(text):
    """'8B:64MB' -> [8, 16, ..., 64 MiB] (doubling); '4KB' -> [4096]."""
    lo, _, hi = text.partition(":")
    lo = parse_size(lo)
    hi = parse_size(hi) if hi else lo
    sizes = []
    s = max(lo, 1)
    while s <= hi:
        sizes.append(s)
        s *= 2
    return sizes


class Case:
    """One (op, size): its buffers, shared by every algorithm as in nccl-tests (placement of
    the arrays in memory moves single-copy transfer times by up to 2x here, so separate
    buffers would compare allocations, not algorithms), and a zero-argument runner each."""

    def __init__(self, comm, op, nbytes, dtype, inplace, device=False):
        n = comm.size
        count = nbytes // dtype.itemsize
        if op in ("reduce_scatter", "all_gather", "all_to_all"):
            count -= count % n                      # whole blocks, as nccl-tests
        self.comm, self.op, self.dtype, self.inplace = comm, op, dtype, inplace
        self.count, self.nbytes = count, count * dtype.itemsize
        self.sum = resolve(SUM)
        r, k = comm.rank, count // n
        self.x = np.ones(count if op != "all_gather" else k, dtype)
        self.out = np.ones(count if op != "reduce_scatter" else k, dtype)
        self.device = device                        # the buffers on the GPU (engine.backend's device)
        if device:
            self.x, self.out = backend.to_device(self.x), backend.to_device(self.out)
        self.block = self.out[r * k:(r + 1) * k] if op == "all_gather" else None

    def runner(self, algo):
        """algo="mpi" on host buffers: the library called directly through mpi4py; on device
        buffers: through the Communicator (library.py), which hands the library the device
        buffers where the MPI is CUDA-aware and stages them through pinned host memory
        otherwise, as it does for every hand-written algorithm."""
        c, op, x, out = self.comm, self.op, self.x, self.out
        if algo == "mpi" and not self.device:
            return self._library()
        if algo == FLOOR:
            return self._floor()
        if op == "all_reduce":
            return (lambda: c.all_reduce(out, algo=algo)) if self.inplace else \
                (lambda: c.all_reduce(x, out=out, algo=algo))
        if op == "reduce_scatter":
            return (lambda: c.reduce_scatter(x, algo=algo)) if self.inplace else \
                (lambda: c.reduce_scatter(x, out=out, algo=algo))
        if op == "all_gather":
            blk = self.block
            return (lambda: c.all_gather(blk, out=out, algo=algo)) if self.inplace else \
                (lambda: c.all_gather(x, out=out, algo=algo))
        if op == "broadcast":
            return lambda: c.broadcast(x, root=0, algo=algo)
        if op == "reduce":
            return lambda: c.reduce(x, root=0, out=out, algo=algo)
        if op == "all_to_all":
            return lambda: c.all_to_all(x, out=out, algo=algo)
        raise ValueError(f"unknown op {op!r}")

    def _floor(self):
        """The least a hand-written call on mpi4py costs (algo "floor"; None where it is not
        defined: device buffers, a rank count not a power of two, other ops): the messages of
        recursive doubling / halving, the fast path's (collectives/direct.py), as its persistent
        requests (made once on ready-made memoryviews, started and waited per step), and for a
        reduction one np.add per step; no plan lookup, byte counter or check. So floor / mpi is
        how far from the library's own collective any Python implementation of these messages
        starts."""
        w, op, n, r = self.comm.mpi, self.op, self.comm.size, self.comm.rank
        if self.device or n & (n - 1) or n == 1 or op not in ("all_reduce", "reduce_scatter", "all_gather"):
            return None
        mv = raw_bytes
        steps, tag = [], 71                          # (peer, send, recv, np.add args or None)
        if op == "all_reduce":                       # d = 1, 2, ...: exchange everything, reduce
            tmp, cur, d = np.empty_like(self.out), self.x, 1
            while d < n:
                steps.append((r ^ d, mv(cur), mv(tmp), (cur, tmp, self.out)))
                cur, d = self.out, 2 * d
        elif op == "reduce_scatter":                 # d = n/2, ..., 1: send the half the partner keeps
            k, work, lo, hi, d = self.count // n, self.x, 0, n, n // 2
            while d:
                mid = lo + d
                keep, give = ((lo, mid), (mid, hi)) if r < mid else ((mid, hi), (lo, mid))
                tmp = np.empty((keep[1] - keep[0]) * k, self.dtype)
                kept = work[keep[0] * k:keep[1] * k]
                target = self.out if d == 1 else kept
                steps.append((r ^ d, mv(work[give[0] * k:give[1] * k]), mv(tmp), (tmp, kept, target)))
                (lo, hi), d = keep, d // 2
        else:                                        # d = 1, 2, ...: my group's blocks for the partner group's
            k, out, d = self.count // n, self.out, 1
            steps.append((None, mv(out[r * k:(r + 1) * k]), mv(self.x), None))      # the own block
            while d < n:
                mine, theirs = (r & ~(d - 1)) * k, ((r ^ d) & ~(d - 1)) * k
                steps.append((r ^ d, mv(out[mine:mine + d * k]), mv(out[theirs:theirs + d * k]), None))
                d *= 2
        add = np.add
        steps = [(peer, send, recv, red, None if peer is None else (w.Recv_init(recv, peer, tag),
                                                                    w.Send_init(send, peer, tag)))
                 for peer, send, recv, red in steps]

        def run():
            for peer, send, recv, red, reqs in steps:
                if peer is None:
                    send[:] = recv
                    continue
                r, s = reqs                          # as direct.py: recv started first, send waited first
                r.Start()
                s.Start()
                s.Wait()
                r.Wait()
                if red is not None:
                    add(*red)
        return run

    def _library(self):
        """The library's own collective, called directly through mpi4py."""
        w, op, ip = self.comm.mpi, self.op, self.inplace
        x, out = mpi_buffer(self.x), mpi_buffer(self.out)
        red = mpi_op(self.sum, self.dtype)
        inp = MPI.IN_PLACE
        if op == "all_reduce":
            return (lambda: w.Allreduce(inp, out, red)) if ip else (lambda: w.Allreduce(x, out, red))
        if op == "reduce_scatter":
            return (lambda: w.Reduce_scatter_block(inp, x, red)) if ip else \
                (lambda: w.Reduce_scatter_block(x, out, red))
        if op == "all_gather":
            return (lambda: w.Allgather(inp, out)) if ip else (lambda: w.Allgather(x, out))
        if op == "broadcast":
            return lambda: w.Bcast(x, 0)
        if op == "reduce":
            return lambda: w.Reduce(x, out, red, 0)
        return lambda: w.Alltoall(x, out)


def _timed(fn, seconds=0.05, max_iters=2000):
    """Mean seconds per call over a short repeated batch (at least 2 calls). Local work only:
    the number of calls depends on this rank's clock."""
    fn()
    iters, elapsed = 0, 0.0
    t0 = time.perf_counter()
    while iters < 2 or (elapsed < seconds and iters < max_iters):
        fn()
        iters += 1
        elapsed = time.perf_counter() - t0
    return elapsed / iters


def _timed_exchange(fn, nbytes):
    """Mean seconds per call of a point-to-point exchange; the call count depends on the size
    only, so both partners make the same number of calls."""
    iters = int(min(200, max(3, (4 << 20) // max(nbytes, 1))))
    fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def _fit(ns, ts):
    """(a, b) minimizing sum(((a + b n - t) / t)^2)."""
    ns, ts = np.asarray(ns, float), np.asarray(ts, float)
    A = np.stack([1 / ts, ns / ts], axis=1)
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(ts), rcond=None)
    return max(a, 0.0), max(b, 1e-15)


def fit_rows(rows, n):
    """(alpha, beta, gamma) >= 0 fitted to the hand-written algorithms' rows."""
    A, t = [], []
    for r in rows:
        if r["algo"] in ("mpi", "auto", FLOOR) or r["time_us"] <= 0:
            continue
        c = coefficients(r["op"], r["algo"], n, r["bytes"])
        if any(c):
            A.append(c)
            t.append(r["time_us"] * 1e-6)
    if not A:
        return (0.0, 0.0, 0.0)
    A, t = np.asarray(A), np.asarray(t)
    keep = [0, 1, 2]
    while keep:                                     # drop a parameter the fit wants negative
        x, *_ = np.linalg.lstsq(A[:, keep] / t[:, None], np.ones_like(t), rcond=None)
        if (x >= 0).all():
            break
        keep.pop(int(np.argmin(x)))
    out = [0.0, 0.0, 0.0]
    for k, v in zip(keep, x if keep else []):
        out[k] = float(v)
    return tuple(out)


def fit_model(comm, max_bytes):
    """(alpha, beta, gamma) measured in this launch, and a note on how."""
    w, r, n = comm.mpi, comm.rank, comm.size
    top = min(max(max_bytes, 1 << 16), 64 << 20)
    sizes = [s for s in (8 << (2 * i) for i in range(13)) if s <= top]
    peer = r ^ 1 if (r ^ 1) < n else None
    a = b = None
    if n > 1:
        ts = []
        for s in sizes:
            sb, rb = np.ones(s, np.uint8), np.empty(s, np.uint8)
            w.Barrier()
            ts.append(_timed_exchange(lambda: w.Sendrecv([sb, MPI.BYTE], peer, 9, [rb, MPI.BYTE], peer, 9), s)
                      if peer is not None else 0.0)
            w.Barrier()
        if peer is not None:
            a, b = _fit(sizes, ts)
    gsizes = [s for s in (1024 << (2 * i) for i in range(9)) if s <= top]
    gts = []
    for s in gsizes:
        x, y, z = (np.ones(s // 4, np.float32) for _ in range(3))
        gts.append(_timed(lambda: np.add(x, y, out=z)))
    g = _fit(gsizes, gts)[1]
    mine = np.array([a or 0.0, b or 0.0, g, 1.0 if a is not None else 0.0])
    tot = np.empty_like(mine)
    w.Allreduce(mine, tot)
    pairs = max(tot[3], 1.0)
    alpha, beta = (tot[0] / pairs, tot[1] / pairs) if tot[3] else (0.0, 1e-10)
    return (alpha, beta, tot[2] / n), f"Sendrecv ping-pong 8 B..{top >> 20} MiB, np.add 1 KiB..{top >> 20} MiB"


def measure_ceiling(comm, nbytes):
    """memcpy and add bandwidth per rank (GB/s of output), every rank at once."""
    nbytes = max(nbytes, 1 << 20)
    a, b, c = (np.ones(nbytes // 4, np.float32) for _ in range(3))
    w = comm.mpi
    w.Barrier()
    t_copy = _timed(lambda: np.copyto(c, a), seconds=0.2)
    w.Barrier()
    t_add = _timed(lambda: np.add(a, b, out=c), seconds=0.2)
    n = comm.size
    return dict(memcpy_GBps=w.allreduce(nbytes / t_copy / 1e9) / n,
                add_GBps=w.allreduce(nbytes / t_add / 1e9) / n, ceiling_bytes=nbytes)

