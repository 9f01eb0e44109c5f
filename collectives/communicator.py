"""Communicator: torch.distributed-style collectives over an mpi4py communicator.

    comm = Communicator()                         # MPI.COMM_WORLD
    comm.all_reduce(grad)                         # in place, op="sum", algo="auto"
    shard = comm.reduce_scatter(flat, op="avg")   # this rank's block, a view of flat
    full = comm.all_gather(shard)                 # concatenation over ranks (axis 0)
    h = comm.all_reduce(bucket, async_op=True)    # ... h.test() ... h.wait()

Every collective takes algo= one of its hand-written algorithms (cost.algorithms(name)),
"auto" (the cheapest by the alpha-beta-gamma model, cost.py) or "mpi" (the MPI library's
own, library.py). Reductions: op = "sum" | "avg" | "max" | "min" | "prod" (ops.py).

In place and out of place (out=):
    all_reduce(x)                 x <- reduce(x)        all_reduce(x, out=y): x untouched
    reduce_scatter(x)             x's own block <- result, returned as a view of x; the rest
                                  of x is scratch afterwards.  reduce_scatter(x, out=y): x untouched
    all_gather(x, out=y)          in place when x IS y's block for this rank (a view of y)
    broadcast(x, root)            always in place
    reduce(x, root)               result in x (or out) on root; other ranks' x untouched
    all_to_all(x, out=y)          out=None allocates; out=x works (through a copy)
Blocks: counts= (reduce_scatter, all_gather) or send_counts=/recv_counts= (all_to_all) give
uneven blocks, the same list on every rank; by default blocks are balanced
(count // N, one more on the first count % N ranks) so any count works.

Arrays: NumPy or CuPy, any shape (flattened in C order), any layout (non-contiguous
arrays go through a contiguous copy, buffers.py). Non-blocking (async_op=True) returns a
Handle; progress is made in handle.test()/wait() (transport.py), and the arrays must not
be touched until wait() returns. All ranks must call collectives in the same order with
the same counts (and counts= lists), dtype, op, root, algo and form: as in MPI, a blocking
call does not match a non-blocking one (their messages carry different tags, calls.py);
ENGINE_COMM_DEBUG=1 checks all of them before every call (debug.py). Arguments are checked
on every rank before any message moves; a rank refusing its own raises, and under
ENGINE_COMM_DEBUG=1 every other rank raises CollectiveArgumentError too, instead of
waiting for it.

The methods live by concept: reductions.py (all_reduce, reduce_scatter, reduce),
movement.py (all_gather, broadcast, all_to_all, barrier), p2p.py (send, recv, ...);
this file holds what they share: construction, split, and the per-call machinery.
"""
import weakref

import numpy as np
from mpi4py import MPI

from engine import backend

from . import cost
from .buffers import as_array, staging
from .debug import Checker, counts_digest, env_flags
from .direct import DirectPath
from .movement import Movement
from .ops import ACCEPTED, check_dtype
from .p2p import PointToPoint
from .reductions import Reductions
from .calls import Calls, Traffic
from .transport import ACTIVE, Handle, Pool, TracingTransport, Transport, run
from .watchdog import Party

_VALID = {name: frozenset(cost.algorithms(name)) | {"mpi"} for name in cost.MODELS}


LIVE = weakref.WeakSet()     # every Communicator of this process (collectives/ulfm.py revokes them all)


class Communicator(Reductions, Movement, PointToPoint):
    """A group of ranks (an mpi4py communicator) with hand-written collectives."""

    def __init__(self, comm=None, label=None, owns=False):
        self.mpi = MPI.COMM_WORLD if comm is None else comm
        self._owns = owns                      # free() frees self.mpi too (split made it)
        LIVE.add(self)
        self.rank, self.size = self.mpi.Get_rank(), self.mpi.Get_size()
        self.label = label or ("world" if self.mpi == MPI.COMM_WORLD else f"comm{self.size}")
        self._coll = self.mpi.Dup()          # context of the collectives' own messages
        self._p2p = self.mpi.Dup()           # context of send/recv
        tag_ub = self._coll.Get_attr(MPI.TAG_UB) or MPI.COMM_WORLD.Get_attr(MPI.TAG_UB)   # Open MPI: world's only
        self._calls = Calls(min(tag_ub, 1 << 20))
        self._pool = Pool()
        self._choices = cost.Choices(self.size)          # algo="auto"
        debug, timeout, self._trace = env_flags()
        self._watch = Party(self.mpi, self.label, timeout) if timeout else None    # deadlines on every wait
        self._checker = Checker(self.mpi, self.label, self._watch) if (debug or timeout) else None
        self._transport_cls = TracingTransport if self._trace else Transport
        # direct.py's fast path: power-of-two size, no per-call checks or trace to honour
        fast = self._checker is None and not self._trace and self.size & (self.size - 1) == 0
        self._traffic = Traffic()                 # payload bytes sent (bytes_sent)
        self._direct = DirectPath(self._coll, self.rank, self.size, self._calls, self._choices,
                                  self._traffic) if fast else None
        self._t = self._transport_cls(self._coll, self.rank, self.size, 0, True, None, np, self._pool,
                                     self._traffic)

    def __repr__(self):
        return f"Communicator({self.label!r}, rank={self.rank}, size={self.size})"

    @property
    def bytes_sent(self):
        """Payload bytes this rank has sent on this communicator so far: every message of the
        hand-written algorithms and of send/isend/sendrecv (not the debug handshake, nor
        algo="mpi", whose messages the library chooses)."""
        return self._traffic.sent

    @property
    def bytes_by_kind(self):
        """bytes_sent per kind of call: {"all_reduce": ..., "all_gather": ..., "p2p": ...}
        (calls.KINDS, every kind present), a copy."""
        return self._traffic.by_kind

    def plan_stats(self):
        """The fast path's persistent plans (direct.py) on this communicator: {"built": plans made
        so far, "kept": plans held now}; both 0 where the fast path does not apply."""
        d = self._direct
        return {"built": d.built if d else 0, "kept": len(d.plans) if d else 0}

    def _drop_plans(self):
        """No more fast path: its plans (and the arrays they keep alive) go."""
        if self._direct is not None:
            self._direct.clear()
            self._direct = None

    def free(self):
        """Free the MPI communicators this one made (its two duplicates; the one split() made)
        and drop its plans. Collective: every rank calls it; no call on it afterwards."""
        self._drop_plans()
        LIVE.discard(self)
        for c in (self._coll, self._p2p) + ((self.mpi,) if self._owns else ()):
            if c != MPI.COMM_NULL:
                c.Free()

    def revoke(self):
        """ULFM (collectives/ulfm.py): revoke every MPI communicator this one uses, so that any
        rank waiting on it fails at once instead of waiting for a dead peer. Its plans go first."""
        self._drop_plans()
        for c in (self.mpi, self._coll, self._p2p):
            c.Revoke()
        if self._checker is not None:
            self._checker.revoke()

    def split(self, color, key=None, label=None):
        """Ranks passing the same color form a new Communicator, ordered by key (default: rank).
        color=None: this rank joins none and gets None."""
        c = self.mpi.Split(MPI.UNDEFINED if color is None else color, self.rank if key is None else key)
        return None if c == MPI.COMM_NULL else Communicator(c, label, owns=True)

    # ---- the machinery every collective goes through -------------------------------------

    def _algo(self, name, algo, nbytes):
        """The algorithm the call runs: algo, or auto's choice; refuses unknown names."""
        if algo == "auto":
            return self._choices.get(name, nbytes)
        if algo not in _VALID[name]:
            raise ValueError(f"{name}: unknown algo {algo!r}; choose from auto, mpi, "
                             f"{', '.join(cost.algorithms(name))}")
        return algo

    def _root(self, name, root):
        """Refuse a root that is not a rank of this communicator (every rank checks the same)."""
        if isinstance(root, bool) or not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise ValueError(f"{name}: root must be a rank 0..{self.size - 1}, got {root!r}")
        return int(root)

    def _refused(self, name, error):
        """This rank refuses its arguments to collective `name`. Under ENGINE_COMM_DEBUG /
        ENGINE_COMM_TIMEOUT the other ranks are told (they raise CollectiveArgumentError and
        all stay in step); returns the error for the caller to raise."""
        if self._checker is not None:
            self._checker.refuse(self._calls.next(), name)
        return error

    def _begin(self, name, algo, count, dtype, root=-1, op=None, xp=np, async_op=False, blocks=None):
        """Number the call, check arrival/consistency (debug), make the call's transport."""
        seq = self._calls.next()
        if self._checker is not None:
            self._checker.arrive(seq, name, count, dtype, root, op, algo, counts_digest(blocks), async_op)
        tag = self._calls.tag(async_op)
        poll = async_op or ACTIVE or self._watch is not None   # in flight or under a deadline: never block in MPI
        if poll or self._trace:
            t = self._transport_cls(self._coll, self.rank, self.size, tag, not poll, f"{name}/{algo}", xp, self._pool,
                                   self._traffic, name)
        else:
            t = self._t
            t.tag, t.xp, t.kind = tag, xp, name
        return t

    def _go(self, gen, t, done, async_op):
        if async_op or ACTIVE or self._watch is not None:
            h = Handle(gen, done, t, self._watch, f"call #{self._calls.seq - 1} {t.label}")
            return h if async_op else h.wait()    # waiting keeps the handles in flight moving
        try:
            run(gen)
            return done()
        finally:
            t.release()

    @staticmethod
    def _arrays(x, out, what, writes_x=False):
        """(xp, on_device, stage) for the call, after checking types, dtypes and that the
        arrays written (out, or x when writes_x) are writeable."""
        if type(x) is np.ndarray and (out is None or type(out) is np.ndarray):   # the common case
            if x.dtype not in ACCEPTED:
                check_dtype(x.dtype)
            if out is not None and out.dtype != x.dtype:
                raise TypeError(f"{what}: out has dtype {out.dtype}, input has {x.dtype}")
            _writeable(out if out is not None else x if writes_x else None, what)
            return np, False, False
        as_array(x, f"{what} input")
        check_dtype(x.dtype)
        if out is not None:
            as_array(out, f"{what} output")
            if out.dtype != x.dtype:
                raise TypeError(f"{what}: out has dtype {out.dtype}, input has {x.dtype}")
        _writeable(out if out is not None else x if writes_x else None, what)
        dev, stage = staging(x, out)
        xp = backend.get_array_module(x) if dev and not stage else np
        return xp, dev, stage


def _writeable(a, what):
    if a is not None and not getattr(a.flags, "writeable", True):
        raise ValueError(f"{what}: the array it writes is read-only")
