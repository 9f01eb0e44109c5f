"""Bad sequence-parallel input fails the same way on every rank: one line, exit code 2.

    mpiexec -n N python tests/mpi_workers/sp_error_worker.py MODE SEQ_LEN

Builds a GPT under SequenceParallel(world, model, MODE) and shards a (2, SEQ_LEN) batch; a
length the split cannot divide raises SequenceParallelError, and every rank prints
"rank R: SequenceParallelError: ..." and exits 2 (what train.py does with bad config).
A good length trains one step and prints "rank R: ok loss=<value>".
"""
import sys

import numpy as np

from collectives import Communicator
from models.gpt import GPT, GPTConfig
from parallel.sequence import SequenceParallel, SequenceParallelError

mode, T = sys.argv[1], int(sys.argv[2])
comm = Communicator()
try:
    model = GPT(GPTConfig(block_size=64, vocab_size=16, n_layer=1, n_head=2, n_embd=8), rng=0)
    sp = SequenceParallel(comm, model, mode=mode)
    x = np.random.default_rng(0).integers(0, 16, (2, T))
    loss = sp.forward_backward(x, x)
except SequenceParallelError as e:
    print(f"rank {comm.rank}: SequenceParallelError: {e}", flush=True)
    raise SystemExit(2)
print(f"rank {comm.rank}: ok loss={loss:.6f}", flush=True)
