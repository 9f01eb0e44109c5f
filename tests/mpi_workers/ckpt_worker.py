"""Sharded checkpoints (parallel/checkpoint/sharded.py) saved at one rank count and loaded at others.

    mpiexec -n 4 python tests/mpi_workers/ckpt_worker.py DIR

Independent of ZeroEngine: the "engine" here is a tiny GPT's FlatParameters(world=N) plus
reference flat buffers of params, AdamW m and v (seeded, identical on every rank); a rank's
shard_state is the slice shard_range(numel, r, N, align) of them, exactly what
ZeroEngine.shard_state() returns. Sub-communicators (comm.split) give N = 1, 2, 3 inside
this one launch of 4 ranks. Every case prints "case NAME ok" or "case NAME FAIL ..." on
rank 0; the refusals must raise the same one-line CheckpointError on every rank. It also
leaves DIR/hf/ (a float32 checkpoint with a model config) for the consolidate -> Hugging
Face test, and DIR/atomic/ (a failed save) for the pytest side to inspect.
"""
import os
import shutil
import sys
import traceback
from dataclasses import asdict

import numpy as np

from collectives import Communicator
from engine.backend import to_device, to_numpy
from engine.flat import FlatParameters, shard_range
from engine.io import CheckpointError
from models.gpt import GPT, GPTConfig
from parallel.checkpoint import consolidate, load_sharded, save_sharded

root = sys.argv[1]
world = Communicator()
R = world.rank
CFG = GPTConfig(block_size=8, vocab_size=23, n_layer=2, n_head=2, n_embd=10)   # 2,990 params: padded at N = 3, 4
failures = 0


def model_flat(world_size, align=1, cfg=CFG, dtype="float64"):
    model = GPT(cfg, np.random.default_rng(0)).astype(dtype)
    return model, FlatParameters(model.named_parameters(), world=world_size, align=align)


def reference(flat, seed=5):
    """{dt: {"params", "m", "v"}: (numel,)} and a step count, the same on every rank."""
    rng, ref = np.random.default_rng(seed), {}
    for dt in flat.dtypes:
        n = flat.numel[dt]
        ref[dt] = {"params": to_numpy(flat.data[dt][:n]).copy(), "m": rng.normal(size=n).astype(dt),
                   "v": rng.random(n).astype(dt)}
    return ref, 7


def shard_state(ref, step, flat, r, N):
    """The slices a ZeroEngine at rank r of N owns (padding zero)."""
    out = {"params": {}, "optim": {}}
    for dt in flat.dtypes:
        lo, hi = shard_range(flat.numel[dt], r, N, flat.align)
        pad = {k: np.concatenate([a, np.zeros(len(flat.data[dt]) - len(a), a.dtype)])[lo:hi]
               for k, a in ref[dt].items()}
        out["params"][dt] = pad["params"]
        out["optim"][dt] = {"m": pad["m"], "v": pad["v"], "step": step}
    return out


def same(a, b):
    H = to_numpy                                     # shards may be device arrays: compare host copies
    return all(np.array_equal(H(a["params"][dt]), H(b["params"][dt])) and a["params"][dt].dtype == b["params"][dt].dtype
               and all(np.array_equal(H(a["optim"][dt][k]), H(b["optim"][dt][k])) for k in ("m", "v"))
               and a["optim"][dt]["step"] == b["optim"][dt]["step"] for dt in a["params"])


def case(name, fn, comm=world):
    """Run fn on the ranks of comm (None: this rank is not in it); rank 0 of the world reports."""
    global failures
    ok, msg = True, ""
    if comm is not None:
        try:
            fn(comm)
        except Exception as e:                       # noqa: BLE001 - report, do not hang
            ok, msg = False, f"{type(e).__name__}: {e} | {traceback.format_exc().splitlines()[-3].strip()}"
    oks = world.mpi.allgather((ok, msg))             # test harness only: small tuples
    bad = [(r, m) for r, (o, m) in enumerate(oks) if not o]
    failures += bool(bad)
    if R == 0:
        print(f"case {name} " + ("ok" if not bad else f"FAIL rank {bad[0][0]}: {bad[0][1]}"), flush=True)


def sub(n):
    """A communicator of world ranks 0..n-1 (None elsewhere)."""
    return world.split(0 if R < n else None, label=f"sub{n}")


comms = {n: sub(n) for n in (1, 2, 3)}
comms[4] = world
out = os.path.join(root, "ckpts")
_, flat4 = model_flat(4)
REF, STEP = reference(flat4)


def save_at(n, step, align=1):
    def go(comm):
        _, flat = model_flat(n, align)
        st = shard_state(REF, STEP, flat, comm.rank, n)
        path = save_sharded(out, step, comm, flat, st, {"note": f"saved at {n}"}, per_rank={"rank": comm.rank})
        assert path == os.path.join(out, f"step_{step}"), path
        assert sorted(os.listdir(path)) == sorted(["manifest.json"] + [f"shard-{r}-of-{n}.safetensors"
                                                                     for r in range(n)])
    return go


def load_at(n, step, saved_n, align=1):
    def go(comm):
        _, flat = model_flat(n, align)
        got, manifest, per_rank = load_sharded(os.path.join(out, f"step_{step}"), comm, flat)
        assert same(got, shard_state(REF, STEP, flat, comm.rank, n)), "loaded shard differs"
        assert manifest["step"] == step and manifest["note"] == f"saved at {saved_n}"
        assert per_rank == ({"rank": comm.rank} if n == saved_n else None), per_rank
    return go


case("save N=4", save_at(4, 10))
for n in (4, 2, 1, 3):
    case(f"load N=4 -> N={n}", load_at(n, 10, 4), comms[n])
case("load N=4 align 1 -> N=2 align 8", load_at(2, 10, 4, align=8), comms[2])
case("save N=1", save_at(1, 20), comms[1])
case("load N=1 -> N=3", load_at(3, 20, 1), comms[3])
case("save N=3 align 4", save_at(3, 30, align=4), comms[3])
for n in (4, 1):
    case(f"load N=3 -> N={n}", load_at(n, 30, 3), comms[n])


def check_consolidate(comm):
    model, flat = model_flat(1)
    for step in (10, 20, 30):
        params = consolidate(os.path.join(out, f"step_{step}"))
        assert list(params) == flat.names
        for name, (dt, off, n, shape) in flat.index.items():
            assert params[name].shape == shape and np.array_equal(params[name].reshape(-1), REF[dt]["params"][off:off + n])
    model.load_state_dict(consolidate(out))             # out/: follows latest (step 30)


case("consolidate at 1 rank", check_consolidate, comms[1])


# -- refusals: the same one-line error on every rank -------------------------------------------
def refused(name, damage, words, flat_fn=lambda: model_flat(4)[1]):
    bad = os.path.join(root, f"bad-{name}")
    if R == 0:
        shutil.copytree(os.path.join(out, "step_10"), bad)
        damage(bad)
    world.barrier()

    def go(comm):
        try:
            load_sharded(bad, comm, flat_fn())
        except CheckpointError as e:
            msg = str(e)
            assert "\n" not in msg and all(w in msg for w in words), f"message {msg!r} lacks {words}"
            if os.environ.get("CKPT_VERBOSE") and comm.rank == 0:
                print(f"  {name}: {msg}", flush=True)
            return
        raise AssertionError("loaded a damaged checkpoint")
    case(f"refuse {name}", go)


def flip(d):
    with open(os.path.join(d, "shard-2-of-4.safetensors"), "r+b") as f:
        f.seek(-3, 2)
        b = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([b[0] ^ 0x40]))


refused("tampered", flip, ["shard-2-of-4.safetensors", "sha256"])
refused("truncated", lambda d: os.truncate(os.path.join(d, "shard-1-of-4.safetensors"), 100),
        ["shard-1-of-4.safetensors", "bytes", "truncated"])
refused("missing", lambda d: os.remove(os.path.join(d, "shard-3-of-4.safetensors")), ["lacks shard-3-of-4.safetensors"])
refused("manifest", lambda d: open(os.path.join(d, "manifest.json"), "w").write("{"), ["manifest.json", "corrupt"])
refused("shape", lambda d: None, ["transformer.wte.weight", "another model configuration"],
        lambda: model_flat(4, cfg=GPTConfig(block_size=8, vocab_size=29, n_layer=2, n_head=2, n_embd=10))[1])
refused("depth", lambda d: None, ["lacks transformer.h.2"],
        lambda: model_flat(4, cfg=GPTConfig(block_size=8, vocab_size=23, n_layer=3, n_head=2, n_embd=10))[1])
refused("dtype", lambda d: None, ["float64", "float32", "dtype"], lambda: model_flat(4, dtype="float32")[1])


# -- a save that fails on one rank publishes nothing ------------------------------------------
def failed_save(comm):
    adir = os.path.join(root, "atomic")
    _, flat = model_flat(4)
    st = shard_state(REF, STEP, flat, comm.rank, 4)
    save_sharded(adir, 1, comm, flat, st, {})
    if comm.rank == 2:                                  # a wrong-sized shard on rank 2 only
        st["optim"]["float64"]["m"] = st["optim"]["float64"]["m"][:-1]
    try:
        save_sharded(adir, 2, comm, flat, st, {})
    except CheckpointError as e:
        assert "rank 2" in str(e) and "\n" not in str(e), str(e)
    else:
        raise AssertionError("a failed shard was published")
    assert sorted(os.listdir(adir)) == ["latest", "step_1"], os.listdir(adir)


case("failed save is absent", failed_save)


# -- a float32 checkpoint with a model config, for consolidate -> Hugging Face ------------------
def save_hf_source(comm):
    model, flat = model_flat(4, dtype="float32")
    for _, p in model.named_parameters():               # non-trivial LayerNorms and biases
        p.data[...] += to_device(np.random.default_rng(1).normal(0, 0.05, p.shape).astype(p.dtype))
    rng = np.random.default_rng(2)
    ref = {dt: {"params": to_numpy(flat.data[dt][:flat.numel[dt]]).copy(), "m": rng.normal(size=flat.numel[dt]).astype(dt),
                "v": rng.random(flat.numel[dt]).astype(dt)} for dt in flat.dtypes}
    save_sharded(os.path.join(root, "hf"), 3, comm, flat, shard_state(ref, 3, flat, comm.rank, 4),
                 {"config": {"model": asdict(CFG)}})


case("save float32 with config", save_hf_source)
if R == 0:
    print(f"{failures} failures", flush=True)
sys.exit(1 if failures else 0)
