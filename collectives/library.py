"""algo="mpi": the MPI library's own collectives, the test oracle and the benchmark baseline.

Written as step generators like the hand-written algorithms, so the blocking form is the
library's blocking call (MPI_Allreduce ...) and the non-blocking form its MPI-3
non-blocking collective (MPI_Iallreduce ...). Datatypes and ops come from ops.py
(float16 and bfloat16 as 16-bit words with a user-defined MPI.Op). In-place forms use
MPI_IN_PLACE wherever the caller's layout matches MPI's.
"""
from mpi4py import MPI

from .ops import mpi_buffer, mpi_op

IN_PLACE = MPI.IN_PLACE


def _run(t, blocking_call, nonblocking_call, *args):
    if t.blocking:
        getattr(t.comm, blocking_call)(*args)
    else:
        yield (getattr(t.comm, nonblocking_call)(*args),)


def all_reduce(t, src, out, op):
    send = IN_PLACE if src is out else mpi_buffer(src)
    yield from _run(t, "Allreduce", "Iallreduce", send, mpi_buffer(out), mpi_op(op, out.dtype))


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


def all_to_all(t, src, out, send_counts, send_offs, recv_counts, recv_offs):
    s, d = mpi_buffer(src), mpi_buffer(out)
    n = t.size
    if all(c == send_counts[0] for c in send_counts) and all(c == recv_counts[0] for c in recv_counts) \
            and send_counts[0] == recv_counts[0]:
        yield from _run(t, "Alltoall", "Ialltoall", s, d)
    else:
        yield from _run(t, "Alltoallv", "Ialltoallv",
                        [s[0], list(send_counts), send_offs[:n], s[1]],
                        [d[0], list(recv_counts), recv_offs[:n], d[1]])


def barrier(t):
    yield from _run(t, "Barrier", "Ibarrier")
