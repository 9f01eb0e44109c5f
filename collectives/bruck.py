"""Bruck all-gather: ceil(log2 N) steps for any N.

Source: Bruck, Ho, Kipnis, Upfal & Weathersby 1997, "Efficient algorithms for all-to-all
communications in multiport message-passing systems" (IEEE TPDS 8(11)); Thakur,
Rabenseifner & Gropp 2005, section 4.2 (MPICH's all-gather for non-power-of-two N).

Rank r keeps a rotated buffer whose slot i holds the block of rank (r + i) mod N; slot 0 is
its own block. At step k (distance d = 2^k) it sends its first min(d, N - d) slots to
rank r - d and receives the same number of slots from rank r + d into slots d, d+1, ...:

    N = 5, rank 0     slots hold ranks        after step
    start             0                       -
    d=1  recv from 1  0 1                     1
    d=2  recv from 2  0 1 2 3                 2
    d=4  recv from 4  0 1 2 3 4   (1 slot)    3

A final local rotation puts slot i at block (r + i) mod N of the output. Uneven block
counts work unchanged: slot sizes follow the rotated counts.

Cost (n bytes gathered, lg = ceil(log2 N)):  lg alpha + (N-1)/N n beta + n gamma
(the last term is the rotation copy). Fewer messages than the ring and, unlike recursive
doubling, no fold for non-powers of two. Memory: one n-byte scratch vector.
"""
from .buffers import offsets


def all_gather(t, out, counts, offs):
    """out holds this rank's block at offs[rank]; afterwards every block."""
    n, r = t.size, t.rank
    if n == 1:
        return
    rot = [counts[(r + i) % n] for i in range(n)]     # slot i holds rank r+i
    roffs = offsets(rot)
    total = roffs[n]
    buf = t.scratch(total, out.dtype)
    buf[:rot[0]] = out[offs[r]:offs[r + 1]]
    d = 1
    while d < n:
        k = min(d, n - d)
        yield t.sendrecv(buf[:roffs[k]], (r - d) % n, buf[roffs[d]:roffs[d + k]], (r + d) % n)
        d *= 2
    # rotate: slots 0 .. N-1-r hold ranks r .. N-1; the rest hold ranks 0 .. r-1
    head = total - offs[r]
    out[offs[r]:] = buf[:head]
    out[:offs[r]] = buf[head:]
