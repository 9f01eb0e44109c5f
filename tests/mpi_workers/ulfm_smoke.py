"""ULFM smoke test: the MPI library itself survives a rank's death (User Level Failure
Mitigation; Bland, Bouteiller, Herault, Bosilca and Dongarra 2013, "Post-failure recovery of
MPI communication capability: design and rationale").

    mpiexec --with-ft ulfm --mca pml ob1 --mca btl tcp,self --mca mpi_ft_detector true \
        -n 3 python tests/mpi_workers/ulfm_smoke.py          # Open MPI (tests/mpi_util.ULFM)

World rank 2 kills itself (SIGKILL) after a barrier. Each survivor then calls
MPI_Comm_agree, which must raise MPI_ERR_PROC_FAILED (the world lost a member), acknowledges
the failure and reads the failed group (it must be {2}), and calls MPI_Comm_shrink, which
must give a communicator of the 2 survivors in world order, on which an allreduce of
10 * (world rank + 1) must be 10 + 20 = 30. Agree is a fault-tolerant consensus (O(log N)
rounds once the failure detector has seen the death); shrink is one more agreement plus a
new context id. Each survivor prints one line "rank R: ..." with what it saw and the seconds
from the failure to the allreduce's result; a broken step prints "rank R: FAIL ..." instead.
"""
import os
import signal
import sys
import time

from mpi4py import MPI

from collectives.ulfm import exit_now

world = MPI.COMM_WORLD          # mpi4py sets MPI_ERRORS_RETURN: a failure raises MPI.Exception
world.Barrier()
if world.rank == 2:
    os.kill(os.getpid(), signal.SIGKILL)

t0 = time.monotonic()
try:
    world.Agree(1)
    print(f"rank {world.rank}: FAIL Agree returned although rank 2 is dead", flush=True)
    os._exit(1)
except MPI.Exception as e:
    agree = e.Get_error_class()
world.Ack_failed()
failed = world.Get_failed()
dead = failed.Translate_ranks(list(range(failed.size)), world.Get_group())
small = world.Shrink()
total = small.allreduce(10 * (world.rank + 1))
elapsed = time.monotonic() - t0
ok = agree == MPI.ERR_PROC_FAILED and dead == [2] and (small.size, small.rank) == (2, world.rank) and total == 30
sys.stdout.write(f"rank {world.rank}: {'' if ok else 'FAIL '}agree raised error class {agree} (ERR_PROC_FAILED is "
                 f"{MPI.ERR_PROC_FAILED}), failed {dead}, shrink: rank {small.rank} of {small.size}, allreduce {total}, "
                 f"{elapsed:.2f} s\n")   # one write: print's text and newline are two under PYTHONUNBUFFERED,
sys.stdout.flush()                        # and the two survivors' lines could interleave
# No MPI_Finalize (after a shrink Open MPI's waits for the dead rank, and a CI run saw it hang past
# the test's 60 s), but first linger until both have the result: a rank ending so can take its
# last, unflushed message with it, failing the other's receive (a CI run saw that too). What
# train.py does after a shrink: collectives/ulfm.py exit_now.
exit_now(0 if ok else 1, small)
