"""train.py with faults injected, for the elastic tests and bench.elastic: the ranks named in
ENGINE_FAULTS stop as a machine that dies (SIGKILL) or hangs (SIGSTOP) would, at the start of
a given step of a given world: the supervisor numbers its launches in ELASTIC_LAUNCH, and each
in-place shrink (train.py --on-failure shrink) starts the next number.

    ENGINE_FAULTS="LAUNCH:RANK:STEP[:kill|stop];..." mpiexec -n N python tests/mpi_workers/train_faults.py [flags]

STEP 0 stops the rank while the job restores its state, before the first step. A killed rank's
buddy-replica files go with it (a dead machine's RAM is lost), so recovery must use the copies
its buddy holds. RANK may name
several ranks joined by "+" (1+2): the first kills the others, waits until they are dead,
and kills itself, so they die within a millisecond of each other, as the ranks of one machine do. The hook wraps
train.train_step and train.prepare from outside, so production code carries no test hooks.
"""
import os
import shutil
import signal
import sys
import time

import numpy as np

import train

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}


def faults(here):
    """{(rank, step): (signal, [ranks it takes down with it])} of world number ``here``."""
    out = {}
    for item in filter(None, os.environ.get("ENGINE_FAULTS", "").split(";")):
        launch, ranks, step, *how = item.split(":")
        first, *others = map(int, ranks.split("+"))
        if int(launch) == here:
            out[(first, int(step))] = (SIGNALS[how[0] if how else "kill"], others)
    return out


FAULTS, PIDS, WORLDS = {}, [], [int(os.environ.get("ELASTIC_LAUNCH", "0"))]


def maybe_die(run, step):
    rank = run.rank
    sig, others = FAULTS.get((rank, step), (None, ()))
    if sig is not None:
        print(f"rank {rank}: {'killed' if sig == signal.SIGKILL else 'stopped'} at step {step}"
              + (f" with ranks {others}" if others else ""), flush=True)
        if sig == signal.SIGKILL and run.cfg.replica_dir:     # a dead machine's RAM is gone with it
            for r in (*others, rank):
                shutil.rmtree(os.path.join(run.cfg.replica_dir, f"rank-{r}"), ignore_errors=True)
        for r in others:
            os.kill(PIDS[r], sig)
            gone(PIDS[r])
        os.kill(os.getpid(), sig)


def gone(pid, timeout=2.0):
    """Wait until a killed process is dead (a zombie or reaped): on a busy machine SIGKILL
    takes effect only when the process is next scheduled."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in "ZX":
                    return
        except OSError:
            return
        time.sleep(0.0005)


step_fn, prepare = train.train_step, train.prepare


def train_step(run, lr):
    maybe_die(run, run.step)
    return step_fn(run, lr)


def prepare_then_maybe_die(argv, **kw):
    run = prepare(argv, **kw)
    FAULTS.clear()                                      # this world's faults: relaunches and shrinks count
    FAULTS.update(faults(WORLDS[0]))
    WORLDS[0] += 1
    if run.world > 1:                                   # every rank's pid, for "1+2" faults
        PIDS[:] = [int(p) for p in run.mesh.world.all_gather(np.array([os.getpid()], np.int64))]
    maybe_die(run, 0)
    return run


train.train_step, train.prepare = train_step, prepare_then_maybe_die
sys.exit(train.main(sys.argv[1:]))
