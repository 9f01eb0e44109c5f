"""Model-state memory per rank for each ZeRO stage: measured against the paper's formulas.

    mpiexec -n N python -m bench.zero_memory [--json FILE] [--n-layer 4] [--n-embd 128]

Rajbhandari et al. 2019 (arXiv 1910.02054, section 5), float32 AdamW, P parameters, N ranks:
plain DP 16P bytes per rank (4 params + 4 grads + 8 moments); stage 1 8P + 8P/N; stage 2
4P + 12P/N; stage 3 16P/N, plus the parameters gathered for the layer computing (and the
next one, prefetched) and, here, the root (tied embeddings, ln_f: see parallel/data/fsdp.py).

For each stage the benchmark builds the baby GPT of bench/train_step.py (float32, vocab 65)
on the N ranks, runs two training steps, and measures per rank:
  measured   bytes of parameters, gradients and optimizer moments held between steps: the
             arrays the engine keeps (ZeroEngine.model_state_bytes), the largest over ranks;
  peak       tracemalloc's peak during the second step minus the traced bytes before it
             (activations, gradients in flight, gathered layers: the transient part);
  layer      bytes of the largest gathered layer's parameters (stage 3's allowance);
  traced     everything tracemalloc sees held after the steps (from before the model was
             built): the model state plus the rest (stage 0's full 1-byte decay mask, the
             shard masks, the model's Python objects, communicator scratch pools).
Goal: measured <= formula * 1.05 + layer. JSON rows: stage, ranks, measured_bytes,
formula_bytes, layer_bytes, step_peak_bytes, traced_resident_bytes, within_goal.
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

FORMULA = {0: lambda P, N: 16 * P, 1: lambda P, N: 8 * P + 8 * P / N,
           2: lambda P, N: 4 * P + 12 * P / N, 3: lambda P, N: 16 * P / N}


def measure(comm, cfg, stage, batch=12):
    gc.collect()
    tracemalloc.start()
    model = GPT(cfg, rng=1337)
    P = model.num_params()
    layer = 4 * max(sum(p.size for p in block.parameters()) for block in model.blocks)
    eng = ZeroEngine(model, comm, stage=stage, lr=1e-3)
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
    return {"stage": stage, "ranks": comm.size, "params": P, "measured_bytes": int(held),
            "formula_bytes": int(FORMULA[stage](P, comm.size)), "layer_bytes": layer, "step_peak_bytes": int(peak),
            "traced_resident_bytes": int(resident)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON (rank 0)")
    p.add_argument("--n-layer", type=int, default=MODEL["n_layer"])
    p.add_argument("--n-embd", type=int, default=MODEL["n_embd"])
    args = p.parse_args(argv)
    comm = Communicator()
    cfg = GPTConfig(vocab_size=65, **dict(MODEL, n_layer=args.n_layer, n_embd=args.n_embd))
    rows = [measure(comm, cfg, stage) for stage in range(4)]
    for r in rows:
        r["within_goal"] = r["measured_bytes"] <= 1.05 * r["formula_bytes"] + r["layer_bytes"]
    if comm.rank != 0:
        return 0
    mib = 2.0 ** -20
    print(f"ZeRO model-state memory per rank, float32 AdamW, {rows[0]['params']:,} parameters, N={comm.size}")
    print(f"{'stage':>5} | {'formula':>14} | {'formula MiB':>11} | {'measured MiB':>12} | {'ratio':>6} | "
          f"{'layer MiB':>9} | {'traced MiB':>10} | {'step peak MiB':>13} | goal")
    names = {0: "16P", 1: "8P + 8P/N", 2: "4P + 12P/N", 3: "16P/N + layer"}
    for r in rows:
        print(f"{r['stage']:>5} | {names[r['stage']]:>14} | {r['formula_bytes'] * mib:11.2f} | "
              f"{r['measured_bytes'] * mib:12.2f} | {r['measured_bytes'] / r['formula_bytes']:6.3f} | "
              f"{r['layer_bytes'] * mib:9.2f} | {r['traced_resident_bytes'] * mib:10.2f} | "
              f"{r['step_peak_bytes'] * mib:13.2f} | "
              f"{'ok' if r['within_goal'] else 'MISSED'}")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0 if all(r["within_goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
