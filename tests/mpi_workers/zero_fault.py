"""A rank that stops or dies in the middle of a data-parallel step must end the job, not hang.

    ENGINE_COMM_TIMEOUT=3 mpiexec -n N python tests/mpi_workers/zero_fault.py stall|kill STAGE

Trains a tiny GPT with ZeroEngine; on step 2 the last rank, in the middle of backward
(a grad hook on the first block's c_attn weight), either sleeps for a minute ("stall": the
others' watchdog must name it and abort the job) or kills itself with SIGKILL ("kill": the
launcher must end the job). Each rank prints "rank R pid P" first, so a test can match the
launcher's message, which names the pid, to the rank.
"""
import os
import signal
import sys
import time

import numpy as np

from collectives import Communicator
from models.gpt import GPT, GPTConfig
from parallel.data import ZeroEngine

mode, stage = sys.argv[1], int(sys.argv[2])
comm = Communicator()
R, N = comm.rank, comm.size
print(f"rank {R} pid {os.getpid()}", flush=True)
model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=2, n_head=2, n_embd=8), np.random.default_rng(0))
eng = ZeroEngine(model, comm, stage=stage, bucket_bytes=256)
step = 0


def fault(p):
    if R == N - 1 and step == 2:
        print(f"rank {R}: {mode} in the middle of backward", flush=True)
        if mode == "stall":
            time.sleep(60)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


model.blocks[0].attn.c_attn.weight.register_grad_hook(fault)
x = np.random.default_rng(1).integers(0, 16, size=(2, 8))
for step in range(1, 4):
    eng.zero_grad()
    loss = eng(x, x)[1]
    eng.backward(loss)
    eng.step(1e-3)
print(f"rank {R} finished", flush=True)
