"""The reductions of a Communicator: all_reduce, reduce_scatter, reduce (a mixin; see
communicator.py for the API conventions and the machinery: _arrays, _begin, _go).

Each method: try the short-message fast path (direct.py); check every argument before any
message moves (a rank refusing its own tells the others under ENGINE_COMM_DEBUG, debug.py);
flatten the arrays (buffers.py); register the call (sequence number, debug signature); run
the chosen algorithm's step generator blocking or as a Handle; `complete` divides for
avg and copies temporaries back.
"""
from functools import partial

from . import library, rabenseifner, recursive_doubling, ring, tree
from .buffers import balanced, check_counts, complete, flat_in, flat_out, is_block_of, offsets, overlaps
from .ops import OPS, SUM, finish, reducer, resolve
from .transport import ACTIVE, Completed

_OP = OPS.get

ALL_REDUCE = {"ring": lambda t, s, o, f: ring.all_reduce(t, s, o, *balanced(o.size, t.size), f),
              "recursive_doubling": recursive_doubling.all_reduce,
              "rabenseifner": rabenseifner.all_reduce, "tree": tree.all_reduce}
REDUCE_SCATTER = {"ring": ring.reduce_scatter, "recursive_halving": rabenseifner.reduce_scatter}


def _check_out(name, x, out):
    """An output array other than x must have x's size and not overlap it."""
    if out is not None and out is not x:
        if out.size != x.size:
            raise ValueError(f"{name}: out has {out.size} elements, input has {x.size}")
        if overlaps(x, out):
            raise ValueError(f"{name}: out overlaps the input without being it")


class Reductions:
    """all_reduce, reduce_scatter, reduce (mixed into Communicator)."""

    def all_reduce(self, x, op=SUM, out=None, algo="auto", async_op=False, cache=True):
        """Reduce x over all ranks; every rank gets the result (in x, or in out). cache=False:
        x and out live for this call only (the fast path keeps no plan of them)."""
        d = self._direct
        if d is not None and algo == "auto" and not async_op and not ACTIVE:
            plan = d.last.get("ar")
            if plan is not None and plan.x is x and plan.out is out and plan.op is op and plan.dtype is x.dtype:
                return plan.run()                   # the replay of the last plan: the common case
            result = d.all_reduce(x, op, out, cache)
            if result is not None:
                return result
        try:                                        # every argument check, before any message
            rop = _OP(op) or resolve(op)
            xp, dev, stage = self._arrays(x, out, "all_reduce", writes_x=True)
            _check_out("all_reduce", x, out)
            algo = self._algo("all_reduce", algo, x.nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("all_reduce", e)
        wbs = []
        if out is None or out is x:
            result = x
            src = buf = flat_out(x, stage, wbs)
        else:
            result, src, buf = out, flat_in(x, stage), flat_out(out, stage, wbs)
        t = self._begin("all_reduce", algo, x.size, x.dtype, -1, rop, xp, async_op)
        n = self.size
        done = partial(complete, rop, buf, n, wbs, result)
        if x.size == 0:
            return Completed(done()) if async_op else done()
        if algo == "mpi":
            gen = library.all_reduce(t, src, buf, rop)
        else:
            gen = ALL_REDUCE[algo](t, src, buf, reducer(rop, dev, not stage) if dev else rop.ufunc)
        return self._go(gen, t, done, async_op)

    def reduce_scatter(self, x, op=SUM, out=None, counts=None, algo="auto", async_op=False, cache=True):
        """Reduce x (all blocks) over all ranks; this rank gets block `rank` of the result.
        cache=False: the buffers live for this call only (no fast-path plan kept)."""
        d = self._direct
        if d is not None and algo == "auto" and not async_op and counts is None and not ACTIVE:
            plan = d.last.get("rs")
            if plan is not None and plan.x is x and plan.out is out and plan.op is op and plan.dtype is x.dtype:
                return plan.run()                   # the replay of the last plan: the common case
            result = d.reduce_scatter(x, op, out, cache)
            if result is not None:
                return result
        n, r = self.size, self.rank
        given = counts
        try:                                        # every argument check, before any message
            rop = _OP(op) or resolve(op)
            xp, dev, stage = self._arrays(x, out, "reduce_scatter", writes_x=out is None)
            if counts is None:
                counts, offs = balanced(x.size, n)
            else:
                counts = check_counts(counts, n, "reduce_scatter counts")
                if sum(counts) != x.size:
                    raise ValueError(f"reduce_scatter: counts sum to {sum(counts)}, input has {x.size} elements")
                offs = offsets(counts)
            in_place = out is None or (out.size == counts[r] and is_block_of(out, x, offs[r]))
            if in_place and not x.flags.c_contiguous:
                raise ValueError("reduce_scatter in place needs a contiguous input (its result is a view "
                                 "of it); pass out= for a non-contiguous one")
            if not in_place:
                if out.size != counts[r]:
                    raise ValueError(f"reduce_scatter: out has {out.size} elements, this rank's block has "
                                     f"{counts[r]}")
                if overlaps(x, out):
                    raise ValueError("reduce_scatter: out overlaps the input without being this rank's block")
            algo = self._algo("reduce_scatter", algo, x.nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("reduce_scatter", e)
        wbs = []
        if in_place:
            src = work = flat_out(x, stage, wbs)
            dst = src[offs[r]:offs[r + 1]]
            result = dst if src is x else x.reshape(-1)[offs[r]:offs[r + 1]]
        else:
            src, work, dst, result = flat_in(x, stage), None, flat_out(out, stage, wbs), out
        t = self._begin("reduce_scatter", algo, x.size, x.dtype, -1, rop, xp, async_op, given)
        mpi_tmp = None
        if algo == "mpi" and work is not None:          # MPI forbids aliased send/recv buffers
            mpi_tmp = t.scratch(counts[r], x.dtype)
            wbs.insert(0, partial(dst.__setitem__, Ellipsis, mpi_tmp))
        # avg divides the block where the reduction lands (mpi in place: before its copy into dst)
        done = partial(complete, rop, dst if mpi_tmp is None else mpi_tmp, n, wbs, result)
        if x.size == 0:
            return Completed(done()) if async_op else done()
        if algo == "mpi":
            gen = library.reduce_scatter(t, src, dst if mpi_tmp is None else mpi_tmp, counts, rop)
        else:
            gen = REDUCE_SCATTER[algo](t, src, work, dst, counts, offs, reducer(rop, dev, not stage))
        return self._go(gen, t, done, async_op)

    def reduce(self, x, root=0, op=SUM, out=None, algo="auto", async_op=False):
        """Reduce x over all ranks into x (or out) on root. Returns the result on root, None elsewhere;
        other ranks' x is left untouched (and their out, if given, is checked but not written)."""
        try:                                        # every argument check, before any message
            rop = resolve(op)
            root = self._root("reduce", root)
            is_root = self.rank == root
            xp, dev, stage = self._arrays(x, out, "reduce", writes_x=is_root)
            _check_out("reduce", x, out)
            algo = self._algo("reduce", algo, x.nbytes)
        except (TypeError, ValueError) as e:
            raise self._refused("reduce", e)
        wbs = []
        if is_root and (out is None or out is x):
            result = x
            src = acc = flat_out(x, stage, wbs)
        elif is_root:
            result, src, acc = out, flat_in(x, stage), flat_out(out, stage, wbs)
        else:
            result, src, acc = None, flat_in(x, stage), None
        t = self._begin("reduce", algo, x.size, x.dtype, root, rop, xp, async_op)
        n = self.size
        if acc is None and algo != "mpi":
            acc = t.scratch(x.size, x.dtype)

        def done():
            if is_root:
                finish(rop, acc, n)
            for w in wbs:
                w()
            return result
        if x.size == 0:
            return Completed(done()) if async_op else done()
        if algo == "mpi":
            gen = library.reduce(t, src, acc, root, rop)
        else:
            gen = tree.reduce(t, src, acc, root, reducer(rop, dev, not stage))
        return self._go(gen, t, done, async_op)
