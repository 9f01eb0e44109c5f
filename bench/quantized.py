"""Compressed ZeRO-3 communication (ZeRO++ qwZ / qgZ, bf16): bytes, step time and quality,
each option against float32 in the same launch.

    mpiexec -n 2 python -m bench.quantized [--json FILE] [--steps 10]
    mpiexec -n 2 python -m bench.quantized --quality [--quality-steps 1000] [--json FILE]

Wang et al. 2023 (ZeRO++, arXiv 2306.10209) claim qwZ + qgZ(int4) cut ZeRO-3's cross-node
bytes per step from 3M to 0.75M (M the model's float16 bytes); here float32, so the goal is
<= 0.3x. Model: nanoGPT's baby char-level config (bench/train_step.py: 4 layers, 4 heads,
128 wide, block 64, global batch 12), ZeRO-3 over the N ranks, through build_step.

Bytes mode, per option (ParallelConfig flags of parallel/config.py):
  bytes_per_step   bytes sent per rank per step (mean over ranks) in the ZeRO collectives
                   (all_gather, reduce_scatter, all_to_all), counted by the Communicators
                   (Communicator.bytes_by_kind); "other" is the rest (the loss and norm all-reduces)
  formula_bytes    the same from parallel/data/wire.py step_bytes (the ZeRO++ / ring formulas)
  ms_per_step      median wall time of a step (the slowest rank), over --steps steps taken in
                   alternating rounds of the options, so load drift hits all alike
  compute_ms       median of (step time - time blocked in collectives), the slowest rank
  comm_ms_*        calls (N-1) alpha + bytes_per_step / bandwidth: the alpha-beta time of the
                   step's communication on a 25 GB/s link (fast) and a 100 Gb/s = 12.5 GB/s
                   link (slow), alpha = 5 us per message
  model_ms_*       compute_ms + comm_ms_*: the predicted step time, no overlap of compute and
                   communication (an upper bound)
On one machine every "link" is shared memory, so measured time mostly shows the cost of
encoding and decoding; the model shows what the bytes would cost on a real link.

Quality mode: --quality-steps steps (nanoGPT's schedule: warm-up 100, cosine to 1e-4, AdamW
(0.9, 0.99), weight decay 0.1, clip 1) on tinyshakespeare char-level per option, the same
batches; val_loss is the mean over 50 fixed validation batches (--val-batches). Goal: within 1% of fp32 for
qwZ and for qwZ + qgZ(int4) with error feedback.
"""
import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np

from bench.train_step import DEFAULT_DATA, MODEL, TRAIN, draw, load_data
from collectives import Communicator, Mesh
from engine.data import Batcher
from engine.io import atomic_write_json
from engine.optim import cosine_lr
from models.gpt import GPTConfig
from parallel import ParallelConfig, build_step, check_layout
from parallel.data import step_bytes

OPTIONS = {
    "fp32": {},
    "qwZ int8": dict(quant_weights="int8"),
    "qgZ int8": dict(quant_grads="int8"),
    "qgZ int4": dict(quant_grads="int4"),
    "qwZ+qgZ int4": dict(quant_weights="int8", quant_grads="int4"),
    "qwZ+qgZ int4+EF": dict(quant_weights="int8", quant_grads="int4", error_feedback=True),
    "bf16": dict(comm_dtype="bf16"),
}
QUALITY = ("fp32", "qwZ int8", "qwZ+qgZ int4", "qwZ+qgZ int4+EF", "bf16")
LINKS = {"fast": 25e9, "slow": 100e9 / 8}          # bytes per second
ALPHA = 5e-6
ZERO_KINDS = ("all_gather", "reduce_scatter", "all_to_all")
OPT = SimpleNamespace(seed=1337, dtype="float32", lr=TRAIN["lr"], betas=TRAIN["betas"], eps=1e-8,
                      weight_decay=TRAIN["weight_decay"])


def make_step(world, cfg, option):
    par = ParallelConfig(dp=world.size, zero=3, **OPTIONS[option])
    check_layout(par, cfg, TRAIN["batch_size"])
    return build_step(cfg, par, OPT, Mesh(dp=world.size, world=world))


def calls_per_step(step):
    """Collective calls of one step (gathers per layer twice, the root once, one per bucket; two hops: two)."""
    eng = step.engine
    gathers = sum(2 * len(u.segments) for u in eng.layers.units) + len(eng.layers.root.segments)
    return gathers + len(eng.buckets.buckets) * (2 if eng.wire.hops else 1)


def one_step(step, x, y, lr, world):
    """(step seconds, compute seconds, {kind: bytes}) of this rank, for one training step."""
    k0, w0 = step.bytes_by_kind(), step.engine.comm_wait
    t0 = time.perf_counter()
    step.forward_backward([(x, y)], step=0)
    step.clip_grad_norm(TRAIN["grad_clip"])
    step.update(lr)
    dt = time.perf_counter() - t0
    k1 = step.bytes_by_kind()
    return dt, dt - (step.engine.comm_wait - w0), {k: k1[k] - k0[k] for k in k1}


def bytes_mode(args, world, cfg, data):
    N = world.size
    steps = {o: make_step(world, cfg, o) for o in OPTIONS}
    batches = draw(Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0), 2 + args.steps)
    for o, s in steps.items():                                       # warm-up
        for x, y in batches[:2]:
            one_step(s, x, y, TRAIN["lr"], world)
    rec = {o: [] for o in OPTIONS}
    for i in range(2, 2 + args.steps):                               # rounds: every option one step
        names = list(OPTIONS) if i % 2 == 0 else list(reversed(OPTIONS))
        for o in names:
            rec[o].append(one_step(steps[o], *batches[i], TRAIN["lr"], world))
    rows = []
    for o, s in steps.items():
        t = world.all_reduce(np.array([[a, b] for a, b, _ in rec[o]], np.float64), op="max", algo="mpi")
        kinds = list(rec[o][0][2])
        sent = world.all_reduce(np.array([[k[n] for n in kinds] for _, _, k in rec[o]], np.float64), algo="mpi")
        per = dict(zip(kinds, sent[-1] / N))                         # the last step, mean per rank
        counted = sum(per[k] for k in ZERO_KINDS)
        formula = sum(step_bytes(s.engine).values()) / N
        same = bool((sent == sent[-1]).all())                        # every step alike
        ms, compute = 1e3 * statistics.median(t[:, 0]), 1e3 * statistics.median(t[:, 1])
        latency = calls_per_step(s) * (N - 1) * ALPHA
        row = {"option": o, "bytes_per_step": int(counted), "formula_bytes": int(formula),
               "other_bytes": int(sum(per.values()) - counted), "every_step_alike": same,
               "by_kind": {k: int(v) for k, v in per.items() if v}, "ms_per_step": ms, "compute_ms": compute}
        for link, bw in LINKS.items():
            row[f"comm_ms_{link}_link"] = 1e3 * (latency + counted / bw)
            row[f"model_ms_{link}_link"] = compute + row[f"comm_ms_{link}_link"]
        rows.append(row)
    fp = rows[0]
    for r in rows:
        r["bytes_vs_fp32"] = r["bytes_per_step"] / fp["bytes_per_step"]
        r["ms_vs_fp32"] = r["ms_per_step"] / fp["ms_per_step"]
        r["slow_link_vs_fp32"] = r["model_ms_slow_link"] / fp["model_ms_slow_link"]
        r["slow_comm_vs_fp32"] = r["comm_ms_slow_link"] / fp["comm_ms_slow_link"]
    if world.rank == 0:
        print(f"ZeRO-3 on {N} ranks, nanoGPT baby config ({steps['fp32'].model.num_params():,} parameters), "
              f"global batch {TRAIN['batch_size']}; {args.steps} timed steps per option, alternating rounds")
        print(f"{'option':17s} | {'bytes/step':>11s} | {'formula':>11s} | {'vs fp32':>7s} | {'other B':>7s} | "
              f"{'ms/step':>8s} | {'vs fp32':>7s} | {'compute':>8s} | {'25GB/s ms':>9s} | {'100Gb/s ms':>10s} | "
              f"{'vs fp32':>7s} | {'100Gb/s comm ms':>15s} | {'vs fp32':>7s}")
        for r in rows:
            print(f"{r['option']:17s} | {r['bytes_per_step']:11,d} | {r['formula_bytes']:11,d} | "
                  f"{r['bytes_vs_fp32']:7.3f} | {r['other_bytes']:7,d} | {r['ms_per_step']:8.1f} | "
                  f"{r['ms_vs_fp32']:7.2f} | {r['compute_ms']:8.1f} | {r['model_ms_fast_link']:9.1f} | "
                  f"{r['model_ms_slow_link']:10.1f} | {r['slow_link_vs_fp32']:7.2f} | "
                  f"{r['comm_ms_slow_link']:15.3f} | {r['slow_comm_vs_fp32']:7.3f}")
        both = next(r for r in rows if r["option"] == "qwZ+qgZ int4")
        exact = all(r["bytes_per_step"] == r["formula_bytes"] and r["every_step_alike"] for r in rows)
        print(f"goal qwZ+qgZ int4 <= 0.3x fp32 bytes: {both['bytes_vs_fp32']:.3f} "
              f"{'met' if both['bytes_vs_fp32'] <= 0.3 else 'MISSED'}; counted bytes equal the formula for "
              f"every option and step: {'met' if exact else 'MISSED'}")
    return rows


def quality_mode(args, world, cfg, data):
    val = draw(Batcher(data.val, TRAIN["batch_size"], cfg.block_size, seed=1), args.val_batches)
    rows, n = [], args.quality_steps
    for o in QUALITY:
        step = make_step(world, cfg, o)
        batcher = Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0)
        t0 = time.perf_counter()
        for it in range(n):
            step.forward_backward([batcher.next()], step=it)
            step.clip_grad_norm(TRAIN["grad_clip"])
            step.update(cosine_lr(it, TRAIN["lr"], TRAIN["warmup_iters"], n, TRAIN["min_lr"]))
        v = step.eval_loss(val)
        rows.append({"option": o, "val_loss": v, "steps": n, "seconds": time.perf_counter() - t0})
        if world.rank == 0:
            print(f"{o:17s} val loss {v:.4f} after {n} steps ({rows[-1]['seconds']:.0f} s)", flush=True)
    fp = rows[0]["val_loss"]
    for r in rows:
        r["vs_fp32"] = r["val_loss"] / fp - 1
    if world.rank == 0:
        print(f"val loss after {n} steps, ZeRO-3 on {world.size} ranks, {data.source} char-level")
        print(f"{'option':17s} | {'val loss':>8s} | {'vs fp32':>8s}")
        for r in rows:
            print(f"{r['option']:17s} | {r['val_loss']:8.4f} | {100 * r['vs_fp32']:+7.2f}%")
        for o in ("qwZ int8", "qwZ+qgZ int4+EF"):
            r = next(r for r in rows if r["option"] == o)
            print(f"goal {o} within 1% of fp32: {100 * r['vs_fp32']:+.2f}% {'met' if abs(r['vs_fp32']) <= 0.01 else 'MISSED'}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON (rank 0)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per option (bytes mode)")
    p.add_argument("--quality", action="store_true", help="train each option and report its val loss instead")
    p.add_argument("--quality-steps", type=int, default=1000)
    p.add_argument("--val-batches", type=int, default=50, help="validation batches of the val loss (quality mode)")
    p.add_argument("--n-layer", type=int, default=MODEL["n_layer"])
    p.add_argument("--n-embd", type=int, default=MODEL["n_embd"])
    p.add_argument("--data", default=DEFAULT_DATA, help=f"text file, char-level (default {DEFAULT_DATA})")
    args = p.parse_args(argv)
    world = Communicator()
    data = load_data(args.data, MODEL["block_size"])
    cfg = GPTConfig(vocab_size=data.vocab_size, **dict(MODEL, n_layer=args.n_layer, n_embd=args.n_embd))
    rows = (quality_mode if args.quality else bytes_mode)(args, world, cfg, data)
    if args.json and world.rank == 0:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
