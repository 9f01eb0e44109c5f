"""Compressed ZeRO communication (parallel/data/wire.py) through build_step, on this launch's
N ranks: for each case (ZeRO stage, --quant-weights, --quant-grads, --comm-dtype,
--error-feedback, --quant-node-size; at N = 4 also dp 2 x sp 2) trains a tiny GPT for 4 steps and checks after every
step that
  - every rank computes with bitwise the same weights (stage 3: every layer gathered);
  - where weights are compressed, those weights differ from the float32 master shards and lie
    within the codec's bound of them (int8: max|master| / 254; bf16: 2^-8 relative);
  - the bytes every rank sent in the step, per kind (all_gather, reduce_scatter, all_to_all),
    summed over ranks, equal parallel/data/wire.py step_bytes;
  - the losses stay within 5% of the uncompressed run's.
Prints "case ... ok" lines and "N failures"."""
from types import SimpleNamespace

import numpy as np

from collectives import Communicator, Mesh
from engine.backend import to_numpy
from models.gpt import GPTConfig
from parallel import ParallelConfig, build_step, check_layout
from parallel.data import step_bytes

CFG = GPTConfig(block_size=16, vocab_size=41, n_layer=2, n_head=2, n_embd=16)
TRAIN = SimpleNamespace(seed=7, dtype="float32", lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
B, STEPS, KINDS = 8, 4, ("all_gather", "reduce_scatter", "all_to_all")
failures = []


def batches(step):
    g = np.random.default_rng(100 + step)
    x = g.integers(0, CFG.vocab_size, (B, CFG.block_size))
    return [(x, np.roll(x, -1, axis=1))]


def used_weights(step):
    """{dt: the full flat vector of weights this rank computes with} (stage 3: gathered now)."""
    eng = step.engine
    if eng.layers is None:
        return {dt: to_numpy(eng.flat.data[dt]).copy() for dt in eng.flat.dtypes}
    out = {dt: np.zeros(len(eng.flat.grad[dt]), eng.flat.grad[dt].dtype) for dt in eng.flat.dtypes}
    for unit in eng.layers.units + [eng.layers.root]:
        eng.layers.ensure(unit)
        for name, p in zip(eng.flat.names, eng.flat.params):
            dt, off, n, _ = eng.flat.index[name]
            if any(p is q for q in unit.params):
                out[dt][off:off + n] = to_numpy(p.data).reshape(-1)
        eng.layers.free(unit)
    eng.layers.free_root()              # as a step's end: the pool's buffers go, nothing stays resident
    return out


def run(case, world):
    sp = case.get("sp", 1)                                            # sp: ring attention (p2p messages)
    par = ParallelConfig(dp=world.size // sp, bucket_mb=0.004, **case)
    check_layout(par, CFG, B)
    mesh = Mesh(dp=world.size // sp, sp=sp, world=world)
    step = build_step(CFG, par, TRAIN, mesh)
    eng, losses, problems = step.engine, [], []
    for n in range(STEPS):
        k0 = step.bytes_by_kind()
        losses.append(step.forward_backward(batches(n), step=n))
        step.clip_grad_norm(1.0)
        step.update(1e-3 * (n + 1))
        k1 = step.bytes_by_kind()
        sent = np.array([k1[k] - k0[k] for k in KINDS], np.float64)
        sent = world.all_reduce(sent, algo="mpi")                     # all ranks together
        want = step_bytes(eng)
        if [int(v) for v in sent] != [want[k] for k in KINDS]:
            problems.append(f"step {n} bytes {dict(zip(KINDS, sent.astype(int).tolist()))} != formula {want}")
        used = used_weights(step)
        for dt, u in used.items():
            digest = np.frombuffer(u.tobytes(), np.uint8).astype(np.int64)
            ref = digest.copy()
            world.broadcast(ref, 0, algo="mpi")
            if not np.array_equal(digest, ref):
                problems.append(f"step {n}: rank {world.rank}'s {dt} weights differ from rank 0's")
            if eng.wire.weights is not None:
                lo, hi = eng.ranges[dt]
                master, mine = to_numpy(eng.param_shards[dt]), u[lo:hi]
                bound = np.abs(master).max() / 254 if eng.wire.weights.bits else np.abs(master) * 2.0 ** -8
                if np.array_equal(master, mine) or (np.abs(master - mine) > bound).any():
                    problems.append(f"step {n}: the {dt} master shard is not kept apart within the codec's bound")
    return losses, problems


CASES = [dict(zero=3), dict(zero=3, quant_weights="int8"), dict(zero=3, quant_grads="int4"),
         dict(zero=3, quant_weights="int8", quant_grads="int4", error_feedback=True, quant_block=64),
         dict(zero=3, comm_dtype="bf16"), dict(zero=2, quant_weights="int8", quant_grads="int8"),
         dict(zero=1, quant_weights="int8", comm_dtype="bf16"), dict(zero=1),
         dict(zero=2, quant_grads="int4", error_feedback=True)]
if __name__ == "__main__":
    world = Communicator()
    if world.size == 4:
        CASES += [dict(zero=3, quant_weights="int8", quant_grads="int4", quant_node_size=2, error_feedback=True),
                  dict(zero=2, comm_dtype="bf16", quant_node_size=2),
                  dict(zero=3, sp=2, quant_weights="int8", quant_grads="int4", error_feedback=True)]
    base = {}
    for case in CASES:
        losses, problems = run(case, world)
        ref = base.setdefault("fp32", losses)                # the first case: uncompressed
        if max(abs(a - b) / abs(b) for a, b in zip(losses, ref)) > 0.05:
            problems.append(f"losses {losses} vs uncompressed {ref}")
        bad = world.all_reduce(np.array([len(problems)], np.int64), algo="mpi")[0]
        name = " ".join(f"{k}={v}" for k, v in case.items())
        if world.rank == 0:
            print(f"case {name} N={world.size} " + ("ok" if not bad else f"FAIL {problems}"), flush=True)
        if bad:
            failures.append(name)
    if world.rank == 0:
        print(f"{len(failures)} failures", flush=True)
