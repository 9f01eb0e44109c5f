"""Shrink without a relaunch (Open MPI's ULFM; train.py --on-failure shrink): when a peer dies
mid-step, the survivors stop, agree, shrink the world (collectives/ulfm.py), write the newest
whole state from their buddy replicas (parallel/checkpoint/recover.py) -- or take the newest
disk checkpoint where that is newer -- and build the Run again on the new world by the layout
rule (parallel/config.py shrunk_sizes: shrink dp; keep pp, sp, tp), resumed from that state, as a relaunch
would (train.py prepare: the same checks, the same restore). Ranks the new layout does not use
exit. A lost rank that is stuck rather than dead (SIGSTOP: the failure detector's heartbeat
stops) is killed by the new rank 0 when it runs on the same host. What it costs: the failure
detector's milliseconds, one agreement and shrink, writing the shards to tmpfs and loading them,
and rebuilding the Step (no new processes, no imports).
"""
import itertools
import os
import signal
import time
from dataclasses import asdict

from mpi4py import MPI

from collectives import ulfm
from engine.checkpoint import list_checkpoints
from parallel.checkpoint.recover import write_recovered
from parallel.checkpoint.sharded import exchange
from parallel.config import shrunk_sizes


def peer_table(world):
    """[pid, host] of every rank of ``world`` (a collective), kept so that a stuck rank can be killed."""
    return exchange(world, [os.getpid(), MPI.Get_processor_name()])


def train_shrinking(run, argv, prepare, train):
    """train(run) until it returns, shrinking onto the survivors each time a peer dies. After a
    shrink the process ends without MPI_Finalize (ulfm.exit_now), which would wait for the dead."""
    for shrinks in itertools.count():
        try:
            rc = train(run)
            return ulfm.exit_now(rc, run.mesh.world.mpi) if shrinks else rc
        except Exception as e:                  # noqa: BLE001 -- only a peer's failure is handled
            if not ulfm.is_failure(e):
                raise
        run = shrink_and_resume(run, argv, prepare, shrinks)
        if run is None:                         # the new layout needs fewer ranks than survived
            return ulfm.exit_now(0)


def shrink_and_resume(run, argv, prepare, generation):
    """The Run on the survivors (None on a rank the new layout leaves out). ``prepare``:
    train.py's (argv, world=, data=) -> Run; ``generation``: how many shrinks came before."""
    t0 = time.monotonic()
    new, survivors = ulfm.shrink(run.mesh.world)
    lost = sorted(set(range(run.world)) - set(survivors))
    here = MPI.Get_processor_name()
    for r in lost if new.rank == 0 and run.peers else ():  # a stuck rank is a dead rank: make it one
        pid, host = run.peers[r]
        if host == here:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    cfg, store = run.cfg, run.replicas.store if run.replicas is not None else None
    choice = None
    if new.rank == 0:
        best = None if run.resumed_from is None else (run.resumed_at, run.resumed_from, f"{run.resumed_from} (the "
                                                                                       "state this world began from)")
        if store is not None:
            path, step, _ = write_recovered(store, set(survivors), os.path.join(store, "recovered"),
                                            extra={"continues": os.path.realpath(cfg.out_dir)})
            if path and (best is None or step >= best[0]):
                best = (step, path, f"buddy replicas (step {step})")
        disk = list_checkpoints(cfg.out_dir)
        if disk and (best is None or disk[-1][0] > best[0]):
            best = (disk[-1][0], disk[-1][1], f"the disk checkpoint {disk[-1][1]} (step {disk[-1][0]})")
        choice = best and [best[1], best[2]]
    choice = exchange(new, choice)[0]
    par = run.par
    per = par.pp * par.sp * par.tp
    dp = shrunk_sizes(par, asdict(run.model_cfg), cfg.batch_size, new.size).get(new.size, 0)
    used = dp * per
    sub = new.split(0 if new.rank < used else None, label="world")
    ulfm.linger(new.mpi)                        # a rank left out ends only once all have their split
    if new.rank == 0:
        print(f"shrink: lost rank{'s' * (len(lost) > 1)} {', '.join(map(str, lost))}; {new.size} survivors; "
              + (f"restoring from {choice[1]}" if choice else "starting over (no whole state)")
              + f" onto {used} ranks (dp {dp}); agreed and shrunk in {time.monotonic() - t0:.2f} s", flush=True)
    if sub is None:
        return None
    args = [*argv, "--dp", str(dp)]
    args += ["--resume", choice[0]] if choice else ["--overwrite"]
    if store is not None:
        args += ["--replica-dir", os.path.join(store, f"shrink-{generation + 1}")]
    return prepare(args, world=sub, data=run.data)
