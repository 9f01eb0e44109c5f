"""Binomial-tree broadcast and reduce (and all-reduce as reduce + broadcast).

Source: Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication
operations in MPICH" (IJHPCA 19(1)), sections 4.1 (broadcast, short messages) and 4.5
(reduce, short messages, commutative ops).

Ranks are renumbered relative to the root, vr = (r - root) mod N. Broadcast, N = 8: in
round k every rank that has the data sends it 2^(lg N - 1 - k) ranks further on:

    round 0   0 -> 4
    round 1   0 -> 2          4 -> 6
    round 2   0 -> 1  2 -> 3  4 -> 5  6 -> 7

Reduce is the mirror image: a rank first receives and reduces the partial results of its
children (vr + 1, vr + 2, vr + 4, ... while vr has that bit clear), then sends its own
partial to its parent (vr with the lowest set bit cleared):

    round 0   1 -> 0  3 -> 2  5 -> 4  7 -> 6
    round 1   2 -> 0          6 -> 4
    round 2   4 -> 0

Reduction order: a child's partial c is combined with one's own partial y as c op y,
children in increasing distance; for N = 4 and root 0: (x3 + x2) + (x1 + x0).

Cost (n bytes, lg = ceil(log2 N)):
    broadcast   lg (alpha + n beta)
    reduce      lg (alpha + n beta + n gamma)
    all-reduce  2 lg alpha + 2 lg n beta + lg n gamma   (reduce to 0, then broadcast)
Latency-optimal; the whole vector crosses every level, so for short messages.
Memory: one n-byte scratch vector on ranks with children.
"""


def broadcast(t, buf, root):
    """buf on `root` is copied to buf on every rank."""
    n, r = t.size, t.rank
    vr = (r - root) % n
    mask = 1
    while mask < n:
        if vr & mask:
            yield (t.irecv(buf, (r - mask) % n),)      # parent: vr - mask
            break
        mask *= 2
    mask //= 2
    sends = []
    while mask > 0:
        if vr + mask < n:
            sends.append(t.isend(buf, (r + mask) % n))
        mask //= 2
    if sends:
        yield sends


def reduce(t, src, acc, root, reduce):
    """Reduction of src over the ranks into acc on `root`. acc is where this rank's partial
    results accumulate (src itself in place; on non-roots a scratch vector or src)."""
    n, r = t.size, t.rank
    vr = (r - root) % n
    cur, tmp = src, None
    mask = 1
    while mask < n:
        if vr & mask:
            yield (t.isend(cur, (r - mask) % n),)       # parent: vr - mask
            break
        if vr + mask < n:
            if tmp is None:
                tmp = t.scratch(src.size, src.dtype)
            yield (t.irecv(tmp, (r + mask) % n),)      # child: vr + mask
            reduce(tmp, cur, acc)
            cur = acc
        mask *= 2
    if vr == 0 and cur is not acc:
        acc[...] = src


def all_reduce(t, src, out, reduce_fn):
    """out = reduction of src over the ranks: binomial reduce to rank 0, then broadcast."""
    yield from reduce(t, src, out, 0, reduce_fn)
    yield from broadcast(t, out, 0)
