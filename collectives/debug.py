"""No silent failure: the collective consistency check and the hang watchdog.

A collective that ranks call differently (another op, count, dtype or root) or that one
rank never reaches does not fail: it hangs or returns garbage. Two opt-in guards turn
that into an error that names the ranks (read when a Communicator is created):

  ENGINE_COMM_DEBUG=1      before every collective all ranks exchange a signature
                           (call number, op, count, dtype, root, reduction) and every rank
                           raises CollectiveMismatchError naming the ranks that differ.
  ENGINE_COMM_TIMEOUT=T    the same handshake, polled against a deadline of T seconds:
                           a rank that has not arrived by then is named on stderr and the
                           job is aborted (MPI_Abort), instead of hanging forever.

The handshake ("arrival") is non-blocking: each rank posts Irecv for every peer's
signature and Isend of its own to every peer on a private duplicate communicator, then
polls Testall with a deadline, sleeping a little between polls. Whoever has not been heard
from when the deadline passes is missing. Cost: 2(N-1) small messages per collective,
only when a flag is set. A rank that arrives but dies inside the collective is not covered.
"""
import os
import sys
import time
from collections import Counter

import numpy as np
from mpi4py import MPI

from . import ops
from .transport import ACTIVE, progress

ABORT_GRACE = 1.0      # seconds between the watchdog's message and MPI_Abort (MPICH may drop unforwarded output)

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "barrier")
_TAG = 7
_FIELDS = 6   # seq, collective, count, dtype, root, reduction


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives (or with a different count, dtype, root or op)."""


def env_flags():
    """(debug, timeout_seconds or None, trace) from the environment."""
    debug = os.environ.get("ENGINE_COMM_DEBUG", "0").strip() not in ("", "0")
    t = os.environ.get("ENGINE_COMM_TIMEOUT", "").strip()
    timeout = float(t) if t else None
    trace = os.environ.get("ENGINE_TRACE", "0").strip() not in ("", "0")
    return debug, (timeout if timeout and timeout > 0 else None), trace


def _describe(sig):
    seq, coll, count, dtype, root, red = (int(v) for v in sig)
    name = COLLECTIVES[coll] if 0 <= coll < len(COLLECTIVES) else f"collective#{coll}"
    args = [] if name == "barrier" else [f"count={count}", f"dtype={ops.dtype_name(dtype)}"]
    if root >= 0:
        args.append(f"root={root}")
    if red >= 0:
        args.append(f"op={ops.NAMES[red]}")
    return f"call #{seq} {name}({', '.join(args)})"


def _ranks(rs):
    rs = sorted(rs)
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(str(r) for r in rs)


class Checker:
    """The arrival handshake of one Communicator."""

    def __init__(self, mpi_comm, label, timeout):
        self.comm = mpi_comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.label, self.timeout = label, timeout
        world = MPI.COMM_WORLD.Get_group()
        self.world_ranks = MPI.Group.Translate_ranks(self.comm.Get_group(), list(range(self.size)), world)
        self.sigs = np.zeros((self.size, _FIELDS), np.int64)

    def _names(self, ranks):
        text = _ranks(ranks)
        if self.comm.Get_size() != MPI.COMM_WORLD.Get_size() or self.label != "world":
            text += f" (world {_ranks(self.world_ranks[r] for r in ranks)})"
        return text

    def arrive(self, seq, collective, count, dtype, root=-1, op=None):
        """Exchange signatures with every rank; raise on mismatch, abort on timeout."""
        sig = self.sigs[self.rank]
        sig[:] = (seq, COLLECTIVES.index(collective), count, ops.dtype_code(dtype), root,
                  -1 if op is None else ops.NAMES.index(op.name))
        peers = [k for k in range(self.size) if k != self.rank]
        recvs = [self.comm.Irecv([self.sigs[k], MPI.INT64_T], k, _TAG) for k in peers]
        sends = [self.comm.Isend([sig, MPI.INT64_T], k, _TAG) for k in peers]
        if self.timeout is None and not ACTIVE:
            MPI.Request.Waitall(recvs)
        else:
            self._poll(recvs, peers, sig)
        MPI.Request.Waitall(sends)
        self._compare()

    def _poll(self, recvs, peers, sig):
        """Wait for the signatures, moving in-flight collectives along, until the deadline."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        pause = 0.0
        while not MPI.Request.Testall(recvs):
            progress(block=False)
            if deadline is not None and time.monotonic() > deadline:
                missing = [k for k, q in zip(peers, recvs) if not q.Test()]
                msg = (f"ENGINE_COMM_TIMEOUT: {self._names(missing)} never arrived at {_describe(sig)} "
                       f"on communicator '{self.label}' (size {self.size}): rank {self.rank} waited "
                       f"{self.timeout:g} s; aborting the job")
                print(msg, file=sys.stderr, flush=True)
                time.sleep(ABORT_GRACE)        # let the launcher forward the line before the teardown
                MPI.COMM_WORLD.Abort(1)
            time.sleep(pause)
            pause = min(0.01, pause + 0.0005)

    def _compare(self):
        rows = [tuple(int(v) for v in s) for s in self.sigs]
        if all(row == rows[0] for row in rows):
            return
        groups = {}
        for k, row in enumerate(rows):
            groups.setdefault(row, []).append(k)
        counts = Counter({row: len(ks) for row, ks in groups.items()})
        majority = max(groups, key=lambda row: (counts[row], -min(groups[row])))
        parts = [f"{self._names(groups[majority])} called {_describe(majority)}"]
        parts += [f"{self._names(ks)} called {_describe(row)}" for row, ks in groups.items() if row != majority]
        raise CollectiveMismatchError(
            f"collective mismatch on communicator '{self.label}' (size {self.size}): " + "; but ".join(parts))
