"""Tensor-parallel layers against their dense counterparts, float64, in ONE launch:

    mpiexec -n 4 python tests/mpi_workers/tp_worker.py

For tp = 1 .. world size the first tp ranks form a tp communicator (the others wait) and
check, against the dense layers every rank builds from the same seed:
    mlp     ColumnParallelLinear -> GELU -> RowParallelLinear: output, d input, d weights, d biases
    vocab   VocabParallelEmbedding (V = 37, padded to a multiple of tp x granule, granule 1 and 8):
            embedding + output layer + cross-entropy (mean, some targets -1): loss, d input, d wte
    gpt     a whole GPT (12 heads, dropout 0.1) sharded by shard_gpt: loss and every parameter's
            gradient (sharded ones against their slice of the dense gradient); gpt-tokens the
            same with sequence-parallel regions (residual stream, LayerNorm, dropout on T/tp tokens)
Rank 0 prints "tp=<t> <case> err=<worst relative error>"; the test asserts each below 1e-12.
"""
import numpy as np

from collectives import Communicator
from engine import ops
from engine.autograd import Tensor
from engine.backend import to_device, to_numpy
from engine.nn import Embedding, Linear
from models.gpt import GPT, GPTConfig
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, shard_gpt
from tp_slices import slice_of
from compare import rel

world = Communicator()
W, R = world.size, world.rank



def mlp_case(comm):
    g = np.random.default_rng(0)
    C, H = 24, 96
    l1, l2 = Linear(C, H, rng=g), Linear(H, C, rng=g)
    for lin in (l1, l2):
        lin.astype("float64")
        lin.bias.data[:] = to_device(g.standard_normal(lin.bias.shape))
    x0, r = (to_device(g.standard_normal((2, 5, C))) for _ in range(2))    # on the device the layers use
    x = Tensor(x0.copy(), requires_grad=True)
    y = l2(ops.gelu(l1(x)))
    (y * Tensor(r)).sum().backward()
    t, k = comm.size, comm.rank
    units = np.arange(k * H // t, (k + 1) * H // t)
    c1, c2 = ColumnParallelLinear.from_linear(l1, units, comm), RowParallelLinear.from_linear(l2, units, comm)
    c2.bias = type(c2.bias)(l2.bias.data.copy(), decay=False)    # its own leaf (l2's got the dense grad)
    xt = Tensor(x0.copy(), requires_grad=True)
    yt = c2(ops.gelu(c1(xt)))
    (yt * Tensor(r)).sum().backward()
    return max(rel(yt.data, y.data), rel(xt.grad, x.grad), rel(c1.weight.grad, l1.weight.grad[units]),
               rel(c1.bias.grad, l1.bias.grad[units]), rel(c2.weight.grad, l2.weight.grad[:, units]),
               rel(c2.bias.grad, l2.bias.grad))


def vocab_case(comm, granule):
    g = np.random.default_rng(1)
    V, C = 37, 8
    emb = Embedding(V, C, rng=g)
    emb.astype("float64")
    idx = g.integers(0, V, (3, 6))
    tgt = g.integers(0, V, (3, 6))
    tgt[0, :2] = -1
    h0 = to_device(g.standard_normal((3, 6, C)))

    def run(e):
        h = Tensor(h0.copy(), requires_grad=True)
        x = e(idx) + h
        loss = e.cross_entropy(e.logits(x), tgt)
        loss.backward()
        return loss.item(), h.grad, e.weight.grad
    dense = run(emb)
    vp = VocabParallelEmbedding.from_embedding(emb, comm, granule)
    got = run(vp)
    n = vp.weight.shape[0]
    rows = to_numpy(dense[2][vp.lo:vp.lo + n])
    pad = np.zeros((n - rows.shape[0], C))
    return max(rel(got[0], dense[0]), rel(got[1], dense[1]), rel(got[2], np.concatenate([rows, pad])))


def gpt_case(comm, tokens=False, sparse=False, step=3):
    extra = dict(ffn_sparsity=8, ffn_lowrank=4, ffn_temperature=0.5, ffn_hard_prob=0.5) if sparse else {}
    cfg = GPTConfig(block_size=12, vocab_size=37, n_layer=2, n_head=12, n_embd=24, dropout=0.1, **extra)
    g = np.random.default_rng(2)
    idx, tgt = g.integers(0, 37, (3, 12)), g.integers(0, 37, (3, 12))

    def model():
        m = GPT(cfg, np.random.default_rng(5))
        m.astype("float64")
        m.noise.set_step(step)
        return m
    dense = model()
    loss = dense(idx, tgt)[1]
    loss.backward()
    ref = {n: p.grad for n, p in dense.named_parameters()}
    tp = model()
    shard_gpt(tp, comm, tokens=tokens)
    n = cfg.block_size // comm.size                      # sequence-parallel regions: this rank's tokens
    with tp.noise.located(pos=np.arange(comm.rank * n, (comm.rank + 1) * n) if tokens else None):
        got = tp(idx, tgt)[1]
    got.backward()
    err = rel(got.item(), loss.item())
    for name, p in tp.named_parameters():
        want = slice_of(tp, name, ref[name])
        err = max(err, rel(p.grad, want))
    return err


for t in range(1, W + 1):
    sub = world.split(0 if R < t else None)
    if sub is not None:
        results = [("mlp", mlp_case(sub)), ("vocab-g1", vocab_case(sub, 1)), ("vocab-g8", vocab_case(sub, 8)),
                   ("gpt", gpt_case(sub)), ("gpt-tokens", gpt_case(sub, tokens=True)),
                   *(("gpt-sparse", gpt_case(sub, sparse=True, step=s)) for s in (1, 2, 3, 4))]
        worst = sub.all_reduce(np.array([e for _, e in results]), op="max")
        if R == 0:
            for (name, _), e in zip(results, worst):
                print(f"tp={t} {name} err={e:.3e}", flush=True)
    world.barrier()
