"""Tensor parallelism composed by parallel/step.py build_step with dp, ZeRO 0-3, pp (every
schedule), sp (ring, Ulysses) and grad-accum, dropout 0.1, a vocabulary (37) that tp does not
divide, float64, 5 steps, in ONE 8-rank launch:

    mpiexec -n 8 python tests/mpi_workers/tp_step_worker.py

Each case runs on a sub-communicator of the world (rounds of disjoint rank sets); every rank
also trains the one-process reference on a communicator of its own, so it can compare its
losses, gradient norms and validation losses, and its slice of every parameter after the last
update (ZeRO-3: gathered over dp), with one process's. Rank 0 of the world prints, for each case,
"CASE <tag> err=<worst relative error over losses and norms> perr=<worst over parameters>".
"""
import types

import numpy as np

from collectives import Communicator, Mesh
from engine.data import Batcher
from engine.optim import cosine_lr
from models.gpt import GPTConfig
from parallel import ParallelConfig, build_step, check_layout
from tp_slices import slice_of

world = Communicator()
W, R = world.size, world.rank
CFG = GPTConfig(block_size=16, vocab_size=37, n_layer=4, n_head=4, n_embd=16, dropout=0.1)
SPARSE = GPTConfig(block_size=16, vocab_size=37, n_layer=4, n_head=4, n_embd=16, dropout=0.1, ffn_sparsity=8,
                   ffn_lowrank=4, ffn_temperature=0.5, ffn_hard_prob=0.5)
TRAIN = types.SimpleNamespace(seed=7, dtype="float64", lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
TOKENS = np.random.default_rng(0).integers(0, 37, 4000).astype(np.int64)
B, STEPS = 8, 5


def run(comm, tp=1, accum=1, cfg=CFG, **layout):
    par = ParallelConfig(tp=tp, **layout)
    check_layout(par, cfg, B)
    mesh = Mesh(dp=par.dp, pp=par.pp, sp=par.sp, tp=tp, world=comm)
    step = build_step(cfg, par, TRAIN, mesh)
    data = Batcher(TOKENS, B, CFG.block_size, seed=1)
    val = Batcher(TOKENS, B, CFG.block_size, seed=2)
    rows = []
    for n in range(1, STEPS + 1):
        loss = step.forward_backward([data.next() for _ in range(accum)], step=n)
        norm = step.clip_grad_norm(1.0)
        step.update(cosine_lr(n - 1, TRAIN.lr, 2, STEPS, 1e-3))
        rows += [loss, norm]
    rows.append(step.eval_loss([val.next()]))
    return rows, step


REFS = {}


def reference(accum, cfg=CFG):
    key = (accum, cfg.ffn_sparsity)
    if key not in REFS:
        rows, step = run(Communicator(world.mpi.Split(R, 0)), accum=accum, cfg=cfg)
        REFS[key] = rows, step.engine.named_full_params()
    return REFS[key]


def check(comm, tp, accum=1, cfg=CFG, **layout):
    ref, ref_params = reference(accum, cfg)
    got, step = run(comm, tp, accum, cfg, **layout)
    err = max(abs(a - b) / abs(b) for a, b in zip(got, ref))
    perr = 0.0
    for name, p in step.engine.named_full_params().items():
        want = slice_of(step.module, name, ref_params[name])
        if name.endswith(".attn.c_attn.bias"):          # [q | k | v]: k's gradient is 0 exactly (softmax
            n = p.shape[0] // 3                          # ignores a per-row shift), noise that AdamW scales
            p, want = np.concatenate([p[:n], p[2 * n:]]), np.concatenate([want[:n], want[2 * n:]])
        perr = max(perr, float(np.max(np.abs(p - want)) / max(float(np.max(np.abs(want))), 1e-300)))
    return err, perr                                   # this rank's; the world's max is taken per round


ROUNDS = [
    {"tp2": ([0, 1], 2, {}), "tp2-ga2": ([2, 3], 2, {"accum": 2}), "tp4": ([4, 5, 6, 7], 4, {})},
    {"tp2dp2-z1": ([0, 1, 2, 3], 2, {"dp": 2, "zero": 1}), "tp2dp2-z3": ([4, 5, 6, 7], 2, {"dp": 2, "zero": 3})},
    {"tp2dp2-z0": ([0, 1, 2, 3], 2, {"dp": 2}), "tp2dp2-z2": ([4, 5, 6, 7], 2, {"dp": 2, "zero": 2})},
    {"tp2pp2-1f1b": ([0, 1, 2, 3], 2, {"pp": 2}),
     "tp2pp2-zb-h1": ([4, 5, 6, 7], 2, {"pp": 2, "schedule": "zb-h1", "micro_batches": 4})},
    {"tp2pp2-interleaved": ([0, 1, 2, 3], 2, {"pp": 2, "schedule": "interleaved", "virtual_stages": 2}),
     "tp2pp2-gpipe": ([4, 5, 6, 7], 2, {"pp": 2, "schedule": "gpipe", "micro_batches": 4})},
    {"tp2sp2-ring": ([0, 1, 2, 3], 2, {"sp": 2}), "tp2sp2-ulysses": ([4, 5, 6, 7], 2, {"sp": 2, "sp_attention": "ulysses"})},
    {"tp2pp2dp2-z1": (list(range(8)), 2, {"pp": 2, "dp": 2, "zero": 1})},
    {"tp2-tokens": ([0, 1], 2, {"tp_token_shards": True}),
     "tp4-tokens-ga2": ([2, 3, 4, 5], 4, {"tp_token_shards": True, "accum": 2}),
     "tp2dp1-tokens-z3": ([6, 7], 2, {"tp_token_shards": True, "zero": 3, "vocab_granule": 8})},
    {"tp2dp2-tokens-z2": ([0, 1, 2, 3], 2, {"dp": 2, "zero": 2, "tp_token_shards": True}),
     "tp2dp2-tokens-z1": ([4, 5, 6, 7], 2, {"dp": 2, "zero": 1, "tp_token_shards": True})},
    {"tp2-sparse": ([0, 1], 2, {"cfg": SPARSE}), "tp2dp2-sparse-z2": ([2, 3, 4, 5], 2, {"cfg": SPARSE, "dp": 2,
                                                                                         "zero": 2})},
    {"tp2pp2-sparse-zb-h1": ([0, 1, 2, 3], 2, {"cfg": SPARSE, "pp": 2, "schedule": "zb-h1", "micro_batches": 4})},
]
for cases in ROUNDS:
    reference(1), reference(2), reference(1, SPARSE)
    mine = [(color, tag, c) for color, (tag, c) in enumerate(cases.items()) if R in c[0]]
    found = np.zeros((len(cases), 3))                  # row c: case c's errors and 1, from each of its ranks
    if mine:
        color, tag, (ranks, tp, layout) = mine[0]
        sub = world.split(color, key=ranks.index(R))
        layout = dict(layout)
        found[color] = *check(sub, tp, layout.pop("accum", 1), **layout), 1.0
    else:
        world.split(None)
    found = world.all_reduce(found, op="max")          # each case's worst rank; world rank 0 prints every
    if R == 0:                                          # line (the groups' own prints interleaved mid-line)
        for tag, (err, perr, reported) in zip(cases, found):
            if reported:
                print(f"CASE {tag} err={err:.3e} perr={perr:.3e}", flush=True)
if R == 0:
    print("DONE", flush=True)
