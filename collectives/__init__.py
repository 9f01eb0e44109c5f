"""collectives: hand-written MPI collectives, the process mesh, and their cost model.

Read in this order:
    communicator.py        Communicator: the torch.distributed-style API, in place / out of place
    reductions.py          all_reduce, reduce_scatter, reduce
    movement.py            all_gather, broadcast, all_to_all, barrier
    p2p.py                 send, recv, sendrecv, isend, irecv
    transport.py           algorithms as generators of steps; blocking and non-blocking handles
    ops.py, buffers.py     reductions and dtypes; layouts, blocks, device staging
    segments.py            one exchange-and-reduce step, pipelined in segments
    direct.py              the blocking fast path (plans of plain MPI_Sendrecv loops)
    ring.py                ring reduce-scatter / all-gather / all-reduce (bandwidth-optimal, pipelined)
    recursive_doubling.py  all-reduce / all-gather in log N steps (+ the fold for any N)
    rabenseifner.py        recursive-halving reduce-scatter, Rabenseifner all-reduce
    tree.py                binomial broadcast / reduce
    bruck.py               Bruck all-gather
    alltoall.py            pairwise-exchange all-to-all (even and uneven blocks)
    barrier.py             dissemination barrier
    library.py             algo="mpi": the MPI library's own collectives (oracle and baseline)
    cost.py                alpha-beta-gamma model and algo="auto"
    codecs.py              int8 / int4 blockwise and bf16 wire formats
    compressed.py          ZeRO++'s encoded all-gather and all-to-all reduce-scatter (one or two hops)
    mesh.py                Mesh(dp, pp, sp, tp): one Communicator per axis
    debug.py               ENGINE_COMM_DEBUG consistency check, ENGINE_COMM_TIMEOUT watchdog
"""
from .communicator import Communicator
from .debug import CollectiveArgumentError, CollectiveMismatchError
from .mesh import Mesh, MeshError
from .ops import AVG, MAX, MIN, PROD, SUM, ReduceOp
from .transport import Handle, wait_all

__all__ = ["Communicator", "CollectiveArgumentError", "CollectiveMismatchError", "Mesh", "MeshError", "AVG", "MAX", "MIN", "PROD", "SUM",
           "ReduceOp", "Handle", "wait_all"]
