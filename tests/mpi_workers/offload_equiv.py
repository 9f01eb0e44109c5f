"""ZeRO-Offload worker (parallel/data/offload.py), under ENGINE_DEVICE=gpu-emulated: the
parameters live on the device double (engine/device_double.py), the optimizer on the host.

    ENGINE_DEVICE=gpu-emulated mpiexec -n N python tests/mpi_workers/offload_equiv.py

Cases, one line each from rank 0 ("case ... ok"), then "N failures":
  exact     ZeRO stage 1 and 2 (accum 1 and 2), float64, 5 steps: offload "optimizer" against
            "none", losses and every parameter within 1e-10 relative; the transfers the offload
            adds are exactly its gradient shard down per reducing pass and its parameter shard
            up per step (device_double's d2h_bytes / h2d_bytes, the run without as baseline);
            N = 1: gradient parts reach the host during backward, before its last bucket
  resume    stage 2 offload: 3 steps, shard_state copied to the host, a fresh engine loads it
            and runs 2 more: equal (1e-10) to the 5 uninterrupted steps
  bytes     device bytes per rank after two steps (activations freed), stages 0-3 and offload
            over 1-2, float32, against bench/zero_memory.py DEVICE_FORMULA within 5%; the host
            optimizer's bytes equal its formula exactly
"""
import gc
import sys

import numpy as np

from engine import backend, device_double
from collectives import Communicator
from engine.data import Batcher
from models.gpt import GPT, GPTConfig
from parallel.data import ZeroEngine
from bench.zero_memory import DEVICE_FORMULA, HOST_FORMULA
from compare import rel

if not backend.emulated():
    sys.exit("offload_equiv.py runs under ENGINE_DEVICE=gpu-emulated")
backend.set_device("gpu")
CFG = GPTConfig(block_size=16, vocab_size=41, n_layer=2, n_head=2, n_embd=14)
B, STEPS, SEED, CLIP, TOL = 12, 5, 7, 0.5, 1e-10
OPT = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=4000).astype(np.uint16)
comm = Communicator()
R, N = comm.rank, comm.size
mem = device_double.memory


def engine(dtype, stage, offload, cfg=CFG):
    m = GPT(cfg, np.random.default_rng(SEED))
    m = m.astype(dtype) if dtype != "float32" else m
    return ZeroEngine(m, comm, stage=stage, bucket_bytes=2000, offload=offload, **OPT)


def train(eng, steps, accum, batcher, first=0, probe=None):
    """steps optimizer steps; returns the mean losses and the bytes moved (d2h during backward,
    h2d during the update)."""
    losses, b, down, up = [], B // N, 0, 0
    for step in range(first, first + steps):
        eng.zero_grad()
        total = 0.0
        for k in range(accum):
            x, y = (backend.to_device(a[R * b:(R + 1) * b]) for a in batcher.next())   # (B/N, T) this rank's
            loss = eng(x, y)[1]
            total += loss.item()
            d0 = mem.d2h_bytes
            if probe is not None and k == accum - 1:      # backward, then the wait, as eng.backward
                eng.buckets.enable(True)
                (loss * (1.0 / accum)).backward()
                probe.append(eng.offload.received)
                eng.finish_grads()
            else:
                eng.backward(loss * (1.0 / accum), sync=k == accum - 1)
            down += mem.d2h_bytes - d0
        eng.clip_grad_norm(CLIP)
        u0 = mem.h2d_bytes
        eng.step(OPT["lr"] * (step + 1) / STEPS)
        up += mem.h2d_bytes - u0
        losses.append(comm.all_reduce(np.array([total / accum]), op="avg")[0])
    return losses, down, up



def params_rel(eng, ref):
    got = eng.named_full_params()
    return max(rel(got[n], ref[n]) for n in ref)


failures = 0


def report(name, ok, detail):
    global failures
    bad = comm.all_reduce(np.array([0 if ok else 1]))[0]
    failures += int(bad > 0)
    if R == 0:
        print(f"case N={N} {name}: {detail} {'ok' if bad == 0 else 'FAIL'}", flush=True)


# -- exact: offload equals the run without -------------------------------------------------------
for stage, accum in [(1, 1), (2, 1), (1, 2), (2, 2)]:
    base = engine("float64", stage, "none")
    ref_losses, down0, up0 = train(base, STEPS, accum, Batcher(TOKENS, B, CFG.block_size, SEED))
    ref = base.named_full_params()
    eng = engine("float64", stage, "optimizer")
    probe = [] if N == 1 else None
    losses, down, up = train(eng, STEPS, accum, Batcher(TOKENS, B, CFG.block_size, SEED), probe=probe)
    S = eng.param_shards["float64"].size
    passes = STEPS * (accum if stage == 2 else 1)            # stage 1 reduces once per step, stage 2 every pass
    err_loss, err_param = rel(losses, ref_losses), params_rel(eng, ref)
    moved = (down - down0, up - up0) == (8 * S * passes, 8 * S * STEPS)
    early = probe is None or min(probe) > 0
    report(f"exact stage={stage} accum={accum}", err_loss <= TOL and err_param <= TOL and moved and early,
           f"loss rel err {err_loss:.2e}, param rel err {err_param:.2e}, offload moved d2h {down - down0} "
           f"h2d {up - up0} bytes (shard {8 * S} x {passes}, x {STEPS})"
           + (f", parts on the host before backward ended {min(probe)}" if probe else ""))
    del base, eng

# -- resume: the host optimizer state round-trips through shard_state --------------------------------
straight = engine("float64", 2, "optimizer")
train(straight, STEPS, 1, Batcher(TOKENS, B, CFG.block_size, SEED))
ref = straight.named_full_params()
first = engine("float64", 2, "optimizer")
batcher = Batcher(TOKENS, B, CFG.block_size, SEED)
train(first, 3, 1, batcher)
st = first.shard_state()
saved = {"params": {dt: backend.to_numpy(a).copy() for dt, a in st["params"].items()},
         "optim": {dt: {"m": backend.to_numpy(o["m"]).copy(), "v": backend.to_numpy(o["v"]).copy(),
                        "step": o["step"]} for dt, o in st["optim"].items()}}
second = engine("float64", 2, "optimizer")
second.load_shard_state(saved)
train(second, 2, 1, batcher, first=3)
err = params_rel(second, ref)
report("resume stage=2 offload after 3 of 5 steps", err <= TOL, f"param rel err {err:.2e}")
del straight, first, second

# -- bytes: device bytes per rank against the formulas ----------------------------------------------
for stage, offload in [(0, "none"), (1, "none"), (2, "none"), (3, "none"), (1, "optimizer"), (2, "optimizer")]:
    gc.collect()
    before = mem.used
    eng = engine("float32", stage, offload, GPTConfig(block_size=16, vocab_size=41, n_layer=2, n_head=2, n_embd=32))
    train(eng, 2, 1, Batcher(TOKENS, B, CFG.block_size, SEED))
    gc.collect()
    used = mem.used - before
    P = len(eng.flat.data["float32"])                        # padded elements
    formula = DEVICE_FORMULA[(stage, offload)](P, N, 4)
    host = eng.offload.host_bytes() if eng.offload else 0
    host_ok = host == (HOST_FORMULA[stage](P, N, 4) if eng.offload else 0)
    used_max = comm.all_reduce(np.array([used], np.float64), op="max")[0]
    report(f"bytes stage={stage} offload={offload}", abs(used_max / formula - 1) <= 0.05 and host_ok,
           f"device {int(used_max)} bytes, formula {int(formula)}, ratio {used_max / formula:.4f}; host {host}")
    del eng

if R == 0:
    print(f"{failures} failures", flush=True)
sys.exit(1 if failures else 0)
