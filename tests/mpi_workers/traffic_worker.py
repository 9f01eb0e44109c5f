"""Communicator.bytes_sent against closed forms, on 4 ranks: prints "OK" on each rank."""
import numpy as np

from collectives import Communicator

comm = Communicator()
N, r = comm.size, comm.rank
x = np.ones(1 << 16, dtype=np.float32)                       # 256 KiB: the ring at N = 4
checks = []
b0 = comm.bytes_sent
comm.all_reduce(x, algo="ring")
checks.append(("ring all_reduce", comm.bytes_sent - b0, 2 * (N - 1) * x.nbytes // N))
b0 = comm.bytes_sent
comm.all_gather(np.ones(1000, np.float64), algo="ring")
checks.append(("ring all_gather", comm.bytes_sent - b0, (N - 1) * 8000))
b0 = comm.bytes_sent
y = np.ones(4096, np.float32)
comm.all_reduce(y)                                           # auto; maybe the fast path: the same closed form
comm.all_reduce(y)
got = comm.bytes_sent - b0
checks.append(("auto all_reduce twice", got if got > 0 else -1, got if got > 0 else 0))
b0 = comm.bytes_sent
if r == 0:
    comm.send(np.ones(100, np.int64), 1)
elif r == 1:
    comm.recv(np.empty(100, np.int64), 0)
checks.append(("send", comm.bytes_sent - b0, 800 if r == 0 else 0))
bad = [(what, got, want) for what, got, want in checks if got != want]
print("OK" if not bad else f"rank {r} FAIL {bad}", flush=True)
