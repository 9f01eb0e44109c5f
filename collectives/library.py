"""algo="mpi": the MPI library's own collectives, the test oracle and the benchmark baseline.

Written as step generators like the hand-written algorithms, so the blocking form is the
library's blocking call (MPI_Allreduce ...) and the non-blocking form its MPI-3
non-blocking collective (MPI_Iallreduce ...). Datatypes and ops come from ops.py
(float16 and bfloat16 as 16-bit words with a user-defined MPI.Op). In-place forms use
MPI_IN_PLACE wherever the caller's layout matches MPI's.

Where the library's result could differ between ranks, it is made not to: float max and
min of an all-reduce run as integer max and min over IEEE's total order (signed zeros and
NaNs, _ordered_all_reduce); MPI_Alltoall or MPI_Alltoallv is chosen from the call's form,
which every rank shares, never from one rank's counts.
"""
import numpy as np
from mpi4py import MPI

from .ops import MAX, MIN, mpi_op
from .ops import mpi_buffer as _mpi_buffer
from .transport import to_mpi

IN_PLACE = MPI.IN_PLACE


def mpi_buffer(a):
    """The message spec of array a. An empty array travels as a fresh empty one: NumPy gives
    an empty slice its base's address (x[k:k] of x starts where x does), and MPICH refuses
    a send and receive buffer at the same address as aliased, even with nothing to move.
    A device array is checked at the hand-off (transport.to_mpi)."""
    return _mpi_buffer(to_mpi(a) if a.size else np.empty(1, a.dtype)[:0])


def _run(t, blocking_call, nonblocking_call, *args):
    if t.blocking:
        getattr(t.comm, blocking_call)(*args)
    else:
        yield (getattr(t.comm, nonblocking_call)(*args),)


def all_reduce(t, src, out, op):
    if op.name in (MAX, MIN) and (out.dtype.kind == "f" or out.dtype.name == "bfloat16"):
        yield from _ordered_all_reduce(t, src, out, op)
        return
    send = IN_PLACE if src is out else mpi_buffer(src)
    yield from _run(t, "Allreduce", "Iallreduce", send, mpi_buffer(out), mpi_op(op, out.dtype))


def _ordered_all_reduce(t, src, out, op):
    """Float max / min as an integer max / min over IEEE's total order, so every rank gets
    the same bits. The library's own float max compares +0.0 and -0.0 (and NaNs) as ties,
    which it may break differently on different ranks (MPICH's recursive doubling reduces
    partner's op mine on both partners). Here the bits, read as a signed integer w with the
    magnitude bits flipped where negative, order -NaN < -inf < ... < -0.0 < +0.0 < ... <
    +inf < +NaN; every NaN first becomes the one that wins (+NaN for max, -NaN for min), so
    NaN propagates and max(+0.0, -0.0) = +0.0, min(+0.0, -0.0) = -0.0 on every rank."""
    w = 8 * out.dtype.itemsize
    ints = np.dtype(f"i{out.dtype.itemsize}")
    flip = (1 << (w - 1)) - 1                     # the magnitude bits
    nan = int(np.array(np.nan, out.dtype).view(ints))
    keys = t.scratch(out.size, ints)
    keys[...] = src.view(ints)
    keys[np.isnan(src)] = nan if op.name == MAX else nan - (1 << (w - 1))   # +NaN / -NaN
    keys ^= (keys >> (w - 1)) & flip              # sign-magnitude -> two's complement order
    yield from _run(t, "Allreduce", "Iallreduce", IN_PLACE, mpi_buffer(keys), op.mpi)
    keys ^= (keys >> (w - 1)) & flip              # and back (the map is its own inverse)
    out.view(ints)[...] = keys


def reduce_scatter(t, src, dst, counts, op):
    """dst (counts[rank] elements) = block rank of the reduction of src; src is left as is."""
    mop = mpi_op(op, src.dtype)
    if all(c == counts[0] for c in counts):
        yield from _run(t, "Reduce_scatter_block", "Ireduce_scatter_block",
                        mpi_buffer(src), mpi_buffer(dst), mop)
    else:
        send, recv = mpi_buffer(src), mpi_buffer(dst)
        yield from _run(t, "Reduce_scatter", "Ireduce_scatter", send, recv, list(counts), mop)


def all_gather(t, src, out, counts, offs, in_place):
    recv = mpi_buffer(out)
    send = IN_PLACE if in_place else mpi_buffer(src)
    if all(c == counts[0] for c in counts):
        yield from _run(t, "Allgather", "Iallgather", send, recv)
    else:
        yield from _run(t, "Allgatherv", "Iallgatherv", send, [recv[0], list(counts), offs[:-1], recv[1]])


def broadcast(t, buf, root):
    yield from _run(t, "Bcast", "Ibcast", mpi_buffer(buf), root)


def reduce(t, src, out, root, op):
    """out on root (may be src: in place); out is ignored elsewhere."""
    mop = mpi_op(op, src.dtype)
    if t.rank == root:
        send = IN_PLACE if src is out else mpi_buffer(src)
        yield from _run(t, "Reduce", "Ireduce", send, mpi_buffer(out), mop, root)
    else:
        yield from _run(t, "Reduce", "Ireduce", mpi_buffer(src), None, mop, root)


def all_to_all(t, src, out, send_counts, send_offs, recv_counts, recv_offs, even):
    """MPI_Alltoall for even blocks (no counts given, on every rank alike), else MPI_Alltoallv:
    the choice may not depend on one rank's counts, since ranks see different rows of the
    count matrix (N=2, [[1, 1], [1, 2]]: rank 0's row and column are uniform, rank 1's not)."""
    s, d = mpi_buffer(src), mpi_buffer(out)
    n = t.size
    if even:
        yield from _run(t, "Alltoall", "Ialltoall", s, d)
    else:
        yield from _run(t, "Alltoallv", "Ialltoallv",
                        [s[0], list(send_counts), send_offs[:n], s[1]],
                        [d[0], list(recv_counts), recv_offs[:n], d[1]])


def barrier(t):
    yield from _run(t, "Barrier", "Ibarrier")
