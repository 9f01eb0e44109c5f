"""Dissemination barrier: ceil(log2 N) rounds of empty messages, any N.

Source: Hensgen, Finkel & Manber 1988, "Two algorithms for barrier synchronization"
(IJPP 17(1)); Thakur, Rabenseifner & Gropp 2005 (MPICH's barrier).

In round k rank r signals rank r + 2^k and waits for rank r - 2^k (mod N). After round k
each rank has heard, directly or through a chain, from the 2^(k+1) - 1 ranks before it, so
after ceil(log2 N) rounds from everyone: nobody leaves before all have arrived.

    N = 6   round 0: r -> r+1     round 1: r -> r+2     round 2: r -> r+4

Cost: ceil(log2 N) alpha (zero bytes).
"""
import numpy as np

_EMPTY_SEND = np.empty(0, np.uint8)
_EMPTY_RECV = np.empty(0, np.uint8)


def barrier(t):
    n, r = t.size, t.rank
    d = 1
    while d < n:
        yield t.sendrecv(_EMPTY_SEND, (r + d) % n, _EMPTY_RECV, (r - d) % n)
        d *= 2
