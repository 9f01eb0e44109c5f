"""A rank that stops (SIGSTOP) in the middle of a job: the watchdog must end the job, naming it.

    mpiexec -n 2 python hang_worker.py handle TIMEOUT
    mpiexec -n N python hang_worker.py train VICTIM METHOD COUNT TRAIN_ARGS...

handle: both ranks start an all_reduce (algo ring) as a non-blocking handle under
ENGINE_COMM_TIMEOUT=TIMEOUT; rank 1 stops itself right after the arrival handshake, rank 0
waits on the handle: its wait must time out naming rank 1.
train: train.py's main on every rank; world rank VICTIM stops itself at its COUNT-th call
of METHOD, one of p2p.irecv (the pipeline's and the ring's receives) or transport.sendrecv
(a step of a collective's algorithm, after the handshake), so the stop lands at a chosen
kind of wait on the other ranks.
"""
import os
import signal
import sys

from collectives.launch import env_rank

mode = sys.argv[1]


def stop_at(cls, name, count):
    """Make this process stop itself at its count-th call of cls.name."""
    orig, calls = getattr(cls, name), [0]

    def wrapper(self, *a, **k):
        calls[0] += 1
        if calls[0] == count:
            print(f"world rank {env_rank()} stops at {name} #{count}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        return orig(self, *a, **k)
    setattr(cls, name, wrapper)


if mode == "handle":
    os.environ["ENGINE_COMM_TIMEOUT"] = sys.argv[2]
    import numpy as np
    from collectives import Communicator
    comm = Communicator()
    h = comm.all_reduce(np.ones(1 << 16), algo="ring", async_op=True)
    if comm.rank == 1:
        print("rank 1 stops after the handshake", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    h.wait()
    print(f"rank {comm.rank} passed the wait", flush=True)
elif mode == "train":
    victim, method, count = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    import train
    from collectives.p2p import PointToPoint
    from collectives.transport import Transport
    train.measure_peak_flops = lambda dtype: 1e9                 # MFU is not under test
    if env_rank() == victim:
        module, name = method.split(".")
        stop_at({"p2p": PointToPoint, "transport": Transport}[module], name, count)
    sys.exit(train.main(sys.argv[5:]))
