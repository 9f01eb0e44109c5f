"""collectives/ulfm.linger under any MPI (no failure needed): the wait that every rank makes
before one may end without MPI_Finalize (ulfm.exit_now).

Case 1, "late": rank r arrives after r * 0.3 s (from a common start); no rank may leave linger
before the last one has arrived. Case 2, "deadline": ranks 0 .. N-2 linger with a 0.5 s deadline
while rank N-1 arrives only after 1.5 s; they must leave at their deadline, not wait for it.
Each rank prints "rank R: CASE left at T s" (from the case's start); a world barrier ends each
case, so the last rank's late barrier completes before the next case.
"""
import time

from mpi4py import MPI

from collectives import ulfm

world = MPI.COMM_WORLD
r, n = world.rank, world.size
for case, arrive, seconds in (("late", 0.3 * r, 30.0), ("deadline", 1.5 if r == n - 1 else 0.0, 0.5)):
    world.Barrier()
    t0 = time.monotonic()
    time.sleep(arrive)
    ulfm.linger(world, seconds)
    print(f"rank {r}: {case} left at {time.monotonic() - t0:.3f} s", flush=True)
    world.Barrier()
