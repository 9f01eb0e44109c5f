"""Model-state memory per rank for each ZeRO stage: measured against the paper's formulas.

    mpiexec -n N python -m bench.zero_memory [--json FILE] [--n-layer 4] [--n-embd 128]
    ENGINE_DEVICE=gpu-emulated mpiexec -n N python -m bench.zero_memory --device gpu   # device bytes

Rajbhandari et al. 2019 (arXiv 1910.02054, section 5), float32 AdamW, P parameters, N ranks:
plain DP 16P bytes per rank (4 params + 4 grads + 8 moments); stage 1 8P + 8P/N; stage 2
4P + 12P/N; stage 3 16P/N between steps, plus, during a step, the slot pool (two slots, each
the largest layer: parallel/data/pool.py) and the root (tied embeddings, ln_f: fsdp.py).

For each stage the benchmark builds the baby GPT of bench/train_step.py (float32, vocab 65)
on the N ranks, runs two training steps, and measures per rank:
  measured   bytes of parameters, gradients and optimizer moments held between steps: the
             arrays the engine keeps (ZeroEngine.model_state_bytes), the largest over ranks;
  peak       tracemalloc's peak during the second step minus the traced bytes before it
             (activations, gradients in flight, gathered layers: the transient part);
  layer      bytes of the largest gathered layer's parameters;
  pool       stage 3: bytes of the slot pool (2 x layer), the allowance on top of 16P/N;
  traced     everything tracemalloc sees held after the steps (from before the model was
             built): the model state plus the rest (stage 0's full 1-byte decay mask, the
             shard masks, the model's Python objects, communicator scratch pools).
Goal: measured <= formula * 1.05 + pool. Every stage runs with each activation
recomputation mode (engine/recompute.py: none, full, selective); the model state is the same,
the step peak is where they differ (``peak vs none``: the same stage's peak without
recomputation). JSON rows: stage, recompute, ranks, measured_bytes, formula_bytes, layer_bytes,
pool_bytes, step_peak_bytes, traced_resident_bytes, within_goal.

``--device gpu``: the same model's parameters on the device (CuPy, or engine/device_double.py
under ENGINE_DEVICE=gpu-emulated), ZeRO stages 0-3 and ZeRO-Offload over stages 1-2 (Ren et
al. 2021, arXiv 2101.06840; parallel/data/offload.py), and the device bytes each rank holds
after two training steps: backend.device_bytes() (CuPy's pool, the double's count) once the
step's activations and graph are freed, minus the same count before the model was built. So
it counts exactly the model state on the device: parameters, gradients, AdamW moments and the
decay mask (a bool, 1 byte per element of the optimizer's range). With k bytes per element
(float32: 4), P parameters (padded to N shards), N ranks (DEVICE_FORMULA):

    stage 0        (4k + 1) P                 = 17P         params, grads, m, v, mask: all full
    stage 1        2k P + (2k + 1) P/N        = 8P + 9P/N   m, v and mask sharded
    stage 2        k P + (3k + 1) P/N         = 4P + 13P/N  + the gradient shard
    stage 3        (4k + 1) P/N               = 17P/N       everything sharded (between steps)
    offload, 1     2k P                       = 8P          params and the full gradient buffer
    offload, 2     k P                        = 4P          params only (gradients transient)

ZeRO-Offload's claim (Ren et al. section 4.1): the device keeps only the parameters and transient
gradients; stage 2 over offload here is exactly that, 4P, in place of stage 2's 4P + 13P/N.
The host then holds (4k + 1) P/N (master, gradient shard, m, v, mask; stage 2 + kP/N for the
inbox where each pass's parts land: HOST_FORMULA). The rows also report the step's transient
device peak above the held bytes (activations, buckets in flight; the double only) and the
bytes moved per step (d2h / h2d; the double only). Goal: measured within 5% of the formula.
"""
import argparse
import gc
import sys
import tracemalloc

import numpy as np

from bench.train_step import MODEL
from collectives import Communicator
from engine.io import atomic_write_json
from models.gpt import GPT, GPTConfig
from parallel.data import ZeroEngine
from parallel.data.zero import RECOMPUTE

FORMULA = {0: lambda P, N: 16 * P, 1: lambda P, N: 8 * P + 8 * P / N,
           2: lambda P, N: 4 * P + 12 * P / N, 3: lambda P, N: 16 * P / N}
DEVICE_FORMULA = {(0, "none"): lambda P, N, k: (4 * k + 1) * P,
                  (1, "none"): lambda P, N, k: 2 * k * P + (2 * k + 1) * P / N,
                  (2, "none"): lambda P, N, k: k * P + (3 * k + 1) * P / N,
                  (3, "none"): lambda P, N, k: (4 * k + 1) * P / N,
                  (1, "optimizer"): lambda P, N, k: 2 * k * P,
                  (2, "optimizer"): lambda P, N, k: k * P}
DEVICE_NAMES = {(0, "none"): "17P", (1, "none"): "8P + 9P/N", (2, "none"): "4P + 13P/N", (3, "none"): "17P/N",
                (1, "optimizer"): "8P", (2, "optimizer"): "4P"}
HOST_FORMULA = {1: lambda P, N, k: (4 * k + 1) * P / N, 2: lambda P, N, k: (5 * k + 1) * P / N}


def measure(comm, cfg, stage, batch=12, recompute="none"):
    gc.collect()
    tracemalloc.start()
    model = GPT(cfg, rng=1337)
    P = model.num_params()
    layer = 4 * max(sum(p.size for p in block.parameters()) for block in model.blocks)
    eng = ZeroEngine(model, comm, stage=stage, lr=1e-3, recompute=recompute)
    pool = eng.layers.pool_bytes() if eng.layers is not None else 0
    rng = np.random.default_rng(0)
    b = max(1, batch // comm.size)
    peak = before = 0
    for step in range(2):
        x = rng.integers(0, cfg.vocab_size, size=(b, cfg.block_size))     # (B/N, T)
        if step == 1:
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        eng.zero_grad()
        eng.backward(eng(x, x)[1])
        eng.clip_grad_norm(1.0)
        eng.step(1e-3)
        if step == 1:
            peak = tracemalloc.get_traced_memory()[1] - before
    gc.collect()
    resident = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    held = eng.model_state_bytes()
    held, peak, resident = (float(v) for v in comm.all_reduce(np.array([held, peak, resident], np.float64), op="max"))
    return {"stage": stage, "recompute": recompute, "ranks": comm.size, "params": P, "measured_bytes": int(held),
            "formula_bytes": int(FORMULA[stage](P, comm.size)), "layer_bytes": layer, "pool_bytes": pool,
            "step_peak_bytes": int(peak), "traced_resident_bytes": int(resident)}


def measure_device(comm, cfg, stage, offload, batch=12):
    """One --device gpu row: device bytes held after two steps, against DEVICE_FORMULA."""
    from engine import backend
    double = None
    if backend.emulated():
        from engine import device_double as double
    gc.collect()
    before = backend.device_bytes()
    model = GPT(cfg, rng=1337)
    eng = ZeroEngine(model, comm, stage=stage, lr=1e-3, offload=offload)
    rng, b = np.random.default_rng(0), max(1, batch // comm.size)
    peak = down = up = 0
    for step in range(2):
        x = backend.to_device(rng.integers(0, cfg.vocab_size, size=(b, cfg.block_size)))    # (B/N, T)
        if step == 1 and double is not None:
            double.memory.reset_peak()
            held0, d0, u0 = double.memory.used, double.memory.d2h_bytes, double.memory.h2d_bytes
        eng.zero_grad()
        eng.backward(eng(x, x)[1])
        eng.clip_grad_norm(1.0)
        eng.step(1e-3)
        del x
        if step == 1 and double is not None:
            peak = double.memory.peak - held0
            down, up = double.memory.d2h_bytes - d0, double.memory.h2d_bytes - u0
    gc.collect()
    held = backend.device_bytes() - before
    host = eng.offload.host_bytes() if eng.offload is not None else 0
    P, k = len(eng.flat.data["float32"]), 4
    v = comm.all_reduce(np.array([held, peak, down, up, host], np.float64), op="max")
    held, peak, down, up, host = (int(x) for x in v)
    formula = DEVICE_FORMULA[(stage, offload)](P, comm.size, k)
    return {"stage": stage, "offload": offload, "ranks": comm.size, "params": P, "device_bytes": held,
            "formula_bytes": int(formula), "ratio": held / formula, "within_goal": abs(held / formula - 1) <= 0.05,
            "step_transient_bytes": peak, "host_bytes": host,
            "host_formula_bytes": int(HOST_FORMULA[stage](P, comm.size, k)) if offload != "none" else 0,
            "d2h_bytes_per_step": down, "h2d_bytes_per_step": up}


def print_device(rows, emulated):
    mib = 2.0 ** -20
    print(f"Device model-state bytes per rank, float32 AdamW, {rows[0]['params']:,} parameters (padded), "
          f"N={rows[0]['ranks']}, {'engine/device_double.py' if emulated else 'CuPy pool'}")
    print(f"{'stage':>5} | {'offload':>9} | {'formula':>11} | {'formula MiB':>11} | {'device MiB':>10} | "
          f"{'ratio':>6} | {'transient MiB':>13} | {'host MiB':>8} | {'d2h MiB':>7} | {'h2d MiB':>7} | goal")
    for r in rows:
        print(f"{r['stage']:>5} | {r['offload']:>9} | {DEVICE_NAMES[(r['stage'], r['offload'])]:>11} | "
              f"{r['formula_bytes'] * mib:11.3f} | {r['device_bytes'] * mib:10.3f} | {r['ratio']:6.3f} | "
              f"{r['step_transient_bytes'] * mib:13.3f} | {r['host_bytes'] * mib:8.3f} | "
              f"{r['d2h_bytes_per_step'] * mib:7.3f} | {r['h2d_bytes_per_step'] * mib:7.3f} | "
              f"{'ok' if r['within_goal'] else 'MISSED'}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON (rank 0)")
    p.add_argument("--n-layer", type=int, default=MODEL["n_layer"])
    p.add_argument("--n-embd", type=int, default=MODEL["n_embd"])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: device bytes of ZeRO 0-3 and ZeRO-Offload (CuPy, or ENGINE_DEVICE=gpu-emulated)")
    args = p.parse_args(argv)
    comm = Communicator()
    cfg = GPTConfig(vocab_size=65, **dict(MODEL, n_layer=args.n_layer, n_embd=args.n_embd))
    if args.device == "gpu":
        from engine import backend
        backend.set_device("gpu")
        rows = [measure_device(comm, cfg, stage, off) for stage, off in DEVICE_FORMULA]
        if comm.rank == 0:
            print_device(rows, backend.emulated())
            if args.json:
                atomic_write_json(args.json, rows)
        return 0 if all(r["within_goal"] for r in rows) else 1
    rows = [measure(comm, cfg, stage, recompute=mode) for stage in range(4) for mode in RECOMPUTE]
    none = {r["stage"]: r["step_peak_bytes"] for r in rows if r["recompute"] == "none"}
    for r in rows:
        r["within_goal"] = r["measured_bytes"] <= 1.05 * r["formula_bytes"] + r["pool_bytes"]
        r["peak_vs_none"] = r["step_peak_bytes"] / max(none[r["stage"]], 1)
    if comm.rank != 0:
        return 0
    mib = 2.0 ** -20
    print(f"ZeRO model-state memory per rank, float32 AdamW, {rows[0]['params']:,} parameters, N={comm.size}, "
          f"GPT n_layer {cfg.n_layer} n_embd {cfg.n_embd} block {cfg.block_size}, batch {max(1, 12 // comm.size)} "
          f"per rank")
    print(f"{'stage':>5} | {'recompute':>9} | {'formula':>14} | {'formula MiB':>11} | {'measured MiB':>12} | "
          f"{'ratio':>6} | {'pool MiB':>8} | {'traced MiB':>10} | {'step peak MiB':>13} | {'vs none':>7} | goal")
    names = {0: "16P", 1: "8P + 8P/N", 2: "4P + 12P/N", 3: "16P/N (+ pool)"}
    for r in rows:
        print(f"{r['stage']:>5} | {r['recompute']:>9} | {names[r['stage']]:>14} | {r['formula_bytes'] * mib:11.2f} | "
              f"{r['measured_bytes'] * mib:12.2f} | {r['measured_bytes'] / r['formula_bytes']:6.3f} | "
              f"{r['pool_bytes'] * mib:8.2f} | {r['traced_resident_bytes'] * mib:10.2f} | "
              f"{r['step_peak_bytes'] * mib:13.2f} | {r['peak_vs_none']:7.2f} | "
              f"{'ok' if r['within_goal'] else 'MISSED'}")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0 if all(r["within_goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
