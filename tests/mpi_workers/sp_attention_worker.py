"""Ring attention and Ulysses against one-process attention, float64, in ONE launch:

    mpiexec -n 8 python tests/mpi_workers/sp_attention_worker.py

For every N = 1 .. world size the first N ranks form an sp communicator (the others wait)
and run, for both modes, causal and not, several head counts (Ulysses: uneven ones too)
and both layouts, the sharded attention's output and the gradients of q, k, v for a
random upstream gradient. The reference is a dense softmax written here in NumPy
(independent of engine/ops/attention.py), on the full arrays every rank builds from the
same seed. Rank 0 prints one line per N:  "N=<n> max_err=<e> cases=<c>"  and the worst
case; the test asserts the bound and that the error does not grow with N.
"""
import numpy as np

from collectives import Communicator
from engine.autograd import Tensor
from parallel.sequence.ring_attention import ring_attention
from parallel.sequence.split import shard
from parallel.sequence.ulysses import ulysses_attention

world = Communicator()
W, R = world.size, world.rank


def reference(q, k, v, do, causal):
    """Dense softmax attention and its gradients (B, H, T, D), float64."""
    D, T = q.shape[-1], q.shape[2]
    s = q @ k.swapaxes(-1, -2) / np.sqrt(D)                  # (B, H, T, T)
    if causal:
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = p @ v
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) / np.sqrt(D)
    return o, ds @ k, ds.swapaxes(-1, -2) @ q, dv


CASES = []
for mode in ("ring", "ulysses"):
    for causal in (True, False):
        for layout in ("zigzag", "contiguous"):
            for H in (1, 3, 4):
                CASES.append((mode, causal, layout, H))

worst_all = 0.0
for N in range(1, W + 1):
    sub = world.split(0 if R < N else None)
    worst, where, count = 0.0, "", 0
    if sub is not None:
        r = sub.rank
        for i, (mode, causal, layout, H) in enumerate(CASES):
            B, D = 2, 4
            T = 2 * N * 3                                     # zigzag needs 2N chunks; 3 tokens each
            rng = np.random.default_rng(1000 * N + i)
            q, k, v, do = (rng.standard_normal((B, H, T, D)) for _ in range(4))
            o_ref, dq_ref, dk_ref, dv_ref = reference(q, k, v, do, causal)
            loc = [Tensor(shard(a, r, N, layout, axis=2), requires_grad=True) for a in (q, k, v)]
            fn = ring_attention if mode == "ring" else ulysses_attention
            # block_size 4 < the local length: the kernel's multi-block path runs too
            o = fn(*loc, sub, causal=causal, layout=layout, block_size=4 if i % 2 else 256)
            o.backward(shard(do, r, N, layout, axis=2))
            for name, got, want in (("o", o.data, o_ref), ("dq", loc[0].grad, dq_ref),
                                    ("dk", loc[1].grad, dk_ref), ("dv", loc[2].grad, dv_ref)):
                want = shard(want, r, N, layout, axis=2)
                err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-300))
                if err > worst:
                    worst, where = err, f"{mode} causal={causal} {layout} H={H} {name}"
            count += 1
        worst = float(sub.all_reduce(np.array([worst]), op="max")[0])
    worst = float(world.all_reduce(np.array([worst]), op="max")[0])
    worst_all = max(worst_all, worst)
    if R == 0:
        print(f"N={N} max_err={worst:.3e} cases={count} worst_case={where or '-'}", flush=True)
if R == 0:
    print(f"DONE max_err={worst_all:.3e}", flush=True)
