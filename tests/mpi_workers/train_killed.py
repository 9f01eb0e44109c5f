"""train.py with a test hook injected: rank KILL_RANK (default the last) SIGKILLs itself right
after the step-KILL_AT checkpoint is published, as a machine that dies would.

    mpiexec -n N python tests/mpi_workers/train_killed.py KILL_AT [train.py flags...]

The hook wraps train.save_checkpoint from outside, so production code carries no test hooks.
"""
import os
import signal
import sys

import train

kill_at, argv = int(sys.argv[1]), sys.argv[2:]
save = train.save_checkpoint


def save_then_die(run, rec):
    path = save(run, rec)
    if run.step == kill_at and run.rank == int(os.environ.get("KILL_RANK", run.world - 1)):
        print(f"rank {run.rank}: killed after the step {run.step} checkpoint", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return path


train.save_checkpoint = save_then_die
sys.exit(train.main(argv))
