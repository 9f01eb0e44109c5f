"""The data-movement collectives of a Communicator: all_gather, broadcast, all_to_all,
barrier (a mixin; see communicator.py for the API conventions and the machinery).
"""
from functools import partial

import numpy as np
from mpi4py import MPI

from engine import backend

from . import alltoall, barrier as barrier_mod, bruck, library, recursive_doubling, ring, tree
from .buffers import check_counts, complete, flat_in, flat_out, is_block_of, offsets, overlaps, uniform
from .transport import ACTIVE, Completed, Handle

ALL_GATHER = {"ring": ring.all_gather, "recursive_doubling": recursive_doubling.all_gather,
              "bruck": bruck.all_gather}


# On this general path an out-of-place all-gather sends its own block straight from the
# input below this size and, from it up, copies the block into the output first and sends
# from there, as MPICH does. Why both: collectives/direct.py, "Placing the own block"
# (its fast path, which blocking auto all-gathers take, chooses by measurement instead);
# the measurements: bench/collectives.py.
_COPY_FIRST_BYTES = 16 << 20


class Movement:
    """all_gather, broadcast, all_to_all, barrier (mixed into Communicator)."""

    def all_gather(self, x, out=None, counts=None, algo="auto", async_op=False, cache=True):
        """Concatenate every rank's x (in rank order) on every rank. cache=False: the buffers
        live for this call only (no fast-path plan kept)."""
        d = self._direct
        if d is not None and algo == "auto" and not async_op and out is not None and counts is None and not ACTIVE:
            plan = d.last.get("ag")
            if plan is not None and plan.x is x and plan.out is out and plan.dtype is x.dtype \
                    and plan.placements is None:
                return plan.run()                   # the replay of the last plan: the common case
            result = d.all_gather(x, out, cache)
            if result is not None:
                return result
        n, r = self.size, self.rank
        even = counts is None
        try:                                        # every argument check, before any message
            xp, dev, stage = self._arrays(x, out, "all_gather")
            if even:
                counts, offs = uniform(x.size, n)
            else:
                counts = check_counts(counts, n, "all_gather counts")
                if counts[r] != x.size:
                    raise ValueError(f"all_gather: counts[{r}] = {counts[r]} but this rank's input has "
                                     f"{x.size} elements")
                offs = offsets(counts)
            in_place = False
            if out is not None:
                if out.size != offs[n]:
                    raise ValueError(f"all_gather: out has {out.size} elements, the gathered blocks {offs[n]}")
                in_place = is_block_of(x, out, offs[r])
                if not in_place and overlaps(x, out):
                    raise ValueError("all_gather: the input overlaps out without being this rank's block of it")
            nbytes = offs[n] * x.dtype.itemsize
            algo = self._algo("all_gather", algo, nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("all_gather", e)
        if out is None:
            shape = (n * x.shape[0],) + x.shape[1:] if even and x.ndim else (offs[n],)
            out = backend.get_array_module(x).empty(shape, x.dtype)
        wbs = []
        buf = flat_out(out, stage, wbs)
        src = None if in_place else flat_in(x, stage)
        t = self._begin("all_gather", algo, offs[n], x.dtype, -1, None, xp, async_op, None if even else counts)
        first = None
        if algo != "mpi" and not in_place:
            if algo != "bruck" and out.nbytes < _COPY_FIRST_BYTES:
                first = src                       # sent straight from the input (see above)
            else:
                buf[offs[r]:offs[r + 1]] = src
        done = partial(complete, None, None, n, wbs, out)
        if offs[n] == 0:
            return Completed(done()) if async_op else done()
        if algo == "mpi":
            gen = library.all_gather(t, src, buf, counts, offs, in_place)
        else:
            gen = ALL_GATHER[algo](t, buf, counts, offs) if first is None else \
                ALL_GATHER[algo](t, buf, counts, offs, first)
        return self._go(gen, t, done, async_op)

    def broadcast(self, x, root=0, algo="auto", async_op=False):
        """Copy root's x into x on every rank (in place)."""
        try:                                        # every argument check, before any message
            root = self._root("broadcast", root)
            xp, dev, stage = self._arrays(x, None, "broadcast", writes_x=self.rank != root)
            algo = self._algo("broadcast", algo, x.nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("broadcast", e)
        wbs = []
        buf = flat_out(x, stage, wbs)
        t = self._begin("broadcast", algo, x.size, x.dtype, root, None, xp, async_op)

        def done():
            for w in wbs:
                w()
            return x
        if x.size == 0:
            return Completed(done()) if async_op else done()
        gen = library.broadcast(t, buf, root) if algo == "mpi" else tree.broadcast(t, buf, root)
        return self._go(gen, t, done, async_op)

    def all_to_all(self, x, out=None, send_counts=None, recv_counts=None, algo="auto", async_op=False):
        """Block j of x goes to rank j; block j of the output comes from rank j.

        Uneven blocks: send_counts (this rank's, to each rank) and recv_counts (from each rank;
        exchanged when not given). Every rank passes the same form: no counts, send_counts
        only, or both."""
        n = self.size
        even = send_counts is None and recv_counts is None
        form = 0 if even else 1 if recv_counts is None else 2     # in the debug signature
        try:                                        # every check that needs no other rank
            xp, dev, stage = self._arrays(x, out, "all_to_all")
            if send_counts is None:
                if x.size % n:
                    raise ValueError(f"all_to_all: {x.size} elements do not split into {n} equal blocks; "
                                     "pass send_counts=")
                send_counts = [x.size // n] * n
            send_counts = check_counts(send_counts, n, "all_to_all send_counts")
            if sum(send_counts) != x.size:
                raise ValueError(f"all_to_all: send_counts sum to {sum(send_counts)}, input has {x.size}")
            if even:
                recv_counts = send_counts
            elif recv_counts is not None:
                recv_counts = check_counts(recv_counts, n, "all_to_all recv_counts")
            algo = self._algo("all_to_all", algo, x.nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("all_to_all", e)
        seq = self._calls.seq                        # the number _begin gives this call
        t = self._begin("all_to_all", algo, x.size if even else -1, x.dtype, -1, None, xp, async_op,
                        None if even else [form])
        if recv_counts is None:
            recv_counts = self._exchange_counts(send_counts)
        soffs, roffs = offsets(send_counts), offsets(recv_counts)
        error = None
        if out is not None and out.size != roffs[n]:
            error = ValueError(f"all_to_all: out has {out.size} elements, expected {roffs[n]}")
        if self._checker is not None and form == 2:   # debug: do the given recv_counts match?
            sent = self._exchange_counts(send_counts)
            if sent != recv_counts:
                error = ValueError(f"all_to_all: recv_counts {recv_counts} but the ranks send {sent}")
        if self._checker is not None:                 # out depends on the exchanged counts
            self._checker.agree(seq, "all_to_all", error)
        elif error is not None:
            raise error
        if out is None:
            out = backend.get_array_module(x).empty(x.shape if even else (roffs[n],), x.dtype)
        wbs = []
        src = flat_in(x, stage)
        if overlaps(x, out):                       # in place: read from a copy of the input
            src = src.copy()
        buf = flat_out(out, stage, wbs)

        def done():
            for w in wbs:
                w()
            return out
        if algo == "mpi":
            gen = library.all_to_all(t, src, buf, send_counts, soffs, recv_counts, roffs, even)
        else:
            gen = alltoall.all_to_all(t, src, buf, send_counts, soffs, recv_counts, roffs)
        return self._go(gen, t, done, async_op)

    def _exchange_counts(self, send_counts):
        """Every rank tells every other how much it sends (small metadata, MPI_Alltoall)."""
        s = np.asarray(send_counts, np.int64)
        r = np.empty_like(s)
        req = self._coll.Ialltoall([s, MPI.INT64_T], [r, MPI.INT64_T])

        def steps():                               # waited through the progress engine
            yield (req,)
        Handle(steps(), watch=self._watch, what=f"call #{self._calls.seq - 1} all_to_all (its counts)").wait()
        return r.tolist()

    def barrier(self, algo="auto", async_op=False):
        """No rank leaves before every rank has arrived."""
        try:
            algo = self._algo("barrier", algo, 0)
        except ValueError as e:
            raise self._refused("barrier", e)
        t = self._begin("barrier", algo, 0, np.dtype(np.uint8), -1, None, np, async_op)
        gen = library.barrier(t) if algo == "mpi" else barrier_mod.barrier(t)
        return self._go(gen, t, lambda: None, async_op)
