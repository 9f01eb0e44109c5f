"""collectives/ulfm.linger under any MPI (no failure needed): the wait that every rank makes
before one may end without MPI_Finalize (ulfm.exit_now).

Case 1, "late": rank r arrives after r * 0.3 s (from a common start); no rank may leave linger
before the last one has arrived. Case 2, "deadline": ranks 0 .. N-2 linger with a 0.5 s deadline
while rank N-1 arrives only after 1.5 s; they must leave at their deadline, not wait for it.
Each rank times its leaving (from the case's start); rank 0 gathers the times and prints
"rank R: CASE left at T s" for every rank (one process writing: the ranks' own prints could
interleave on one line, and a CI run's did). The gather ends each case, so the last rank's late
barrier completes before the next case.
"""
import time

import numpy as np
from mpi4py import MPI

from collectives import ulfm

world = MPI.COMM_WORLD
r, n = world.rank, world.size
for case, arrive, seconds in (("late", 0.3 * r, 30.0), ("deadline", 1.5 if r == n - 1 else 0.0, 0.5)):
    world.Barrier()
    t0 = time.monotonic()
    time.sleep(arrive)
    ulfm.linger(world, seconds)
    left = np.array([time.monotonic() - t0])
    times = np.empty(n) if r == 0 else None
    world.Gather(left, times, root=0)
    if r == 0:
        print("".join(f"rank {i}: {case} left at {t:.3f} s\n" for i, t in enumerate(times)), end="", flush=True)
