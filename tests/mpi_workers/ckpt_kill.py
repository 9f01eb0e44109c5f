"""A rank killed (SIGKILL) in the middle of a sharded save leaves no half checkpoint.

    mpiexec -n 3 python tests/mpi_workers/ckpt_kill.py OUT kill|again

"kill": saves step 1, then at step 2 rank 1 writes its shard and kills itself before the
manifest exists; the launcher ends the job. The pytest side then finds ``latest`` -> step_1,
no step_2, and step_1 whole. "again": the next run's save of step 2 removes the dead
writer's temporary directory and publishes step_2.
"""
import os
import signal
import sys

import numpy as np

import parallel.checkpoint.sharded as pc
from collectives import Communicator
from engine.flat import FlatParameters, shard_range
from models.gpt import GPT, GPTConfig

out, mode = sys.argv[1], sys.argv[2]
comm = Communicator()
model = GPT(GPTConfig(block_size=8, vocab_size=23, n_layer=1, n_head=2, n_embd=10), np.random.default_rng(0))
flat = FlatParameters(model.named_parameters(), world=comm.size)


def state(step):
    lo, hi = shard_range(flat.numel["float32"], comm.rank, comm.size)
    p = flat.data["float32"][lo:hi] + step
    return {"params": {"float32": p}, "optim": {"float32": {"m": p * 0, "v": p * 0, "step": step}}}


if mode == "kill":
    pc.save_sharded(out, 1, comm, flat, state(1), {})
    original = pc.save_safetensors

    def write_then_die(path, tensors, metadata=None):
        original(path, tensors, metadata)
        if comm.rank == 1:
            print("rank 1: shard written, dying", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    pc.save_safetensors = write_then_die
    pc.save_sharded(out, 2, comm, flat, state(2), {})
    print(f"rank {comm.rank}: step 2 published", flush=True)
else:
    print("again:", pc.save_sharded(out, 2, comm, flat, state(2), {}), flush=True)
