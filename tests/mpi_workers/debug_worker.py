"""No silent failure: ENGINE_COMM_DEBUG mismatches, the ENGINE_COMM_TIMEOUT watchdog, ENGINE_TRACE.

    ENGINE_COMM_DEBUG=1   mpiexec -n 3 python debug_worker.py mismatch
    ENGINE_COMM_TIMEOUT=2 mpiexec -n 3 python debug_worker.py skip
    ENGINE_TRACE=1        mpiexec -n 2 python debug_worker.py trace

mismatch: the last rank calls each collective differently (count, then dtype, then op,
then a different collective, a different root, non-blocking); every rank must raise CollectiveMismatchError and prints
"rank R caught: <message>".
skip: the last rank skips an all_reduce and sleeps; the others must be aborted by the
watchdog with a message naming it, well before the sleep ends.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from collectives import CollectiveMismatchError, Communicator

comm = Communicator()
R, N = comm.rank, comm.size
last = R == N - 1
mode = sys.argv[1]

if mode == "mismatch":
    calls = [
        lambda: comm.all_reduce(np.ones(5 if last else 4)),
        lambda: comm.all_reduce(np.ones(4, np.float32 if last else np.float64)),
        lambda: comm.all_reduce(np.ones(4), op="max" if last else "sum"),
        lambda: comm.barrier() if last else comm.all_reduce(np.ones(4)),
        lambda: comm.broadcast(np.ones(4), root=1 if last else 0),
        lambda: comm.barrier(async_op=last),          # blocking and non-blocking do not match (MPI's rule)
    ]
    for call in calls:
        try:
            call()
            print(f"rank {R} not caught", flush=True)
        except CollectiveMismatchError as e:
            print(f"rank {R} caught: {e}", flush=True)
    comm.all_reduce(np.ones(3))          # still usable afterwards
    print(f"rank {R} done", flush=True)
elif mode == "skip":
    comm.all_reduce(np.ones(4))
    if last:
        time.sleep(60)                   # never arrives at the next collective
    else:
        comm.all_reduce(np.ones(4))
    print(f"rank {R} passed the skipped collective", flush=True)
elif mode == "trace":
    comm.all_reduce(np.ones(4, np.float32), algo="ring")
    comm.send(np.ones(2), (R + 1) % N) if R == 0 else comm.recv(np.empty(2), 0)
MPI.COMM_WORLD.Barrier()
