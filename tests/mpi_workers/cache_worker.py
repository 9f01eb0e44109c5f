"""cache=False keeps no fast-path plan: 20 reduce-scatters, all-reduces and all-gathers of fresh
arrays hold no more memory than the first 5 did (the scratch pool is reused; with the default,
the fast path's plans keep up to PLANS of the arrays)."""
import gc
import tracemalloc

import numpy as np

from collectives import Communicator

comm = Communicator()
tracemalloc.start()
for i in range(25):
    if i == 5:
        gc.collect()
        base = tracemalloc.get_traced_memory()[0]
    x = np.ones(1 << 16, np.float32)
    comm.reduce_scatter(x, out=np.empty(x.size // comm.size, np.float32), cache=False)
    comm.all_reduce(np.ones(1 << 16, np.float32), cache=False)
    comm.all_gather(np.ones(1 << 12, np.float32), out=np.empty(comm.size << 12, np.float32), cache=False)
    del x
gc.collect()
held = tracemalloc.get_traced_memory()[0] - base
print("OK" if held < (1 << 16) else f"rank {comm.rank} holds {held} bytes", flush=True)
