"""Communicator.bytes_sent and bytes_by_kind against closed forms, on 4 ranks: prints "OK" on
each rank. Each call's bytes must also land under its own kind and no other."""
import numpy as np

from collectives import Communicator
from collectives.direct import PLANS

comm = Communicator()
N, r = comm.size, comm.rank
checks = []


def counted(kind, what, call, want):
    """Run call(); check the total and that every byte is counted under kind."""
    b0, k0 = comm.bytes_sent, comm.bytes_by_kind
    call()
    got, k1 = comm.bytes_sent - b0, comm.bytes_by_kind
    delta = {k: k1[k] - k0[k] for k in k1 if k1[k] != k0[k]}
    checks.append((what, got, want(got)))
    checks.append((what + " by kind", delta, {kind: got} if got else {}))


x = np.ones(1 << 16, dtype=np.float32)                       # 256 KiB: the ring at N = 4
counted("all_reduce", "ring all_reduce", lambda: comm.all_reduce(x, algo="ring"),
        lambda got: 2 * (N - 1) * x.nbytes // N)
counted("all_gather", "ring all_gather", lambda: comm.all_gather(np.ones(1000, np.float64), algo="ring"),
        lambda got: (N - 1) * 8000)
y = np.ones(4096, np.float32)
# auto; maybe the fast path: the same closed form, counted under the same kind
counted("all_reduce", "auto all_reduce twice", lambda: (comm.all_reduce(y), comm.all_reduce(y)),
        lambda got: got if got > 0 else -1)
# the fast path's plans count through meters (calls.Traffic.meter): every replay, and a plan
# evicted (direct.PLANS kept) has its runs counted when it goes; recursive doubling: log2 N sends of all
small = [np.zeros(16, np.float32) for _ in range(PLANS + 2)]
counted("all_reduce", "auto all_reduce, replayed plans and evicted ones",
        lambda: [comm.all_reduce(a) for _ in range(3) for a in small], lambda got: 3 * len(small) * 2 * 64)
checks.append(("plans kept", comm.plan_stats()["kept"], PLANS))
z = np.ones(4096, np.float32)
counted("reduce_scatter", "auto reduce_scatter", lambda: comm.reduce_scatter(z),
        lambda got: (N - 1) * z.nbytes // N)                 # recursive halving at N = 4: (N-1)/N n
counted("all_to_all", "all_to_all", lambda: comm.all_to_all(np.ones(4 * N, np.float32)), lambda got: (N - 1) * 16)


def send():
    if r == 0:
        comm.send(np.ones(100, np.int64), 1)
    elif r == 1:
        comm.recv(np.empty(100, np.int64), 0)


counted("p2p", "send", send, lambda got: 800 if r == 0 else 0)
bad = [(what, got, want) for what, got, want in checks if got != want]
print("OK" if not bad else f"rank {r} FAIL {bad}", flush=True)
