"""Pairwise-exchange all-to-all, with even or uneven blocks (all-to-all-v).

Source: Thakur, Rabenseifner & Gropp 2005, "Optimization of collective communication
operations in MPICH" (IJHPCA 19(1)), section 4.6 (long messages: pairwise exchange).

Rank r's input holds one block for every rank; block j goes to rank j, and the block
arriving from rank j lands at block j of the output. In step s = 1 .. N-1 every rank sends
to one partner and receives from one, so no rank is ever the target of two senders:

    N a power of two: partner r XOR s (a true exchange)
        s=1  (0 1)(2 3)     s=2  (0 2)(1 3)     s=3  (0 3)(1 2)
    otherwise: send to r + s, receive from r - s (mod N)
        N=3  s=1  0->1->2->0     s=2  0->2->1->0

Step 0 is the local copy of block r. Uneven blocks: send_counts[j] elements go to rank j,
recv_counts[j] come from rank j, each side at its prefix-sum offsets.

Cost (n bytes sent per rank in total):  (N-1) alpha + (N-1)/N n beta
Memory: none out of place; a copy of the input in place.
"""


def all_to_all(t, src, out, send_counts, send_offs, recv_counts, recv_offs):
    """out[block j] = rank j's src[block rank]."""
    n, r = t.size, t.rank
    out[recv_offs[r]:recv_offs[r + 1]] = src[send_offs[r]:send_offs[r + 1]]
    power_of_two = n & (n - 1) == 0
    for s in range(1, n):
        if power_of_two:
            to = frm = r ^ s
        else:
            to, frm = (r + s) % n, (r - s) % n
        yield t.sendrecv(src[send_offs[to]:send_offs[to + 1]], to,
                         out[recv_offs[frm]:recv_offs[frm + 1]], frm)
