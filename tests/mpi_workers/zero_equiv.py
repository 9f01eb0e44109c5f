"""ZeRO / DDP equivalence worker: every stage on this launch's N ranks against one process.

    mpiexec -n N python tests/mpi_workers/zero_equiv.py [DTYPE ...]

For each dtype (default float64 float32) and stage 0..3 (and gradient accumulation 2 on
stage 0 and 2; activation recomputation "full" and "selective" on several stages, engine/
recompute.py), trains a tiny GPT with dropout for 5 steps with ZeroEngine, each rank on its slice of
the global batch drawn by one shared seeded Batcher, and compares the mean losses and the
final parameters with the single-process reference computed independently on every rank
(FlatParameters + AdamW + clip_grad_norm_, as train.py on one process). Prints one line
per case from rank 0 ("case ... max rel err ...") and "N failures" at the end; exit 1 if any.
Dropout draws from the model's counter-based generator located at each rank's global rows,
so every layout, and every recomputation, masks as the one process does.

ZeRO-3's slot pool (parallel/data/pool.py): run with ENGINE_POOL_POISON=1 every released slot
is NaN, so the stage 3 cases pass only if no saved reference reads a slot between its release
and its second gather. The "pool" lines show that the poison catches such a read (a backward
that skips the second gather: finite but wrong without poison, NaN with it) and that a pool
of one slot refuses a prefetch into the slot of the layer computing, and that without poison the
last two layers' slots are reused in backward (4 gathers of 3 layers instead of 6) with a
gradient bitwise equal to the poisoned run's.

Tolerances: float64, each parameter tensor and each loss within 1e-10 relative (max |a - b|
over max |b|); float32, the losses likewise within 1e-5 and the parameter vector within 1e-5
relative in the L2 norm. (Elementwise is too strict in float32 for one honest reason: the
attention key bias has an exactly-zero true gradient, softmax being shift invariant, so its
computed gradient is rounding noise that AdamW normalises into +-lr steps, and a different
summation order gives other noise. In float64 that noise is still 1e-13.)
"""
import sys

import numpy as np

from collectives import Communicator
from engine.backend import to_numpy
from engine.data import Batcher
from engine.flat import FlatParameters
from engine.optim import AdamW, clip_grad_norm_
from models.gpt import GPT, GPTConfig
from parallel.data import ZeroEngine
from parallel.data.fsdp import ShardedLayers
from compare import rel

TOL = {"float64": 1e-10, "float32": 1e-5}
CFG = GPTConfig(block_size=16, vocab_size=41, n_layer=2, n_head=2, n_embd=14, dropout=0.1)   # 5894 parameters: N=3, 4 pad
B, STEPS, SEED, CLIP = 12, 5, 7, 0.5
OPT = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=4000).astype(np.uint16)
comm = Communicator()
R, N = comm.rank, comm.size


def model(dtype):
    m = GPT(CFG, np.random.default_rng(SEED))
    return m.astype(dtype) if dtype != "float32" else m


def lr_at(step):
    return OPT["lr"] * (step + 1) / STEPS


def reference(dtype, accum):
    m = model(dtype)
    flat = FlatParameters(m.named_parameters())
    opt = AdamW(flat.data[dtype], flat.grad[dtype], flat.decay_mask[dtype], **OPT)
    batcher, losses = Batcher(TOKENS, B, CFG.block_size, SEED), []
    for step in range(STEPS):
        flat.zero_grad()
        total = 0.0
        for k in range(accum):
            x, y = batcher.next()
            m.noise.set_step(step, k)
            loss = m(x, y)[1]
            total += loss.item()
            (loss * (1.0 / accum)).backward()
        clip_grad_norm_(flat.grad[dtype], CLIP)
        opt.step(lr_at(step))
        losses.append(total / accum)
    return losses, {n: p.data.copy() for n, p in m.named_parameters()}


def distributed(dtype, stage, accum, recompute="none", poison=None):
    """poison: stage 3's pool debug mode (None: ENGINE_POOL_POISON; False: resident slots reused)."""
    m = model(dtype)
    eng = ZeroEngine(m, comm, stage=stage, bucket_bytes=2000, recompute=recompute, **OPT)   # several buckets
    if poison is not None:
        eng.layers.pool.poison = poison
    batcher, losses, b = Batcher(TOKENS, B, CFG.block_size, SEED), [], B // N
    for step in range(STEPS):
        eng.zero_grad()
        total = 0.0
        for k in range(accum):
            x, y = batcher.next()                                         # (B, T): the global batch
            m.noise.set_step(step, k)
            with m.noise.located(np.arange(R * b, (R + 1) * b)):          # this rank's global rows
                loss = eng(x[R * b:(R + 1) * b], y[R * b:(R + 1) * b])[1]   # (B/N, T): this rank's slice
            total += loss.item()
            eng.backward(loss * (1.0 / accum), sync=k == accum - 1)
        check_after_backward(eng)
        eng.clip_grad_norm(CLIP)
        eng.step(lr_at(step))
        check_after_step(eng)
        losses.append(comm.all_reduce(np.array([total / accum]), op="avg")[0])
    return losses, eng.named_full_params()


problems = []


def expect(ok, what):
    if not ok:
        problems.append(what)
        print(f"[rank {R}] engine check failed: {what}", flush=True)


def check_after_backward(eng):
    """Every bucket was started by a grad hook during backward (overlap), none by finish();
    stages 2-3 hold no parameter gradient once backward is done."""
    expect(len(eng.buckets.buckets) > 1, "several buckets")
    expect(eng.buckets.hook_launches % len(eng.buckets.buckets) == 0 and eng.buckets.hook_launches > 0,
           f"stage {eng.stage}: buckets started by hooks {eng.buckets.hook_launches}")
    if eng.stage >= 2:
        expect(all(p.grad is None for p in eng.flat.params), f"stage {eng.stage}: a full gradient is kept")


def check_after_step(eng):
    """The bytes held are the ZeRO formula's exactly (P = padded elements, S = P/N); stage 3
    holds no parameter outside its shard between steps."""
    (dt, padded), = ((dt, len(eng.flat.data[dt])) for dt in eng.flat.dtypes)
    k, S = np.dtype(dt).itemsize, padded // N
    formula = {0: 4 * k * padded, 1: 2 * k * padded + 2 * k * S, 2: k * padded + 3 * k * S, 3: 4 * k * S}
    expect(eng.model_state_bytes() == formula[eng.stage],
           f"stage {eng.stage}: {eng.model_state_bytes()} bytes held, formula {formula[eng.stage]}")
    if eng.stage == 3:
        expect(all(p.data.strides == (0,) * p.ndim for p in eng.flat.params), "stage 3: a parameter stays gathered")


def norm_rel(params, ref):
    """||params - ref|| / ||ref|| over every parameter, in float64."""
    params, ref = ({n: to_numpy(d[n]).astype(np.float64) for n in ref} for d in (params, ref))
    diff = sum(float(((params[n] - ref[n]) ** 2).sum()) for n in ref)
    return (diff / sum(float((ref[n] ** 2).sum()) for n in ref)) ** 0.5


SPARSE = dict(ffn_sparsity=4, ffn_lowrank=4, ffn_temperature=0.5, ffn_hard_prob=0.5, qkv_modules=2)


def stage3_grads(poison, skip_second_gather=False, slots=2, stage=3, **extra):
    """One stage 3 forward and backward (float64, N ranks, 3 layers so that the pool wraps):
    this rank's gradient shard. skip_second_gather: the deliberately wrong schedule, whose
    backward reads each layer's slot as later layers left it. extra: GPTConfig fields."""
    cfg = GPTConfig(**dict(vars(CFG), n_layer=3, dropout=0.0, **extra))
    eng = ZeroEngine(GPT(cfg, np.random.default_rng(SEED)).astype("float64"), comm, stage=stage, **OPT)
    if stage < 3:
        eng.zero_grad()
        eng.backward(eng(*(a[R * (B // N):(R + 1) * (B // N)] for a in Batcher(TOKENS, B, cfg.block_size,
                                                                              SEED).next()))[1])
        return to_numpy(eng.grad_shards["float64"]).copy()
    if slots != 2:                                                        # the same layers, another pool
        eng.layers = ShardedLayers(eng, list(eng.model.blocks), slots=slots, poison=poison)
    eng.layers.pool.poison = poison
    if skip_second_gather:
        eng.layers.before_backward = lambda unit: None
    x, y = Batcher(TOKENS, B, cfg.block_size, SEED).next()
    b = B // N
    eng.zero_grad()
    eng.backward(eng(x[R * b:(R + 1) * b], y[R * b:(R + 1) * b])[1])
    stats.update(eng.layers.gather_stats())
    return to_numpy(eng.grad_shards["float64"]).copy()


stats = {}                                                # the last stage3_grads' pool gather counts


def pool_checks():
    """The poison catches a stale read; one slot is refused. Returns the failures (0 or 1)."""
    right = stage3_grads(poison=True)
    poisoned_counts = dict(stats)
    reused = stage3_grads(poison=False)                  # the last two layers stay resident: not gathered again
    reused_counts = dict(stats)
    ok_reuse = (np.array_equal(reused, right) and poisoned_counts == {"gathered": 6, "reused": 0}
                and reused_counts == {"gathered": 4, "reused": 2})
    wrong_plain = stage3_grads(poison=False, skip_second_gather=True)
    wrong_poisoned = stage3_grads(poison=True, skip_second_gather=True)
    sq = comm.all_reduce(np.array([((wrong_plain - right) ** 2).sum(), (right ** 2).sum(),
                                   float(np.isnan(wrong_poisoned).any()), float(np.isfinite(right).all())]))
    err = float(np.sqrt(sq[0] / sq[1]))                  # over the whole gradient (every rank's shard)
    ok = sq[3] == N
    ok_plain = bool(np.isfinite(wrong_plain).all()) and err > 1e-3                       # silently wrong
    ok_poison = sq[2] > 0                                                                # caught
    try:
        stage3_grads(poison=True, slots=1)
        refused = ""
    except RuntimeError as e:
        refused = str(e)
    ok_one = "still gathering for layer 0" in refused or "still live for layer 0" in refused
    sparse = comm.all_reduce(np.array([rel(stage3_grads(poison=True, **SPARSE), stage3_grads(False, stage=2, **SPARSE))]),
                             op="max")[0]                         # sparse FFN and QKV layers through the pool
    ok_sparse = sparse <= 1e-10
    bad = comm.all_reduce(np.array([0 if ok and ok_plain and ok_poison and ok_one and ok_sparse and ok_reuse
                                    else 1]))[0]
    if R == 0:
        print(f"pool N={N}: right schedule poisoned finite {ok}; skipped second gather: without poison finite, "
              f"gradient rel err {err:.2e} {ok_plain}; with poison NaN {ok_poison}; one slot refused "
              f"{ok_one} ({refused}); resident slots reused {reused_counts} (poisoned {poisoned_counts}), "
              f"gradient bitwise equal {ok_reuse}; sparse layers poisoned vs stage 2 rel err {sparse:.2e} "
              f"{'ok' if bad == 0 else 'FAIL'}", flush=True)
    return int(bad > 0)


CASES = [(0, 1, "none"), (1, 1, "none"), (2, 1, "none"), (3, 1, "none"), (0, 2, "none"), (2, 2, "none"),
         (3, 2, "none"), (0, 1, "full"), (1, 1, "selective"), (2, 2, "full"), (3, 1, "full"), (3, 2, "selective"),
         (3, 2, "none", "resident"), (3, 1, "full", "resident")]   # stage 3 unpoisoned: resident slots reused
failures = pool_checks()
for dtype in sys.argv[1:] or ["float64", "float32"]:
    refs = {}
    for stage, accum, recompute, *pool in CASES:
        if accum not in refs:
            refs[accum] = reference(dtype, accum)
        ref_losses, ref_params = refs[accum]
        losses, params = distributed(dtype, stage, accum, recompute, poison=False if pool else None)
        err_loss = rel(losses, ref_losses)
        if dtype == "float64":           # every tensor, elementwise
            err_param = max(rel(params[n], ref_params[n]) for n in ref_params)
        else:                            # the whole parameter vector, norm-wise (see the docstring)
            err_param = norm_rel(params, ref_params)
        ok = err_loss <= TOL[dtype] and err_param <= TOL[dtype] and set(params) == set(ref_params)
        bad = comm.all_reduce(np.array([0 if ok else 1]))[0]
        failures += int(bad > 0)
        if R == 0:
            print(f"case N={N} {dtype} stage={stage} accum={accum} recompute={recompute}"
                  f"{' pool=' + pool[0] if pool else ''}: loss rel err {err_loss:.2e}, "
                  f"param rel err {err_param:.2e} {'ok' if bad == 0 else 'FAIL'}", flush=True)
probe = ZeroEngine(model("float64"), comm).flat
pad = len(probe.data["float64"]) - probe.numel["float64"]
bad_checks = comm.all_reduce(np.array([len(problems)]))[0]
failures += int(bad_checks > 0)
if R == 0:
    if bad_checks == 0:
        print(f"engine checks ok (N={N}: {probe.numel['float64']} parameters + {pad} padding)", flush=True)
    print(f"{failures} failures", flush=True)
sys.exit(1 if failures else 0)
