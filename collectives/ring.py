"""Ring reduce-scatter, all-gather and all-reduce: the bandwidth-optimal algorithms.

Source: Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce algorithms for clusters of
workstations" (JPDC 69(2)); Thakur, Rabenseifner & Gropp 2005, "Optimization of collective
communication operations in MPICH" (IJHPCA 19(1)), section 4 (ring all-gather).

The vector is split into N blocks (block b: counts[b] elements at offsets[b]). Rank r sends
to right = r+1 and receives from left = r-1 (mod N). N = 4, reduce-scatter; b' is a partial
sum that has picked up one more rank's contribution:

    step 0   r0 -b3-> r1 -b0-> r2 -b1-> r3 -b2-> r0    each rank sends block r-1 (its own data)
    step 1   r0 -b2'> r1 -b3'> r2 -b0'> r3 -b1'> r0    and adds what arrives to its block r-s-2
    step 2   r0 -b1"> r1 -b2"> r2 -b3"> r3 -b0"> r0    after N-1 steps rank r holds block r reduced

All-gather then circulates the reduced blocks the same way (step s: send block r-s, receive
block r-s-1), and all-reduce is reduce-scatter followed by all-gather.

Reduction order: block b starts at rank b+1 and picks up ranks b+2, b+3, ... in ring order,
ending at its owner b: ((x_{b+1} + x_{b+2}) + ...) + x_b. Every rank receives the same bits.

Cost (alpha latency per message, beta seconds per byte moved, gamma per byte reduced, n bytes):
    reduce-scatter  (N-1) alpha + (N-1)/N n beta + (N-1)/N n gamma
    all-gather      (N-1) alpha + (N-1)/N n beta
    all-reduce      2(N-1) alpha + 2(N-1)/N n beta + (N-1)/N n gamma
Each rank sends and receives 2(N-1)/N n bytes, the lower bound for all-reduce, whatever N.

Pipelining: each reduce-scatter step is segments.exchange_reduce, so large blocks travel
in segments whose reduction overlaps the transfer of the next one. Memory: one block of
scratch (or a few segments when pipelined); none for all-gather.
"""
from .buffers import same_memory
from .segments import exchange_reduce


def reduce_scatter(t, src, work, dst, counts, offs, reduce):
    """Reduce src over the ranks; block `rank` of the result lands in dst.

    work: where partial blocks live (src itself for in-place, the output vector for
    all-reduce) or None to use two block-sized scratch buffers (out-of-place)."""
    n, r = t.size, t.rank
    if n == 1:
        if not same_memory(dst, src):
            dst[...] = src[offs[0]:offs[1]]
        return
    right, left = (r + 1) % n, (r - 1) % n
    scratch = None
    prev = None
    for s in range(n - 1):
        sb, rb = (r - s - 1) % n, (r - s - 2) % n
        send = src[offs[sb]:offs[sb + 1]] if s == 0 else prev
        own = src[offs[rb]:offs[rb + 1]]
        if s == n - 2:
            target = dst                                   # rb == r: the final block
        elif work is not None:
            target = work[offs[rb]:offs[rb + 1]]
        else:
            if scratch is None:
                big = max(counts)
                scratch = (t.scratch(big, src.dtype), t.scratch(big, src.dtype))
            target = scratch[s % 2][:counts[rb]]
        yield from exchange_reduce(t, send, right, own, left, target, reduce)
        prev = target


def all_gather(t, out, counts, offs, first=None):
    """out holds this rank's block at offs[rank] (or `first` does: it is sent from there in step 0
    and copied into out afterwards); afterwards out holds every block."""
    n, r = t.size, t.rank
    right, left = (r + 1) % n, (r - 1) % n
    for s in range(n - 1):
        sb, rb = (r - s) % n, (r - s - 1) % n
        send = first if s == 0 and first is not None else out[offs[sb]:offs[sb + 1]]
        yield t.sendrecv(send, right, out[offs[rb]:offs[rb + 1]], left)
    if first is not None:
        out[offs[r]:offs[r + 1]] = first


def all_reduce(t, src, out, counts, offs, reduce):
    """out = reduction of src over the ranks (src may be out: in place)."""
    r = t.rank
    yield from reduce_scatter(t, src, out, out[offs[r]:offs[r + 1]], counts, offs, reduce)
    yield from all_gather(t, out, counts, offs)
