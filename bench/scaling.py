"""Data-parallel weak scaling and the cost of each ZeRO stage, in one launch.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n 2 python -m bench.scaling [--json FILE]
        [--steps 12] [--warmup 3] [--data PATH]

Configuration: bench/train_step.py's baby GPT (nanoGPT's CPU run: n_layer 4, n_head 4,
n_embd 128, block 64, dropout 0, float32, AdamW, clip 1.0) with batch 12 PER RANK (weak
scaling: the work per rank is fixed, the global batch grows with N), one BLAS thread per
rank (set the variables above; the benchmark prints what it got).

Measured, alternating in rounds so drift in machine load hits every configuration alike:
  - N=1: rank 0 trains alone (a size-1 communicator, stage 0) while the other ranks sleep
    on a non-blocking barrier (polled with sleeps, so they leave the core alone);
  - N ranks, ZeRO stage 0 (DDP) and stages 1, 2, 3, without activation recomputation;
  - N ranks, stages 0 and 3 with recomputation "full" and "selective" (engine/recompute.py).
  - N ranks apart: each rank trains its own copy alone (a communicator of one), all at once,
    with no message between them: what sharing the machine costs (memory, caches, the
    cores' clocks), the ceiling of weak-scaling efficiency on this machine ("ceiling").
Reported: ms/step (median over the timed steps; the slowest rank's time per step),
weak-scaling efficiency = t(N=1) / t(N, stage 0) (ideal 1; the goal is >= 0.97), the
fraction of the step each rank spends blocked in collectives (ZeroEngine.comm_wait: the
wait for the gradient buckets after backward, the grad-norm all-reduce, the parameter
all-gathers; stage 3's layer gathers), and each configuration's step time relative to stage 0
without recomputation (the goal of ZeRO-3 without recomputation: <= 1.10 at N=2).
JSON keys: efficiency, t1_ms, ms_per_step {stage: ms}, comm_fraction {stage: f},
stage_vs_stage0 {stage: ratio}, recompute {"st<stage> <mode>": {ms, vs_stage0, comm_fraction}},
zero3_vs_stage0, ranks, blas_threads.
"""
import argparse
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

from bench import blas_core
from bench.train_step import DEFAULT_DATA, MODEL, TRAIN, blas_threads
from collectives import Communicator
from engine.data import Batcher, DataError, load_dataset
from engine.io import atomic_write_json
from models.gpt import GPT, GPTConfig
from parallel.data import ZeroEngine
from parallel.data.zero import RECOMPUTE


class Trainer:
    """One configuration: its engine, its own batcher (same seed everywhere), its timings."""

    def __init__(self, name, comm, stage, cfg, tokens, batch, recompute="none"):
        self.name, self.comm = name, comm
        self.eng = ZeroEngine(GPT(cfg, rng=1337), comm, stage=stage, lr=TRAIN["lr"], betas=TRAIN["betas"],
                              weight_decay=TRAIN["weight_decay"], recompute=recompute)
        self.batcher = Batcher(tokens, batch * comm.size, cfg.block_size, seed=1337)
        self.times, self.waits, self.b = [], [], batch

    def step(self, timed):
        eng, r, b = self.eng, self.comm.rank, self.b
        x, y = self.batcher.next()                              # (N b, T): the global batch
        wait0, t0 = eng.comm_wait, time.perf_counter()
        eng.zero_grad()
        loss = eng(x[r * b:(r + 1) * b], y[r * b:(r + 1) * b])[1]   # (b, T): this rank's slice
        eng.backward(loss)
        eng.clip_grad_norm(TRAIN["grad_clip"])
        eng.step(TRAIN["lr"])
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
            self.waits.append(eng.comm_wait - wait0)


def sleep_until_all_arrive(world):
    """A barrier that polls with sleeps, so an idle rank does not spin on a shared core."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the results as JSON (rank 0)")
    p.add_argument("--steps", type=int, default=12, help="timed steps per configuration (default 12)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration first (default 3)")
    p.add_argument("--block", type=int, default=4, help="steps per configuration per round (default 4)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"text file, char-level (default {DEFAULT_DATA})")
    p.add_argument("--n-layer", type=int, default=MODEL["n_layer"], help=argparse.SUPPRESS)   # smoke tests
    p.add_argument("--n-embd", type=int, default=MODEL["n_embd"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    world = Communicator()
    R, N = world.rank, world.size
    try:
        data = load_dataset(args.data, "char", 0.1, MODEL["block_size"])
    except DataError as e:
        if R == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = GPTConfig(vocab_size=data.vocab_size, **dict(MODEL, n_layer=args.n_layer, n_embd=args.n_embd))
    batch = TRAIN["batch_size"]
    solo = world.split(0 if R == 0 else None, label="solo")    # rank 0 alone: the N=1 baseline
    trainers = [Trainer(f"N={N} st{s}", world, s, cfg, data.train, batch) for s in range(4)]
    trainers += [Trainer(f"st{s} {mode}", world, s, cfg, data.train, batch, recompute=mode)
                 for s in (0, 3) for mode in RECOMPUTE if mode != "none"]
    base = Trainer("N=1", solo, 0, cfg, data.train, batch) if solo is not None else None
    alone = world.split(R, label="alone")                       # every rank by itself, all at once
    apart = Trainer(f"N={N} apart", alone, 0, cfg, data.train, batch)

    def run(tr, n, timed):
        for _ in range(n):
            tr.step(timed)

    def baseline(n, timed):
        if base is not None:
            run(base, n, timed)
        sleep_until_all_arrive(world.mpi)

    baseline(args.warmup, False)
    for tr in [apart] + trainers:
        run(tr, args.warmup, False)
    done = 0
    while done < args.steps:                                     # rounds: every configuration in turn
        k = min(args.block, args.steps - done)
        baseline(k, True)
        for tr in [apart] + trainers:
            run(tr, k, True)
        done += k

    def slowest(values):                                          # (steps,) per rank -> max over ranks
        arr = np.array(values, dtype=np.float64)
        return world.all_reduce(arr, op="max")

    med = {}
    frac = {}
    for s, tr in enumerate(trainers):                             # 0-3: the stages; then the recompute rows
        t = slowest(tr.times)
        med[s] = statistics.median(t) * 1e3
        frac[s] = float(np.sum(slowest(tr.waits)) / np.sum(t))
    t1 = statistics.median(base.times) * 1e3 if base is not None else 0.0
    t1 = float(world.all_reduce(np.array([t1]), op="max")[0])
    t_apart = statistics.median(slowest(apart.times)) * 1e3
    if R != 0:
        return 0
    eff = t1 / med[0]
    print(f"DP weak scaling, {N} ranks, {blas_threads()} BLAS thread(s) per rank (OpenBLAS kernels {blas_core()}), "
          f"batch {batch} per rank, "
          f"GPT n_layer {cfg.n_layer} n_embd {cfg.n_embd} block {cfg.block_size} vocab {cfg.vocab_size}, "
          f"{args.steps} timed steps each")
    print(f"{'config':>14} | {'ms/step':>8} | {'vs stage 0':>10} | {'comm wait':>9}")
    print(f"{'N=1':>14} | {t1:8.1f} | {'':>10} | {'':>9}")
    print(f"{apart.name:>14} | {t_apart:8.1f} | {t_apart / med[0]:10.2f} | {'':>9}")
    for s, tr in enumerate(trainers):
        print(f"{tr.name:>14} | {med[s]:8.1f} | {med[s] / med[0]:10.2f} | {100 * frac[s]:8.1f}%")
    print(f"efficiency t(N=1)/t(N={N}, stage 0) = {eff:.3f}  (goal >= 0.97 at N=2); "
          f"ceiling without messages t(N=1)/t(N={N} apart) = {t1 / t_apart:.3f}")
    print(f"ZeRO-3 without recomputation / stage 0 = {med[3] / med[0]:.3f}  (goal <= 1.10 at N=2)")
    result = {"efficiency": eff, "t1_ms": t1, "apart_ms": t_apart, "ceiling": t1 / t_apart,
              "ranks": N, "blas_threads": blas_threads(), "blas_core": blas_core(),
              "ms_per_step": {str(s): med[s] for s in range(4)},
              "comm_fraction": {str(s): frac[s] for s in range(4)},
              "stage_vs_stage0": {str(s): med[s] / med[0] for s in range(4)},
              "recompute": {trainers[s].name: {"ms": med[s], "vs_stage0": med[s] / med[0], "comm_fraction": frac[s]}
                            for s in range(4, len(trainers))},
              "zero3_vs_stage0": med[3] / med[0]}
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    MPI.COMM_WORLD.Barrier()
    sys.exit(main())
