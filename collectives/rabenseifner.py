"""Recursive halving reduce-scatter and Rabenseifner's all-reduce.

Source: Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication
operations in MPICH" (IJHPCA 19(1)), sections 4.3 (reduce-scatter, recursive halving for
commutative ops) and 4.4 (Rabenseifner's all-reduce: reduce-scatter by recursive halving,
then all-gather by recursive doubling); Rabenseifner 2004 (ICCS).

Recursive halving, p = 4 virtual ranks, vector in 4 blocks. At distance d = p/2, p/4, ..., 1
rank v exchanges with v XOR d: it sends the half of its current range the partner keeps and
reduces the half it keeps, so the data halves at every step:

    d=2   v0,v1 keep blocks 0-1, send 2-3;   v2,v3 keep 2-3, send 0-1
    d=1   v0 keeps 0, v1 keeps 1, v2 keeps 2, v3 keeps 3            (each now fully reduced)

Rabenseifner's all-reduce appends the mirror image, recursive doubling all-gather
(d = 1, 2, ...: exchange the reduced ranges, doubling them), over p balanced blocks.

Rank counts that are not a power of two use the fold of recursive_doubling.py: the first
2 rem ranks pair up, the even one hands its whole vector to the odd one (which reduces)
and sits out; virtual rank v < rem then stands for real ranks 2v and 2v+1. In the
reduce-scatter the blocks of both belong to v's range, and at the end the odd rank sends the
even one its block; in the all-reduce the odd rank sends the even one the whole result.

Reduction order: at each step partner halves are combined x op y with the same partial sums
on both sides, as in recursive doubling; an element's order is fixed by the rank tree.

Cost (n bytes, p = 2^lg virtual ranks; fold terms only when N is not a power of two):
    reduce-scatter  lg alpha + (p-1)/p n (beta + gamma)             [+ 2 alpha + n (beta + gamma) + n/N beta]
    all-reduce      2 lg alpha + 2 (p-1)/p n beta + (p-1)/p n gamma [+ 2 alpha + 2 n beta + n gamma]
Bandwidth-optimal like the ring, but with lg N instead of N-1 latency terms: for medium
and long messages at larger N. Each halving step is segments.exchange_reduce.
Memory: one n-byte scratch vector (out of place), plus the received halves.
"""
from .buffers import block_counts, offsets, same_memory
from .recursive_doubling import first_real, fold_layout, real_rank, virtual_rank
from .segments import exchange_reduce


def _halving(t, cur, work, v, p, rem, span, reduce, final=None):
    """Recursive halving over virtual ranks 0..p-1; span(lo, hi) gives the element range of
    virtual ranks lo..hi-1. The last step reduces into `final` if given. Returns (via
    StopIteration) the array now holding v's range."""
    lo, hi = 0, p
    d = p // 2
    while d:
        mid = lo + d
        keep, give = ((lo, mid), (mid, hi)) if v < mid else ((mid, hi), (lo, mid))
        (ka, kb), (ga, gb) = span(*keep), span(*give)
        peer = real_rank(v ^ d, rem)
        target = final if (d == 1 and final is not None) else work[ka:kb]
        yield from exchange_reduce(t, cur[ga:gb], peer, cur[ka:kb], peer, target, reduce)
        cur = work
        lo, hi = keep
        d //= 2
    return cur


def _fold(t, src, work, reduce, r, v):
    """Even ranks of the first 2 rem hand their vector to r+1, which reduces it into work."""
    if v < 0:
        yield (t.isend(src, r + 1),)
        return src
    tmp = t.scratch(src.size, src.dtype)
    yield (t.irecv(tmp, r - 1),)
    reduce(tmp, src, work)
    return work


def reduce_scatter(t, src, work, dst, counts, offs, reduce):
    """Reduce src over the ranks; block `rank` (counts/offs per real rank) lands in dst.
    work: full-size array for partial sums (src itself for in-place), or None for scratch."""
    n, r = t.size, t.rank
    p, rem = fold_layout(n)
    v = virtual_rank(r, rem)
    if n == 1:
        if not same_memory(dst, src):
            dst[...] = src[offs[0]:offs[1]]
        return
    if work is None and (p > 2 or r < 2 * rem):   # partial sums beyond the final block
        work = t.scratch(src.size, src.dtype)
    cur = src
    if r < 2 * rem:
        cur = yield from _fold(t, src, work, reduce, r, v)
    if v >= 0:
        def span(lo, hi):   # virtual ranks lo..hi-1 -> their real ranks' elements
            return offs[first_real(lo, rem)], offs[first_real(hi - 1, rem) + (2 if hi - 1 < rem else 1)]
        alone = r >= 2 * rem                    # v's range is exactly this rank's block
        cur = yield from _halving(t, cur, work, v, p, rem, span, reduce, dst if alone else None)
        if not alone:       # odd rank: hand the even neighbour its block, keep its own
            yield (t.isend(cur[offs[r - 1]:offs[r]], r - 1),)
            mine = cur[offs[r]:offs[r + 1]]
            if not same_memory(mine, dst):
                dst[...] = mine
    else:
        yield (t.irecv(dst, r + 1),)


def all_reduce(t, src, out, reduce):
    """out = reduction of src over the ranks (src may be out)."""
    n, r = t.size, t.rank
    p, rem = fold_layout(n)
    v = virtual_rank(r, rem)
    if n == 1:
        if out is not src:
            out[...] = src
        return
    voffs = offsets(block_counts(out.size, p))     # p balanced blocks, one per virtual rank
    cur = src
    if r < 2 * rem:
        cur = yield from _fold(t, src, out, reduce, r, v)
    if v >= 0:
        def span(lo, hi):
            return voffs[lo], voffs[hi]
        cur = yield from _halving(t, cur, out, v, p, rem, span, reduce)
        d = 1                                       # recursive doubling all-gather
        while d < p:
            g, pg = v & ~(d - 1), (v ^ d) & ~(d - 1)
            peer = real_rank(v ^ d, rem)
            yield t.sendrecv(out[voffs[g]:voffs[g + d]], peer, out[voffs[pg]:voffs[pg + d]], peer)
            d *= 2
    if r < 2 * rem:
        yield ((t.irecv(out, r + 1),) if v < 0 else (t.isend(out, r - 1),))
