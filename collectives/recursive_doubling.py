"""Recursive doubling all-reduce and all-gather: the latency-optimal algorithms.

Source: Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication
operations in MPICH" (IJHPCA 19(1)), sections 4.2 (all-gather) and 4.4 (all-reduce,
short messages), with the fold for rank counts that are not a power of two.

Power of two N = 8, all-reduce: at distance d = 1, 2, 4 rank r exchanges its whole partial
vector with r XOR d and reduces, so after lg N steps every rank holds the full reduction:

    d=1   (0 1) (2 3) (4 5) (6 7)          0..7: partial sums over groups of 2
    d=2   (0 2) (1 3) (4 6) (5 7)          groups of 4
    d=4   (0 4) (1 5) (2 6) (3 7)          everyone: the total

All-gather is the same pattern exchanging what each rank has so far (d blocks at step d).

Any other N: with p = the largest power of two <= N and rem = N - p, the first 2 rem ranks
pair up (even -> odd): the even rank hands its data to its odd neighbour and sits out; the
p remaining ranks ("virtual ranks" v = r//2 for odd r < 2 rem, v = r - rem above) run the
power-of-two algorithm, and the odd ranks finally hand the result back:

    fold     0 -> 1   2 -> 3        (N = 6, p = 4, rem = 2)
    core     virtual ranks 0..3 = real ranks 1, 3, 4, 5
    unfold   1 -> 0   3 -> 2

Reduction order: both partners of a step compute (lower rank's partial) op (higher
rank's partial), the same expression, so every rank receives the same bits even where op
breaks ties by operand order (np.maximum of +0.0 and -0.0, NaNs with different payloads).

Cost (n bytes, lg = log2 p, fold terms only when N is not a power of two):
    all-reduce   lg (alpha + n beta + n gamma)  [+ 2 alpha + 2 n beta + n gamma]
    all-gather   lg alpha + (p-1)/p n beta      [+ 2 alpha + n beta]
Latency-optimal (lg N messages) but all-reduce moves n lg N bytes: for short messages.
Each all-reduce step is segments.exchange_reduce. Memory: one n-byte scratch vector.
"""
from .segments import exchange_reduce


def fold_layout(n):
    """(p, rem): p the largest power of two <= n, rem = n - p ranks folded away."""
    p = 1
    while p * 2 <= n:
        p *= 2
    return p, n - p


def virtual_rank(r, rem):
    """The rank in the power-of-two core, or -1 for an even rank that folds away."""
    if r < 2 * rem:
        return r // 2 if r % 2 else -1
    return r - rem


def real_rank(v, rem):
    return 2 * v + 1 if v < rem else v + rem


def first_real(v, rem):
    """The lowest real rank whose data virtual rank v carries."""
    return 2 * v if v < rem else v + rem


def lower_first(reduce, peer_is_lower):
    """reduce(received, own, out) as (lower rank's partial) op (higher rank's partial)."""
    if peer_is_lower:
        return reduce
    return lambda received, own, out: reduce(own, received, out)


def all_reduce(t, src, out, reduce):
    """out = reduction of src over the ranks (src may be out)."""
    n, r = t.size, t.rank
    p, rem = fold_layout(n)
    v = virtual_rank(r, rem)
    cur = src                                  # becomes out after the first reduction
    if r < 2 * rem:                            # fold
        if v < 0:
            yield (t.isend(src, r + 1),)
        else:
            tmp = t.scratch(out.size, out.dtype)
            yield (t.irecv(tmp, r - 1),)
            reduce(tmp, cur, out)
            cur = out
    if v >= 0:
        d = 1
        while d < p:
            peer = real_rank(v ^ d, rem)
            yield from exchange_reduce(t, cur, peer, cur, peer, out, lower_first(reduce, peer < r),
                                       target_is_send=cur is out)
            cur = out
            d *= 2
        if cur is not out:                     # N == 1
            out[...] = src
    if r < 2 * rem:                            # unfold
        yield ((t.irecv(out, r + 1),) if v < 0 else (t.isend(out, r - 1),))


def all_gather(t, out, counts, offs, first=None):
    """out holds this rank's block at offs[rank] (or `first` does: it is sent from there in the
    first step and copied into out afterwards); afterwards out holds every block."""
    n, r = t.size, t.rank
    p, rem = fold_layout(n)
    v = virtual_rank(r, rem)
    if first is not None and (r < 2 * rem or n == 1):    # folded ranks send a range: place it now
        out[offs[r]:offs[r + 1]] = first
        first = None
    if r < 2 * rem:                            # fold: the even rank's block joins the odd one's
        if v < 0:
            yield (t.isend(out[offs[r]:offs[r + 1]], r + 1),)
        else:
            yield (t.irecv(out[offs[r - 1]:offs[r]], r - 1),)

    def span(v0, m):                           # elements of virtual ranks v0 .. v0+m-1
        return offs[first_real(v0, rem)], offs[first_real(v0 + m - 1, rem) + (2 if v0 + m - 1 < rem else 1)]

    if v >= 0:
        d = 1
        while d < p:
            mine, theirs = span(v & ~(d - 1), d), span((v ^ d) & ~(d - 1), d)
            peer = real_rank(v ^ d, rem)
            send = first if first is not None else out[mine[0]:mine[1]]
            yield t.sendrecv(send, peer, out[theirs[0]:theirs[1]], peer)
            if first is not None:
                out[offs[r]:offs[r + 1]] = first
                first = None
            d *= 2
    if r < 2 * rem:                            # unfold
        yield ((t.irecv(out, r + 1),) if v < 0 else (t.isend(out, r - 1),))
