"""Tensor-parallel benchmark: activation memory against Korthikanti et al.'s formulas, bytes on
the wire against Megatron's count, the largest model in a memory budget, and decode speed.

    mpiexec -n 4 python -m bench.tensor_parallel [--json FILE] [--plot FILE.png] [--mem-budget 64MB]

Every measurement runs for tp = 1, 2, 4 (those the launch holds; ranks outside a tp group wait
without spinning) in float32, with and without sequence-parallel regions (--tp-token-shards):

1. Activation bytes per rank per layer: tracemalloc's growth while L blocks run forward with
   the graph recorded (what backward keeps, divided by L), beside Korthikanti et al. 2022
   (arXiv 2205.05198, section 4) for s tokens, b sequences, hidden h, a heads, in 16-bit
   activations with 1-byte dropout masks:
       none             sbh (34 + 5 a s / h)
       TP t             sbh (10 + 24 / t + 5 a s / (h t))
       TP t + regions   sbh (34 + 5 a s / h) / t
   scaled for float32 as this engine keeps them: every activation 4 bytes and every dropout
   mask 4 bytes too (ops.dropout keeps the scaled float mask), i.e. 2 sbh per 16-bit sbh and
   4 sbh per mask byte (formula_bytes = 2 x (paper - masks) + 4 x masks, masks: 2 sbh per
   layer, plus a s^2 b of attention-probability dropout, which GPT-2 here does not have).
   The blockwise attention keeps no s x s matrix beyond its single-block path's P.
2. Bytes each rank sends in one training step, from the Communicator's byte counter, beside
   Megatron's count for TP alone: per layer 2 all-reduces forward and 2 backward of s b h
   elements, plus the embedding's forward all-reduce and the output layer's input gradient,
   the loss's three all-reduces of s b numbers and the norm's one, each all-reduce sending
   what the algorithm algo="auto" picks sends per rank: 2 (t - 1) / t of its bytes for the ring
   and Rabenseifner's, n log2 t for recursive doubling (small messages).
3. The largest GPT (n_layer fixed, n_embd grown in steps of 16 x tp, heads of 16) whose
   training step fits --mem-budget bytes per rank (tracemalloc peak of one step, parameters,
   gradients and AdamW moments included), per tp: JSON ``max_params``.
4. Decoding, greedy, batch 1: seconds per token at each tp for a model whose weights are
   large against its KV cache (n_embd 512, 4 layers, 64 new tokens after an 8-token prompt).

On a machine with fewer cores than ranks the decode times are informative only.
"""
import argparse
import sys
import time
import tracemalloc
import types

import numpy as np

from collectives import Communicator, Mesh
from bench import idle
from engine import backend
from engine.autograd import Tensor
from engine.config import parse_bytes
from engine.io import atomic_write_json
from models.gpt import GPT, GPTConfig
from parallel import ParallelConfig, build_step
from parallel.tensor import shard_gpt
from parallel.tensor.comm import token_range

TRAIN = types.SimpleNamespace(seed=0, dtype="float32", lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def formula_bytes(s, b, h, a, t, regions, dropout):
    """Korthikanti et al.'s activation bytes per layer, restated for this engine's float32
    (see the module docstring): of the paper's 34 sbh + 5 as^2 b (16-bit), the 16-bit values are
    16 sbh elements + as^2 b softmax elements (its attention-dropout mask and output: none here),
    and its two 1-byte residual-dropout masks are float32 masks here. TP t keeps 4 sbh elements
    whole (LayerNorms, the attention and MLP inputs) and 12 sbh / t + as^2 b / t split; with
    sequence-parallel regions everything is split."""
    sbh, scores = s * b * h, a * s * s * b
    masks = 2 * 4 * sbh if dropout else 0
    if regions and t > 1:
        return (4 * (16 * sbh + scores) + masks) / t
    return 4 * (4 * sbh + 12 * sbh / t + scores / t) + masks


def activation_bytes(comm, cfg, b, regions, layers=4):
    """tracemalloc's growth per layer while ``layers`` blocks run forward with the graph kept."""
    model = GPT(cfg, np.random.default_rng(0))
    if comm.size > 1:
        shard_gpt(model, comm, tokens=regions)
    model.train()
    s = cfg.block_size
    lo, hi = token_range(s, comm) if regions and comm.size > 1 else (0, s)
    x0 = np.random.default_rng(1).standard_normal((b, hi - lo, cfg.n_embd)).astype(np.float32)
    with model.noise.located(pos=np.arange(lo, hi)):
        x = Tensor(x0, requires_grad=True)
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for block in list(model.blocks)[:layers]:
            x = block(x)                                           # the graph holds what backward needs
        held = tracemalloc.get_traced_memory()[0] - base - x.data.nbytes   # less the last output
        tracemalloc.stop()
    return held / layers


def step_peak(comm, cfg, b, regions):
    """(peak traced bytes of one training step, parameters on this rank, bytes sent)."""
    tracemalloc.start()
    par = ParallelConfig(tp=comm.size, tp_token_shards=regions and comm.size > 1)
    mesh = Mesh(tp=comm.size, world=comm)
    step = build_step(cfg, par, TRAIN, mesh)
    g = np.random.default_rng(2)
    x = g.integers(0, cfg.vocab_size, (b, cfg.block_size))
    y = g.integers(0, cfg.vocab_size, (b, cfg.block_size))
    comms = [mesh.axis(a).comm for a in ("dp", "pp", "sp", "tp")] + [mesh.group("dp", "sp"), mesh.pp_ends()]
    comms = [c for c in comms if c is not None]
    sent0 = sum(c.bytes_sent for c in comms)
    step.forward_backward([(x, y)], step=1)
    step.clip_grad_norm(1.0)
    step.update(1e-3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    sent = sum(c.bytes_sent for c in comms) - sent0
    return peak, sum(p.size for p in step.module.parameters()), sent


SENT = {"ring": lambda n, t: 2 * (t - 1) * (n // t), "rabenseifner": lambda n, t: 2 * (t - 1) * (n // t),
        "recursive_doubling": lambda n, t: n * (t - 1).bit_length(), "tree": lambda n, t: 2 * n * (t - 1).bit_length()}


def all_reduce_bytes(n, t):
    """Bytes one rank sends in an all-reduce of n bytes over t ranks with the algorithm that
    algo="auto" picks (collectives/cost.py): 2 (t-1)/t n for the ring and Rabenseifner's
    algorithm, n log2 t for recursive doubling (t a power of two here)."""
    if t == 1:
        return 0
    from collectives import cost
    return SENT[cost.choose("all_reduce", t, n)](n, t)


def wire_formula(cfg, b, t):
    """Megatron's bytes per rank per step for TP alone: 4 all-reduces of s b h float32 per
    layer, the embedding's forward one and the output layer's input gradient; the loss's
    all-reduces of s b numbers (the max; the sum-exp and the target logit together) and the
    gradient norm's one float64, each sent as collectives/cost.py's choice sends it."""
    s, h, L = cfg.block_size, cfg.n_embd, cfg.n_layer
    act = s * b * h * 4
    return (4 * L + 2) * all_reduce_bytes(act, t) + all_reduce_bytes(s * b * 4, t) + \
        all_reduce_bytes(2 * s * b * 4, t) + all_reduce_bytes(8, t)


def decode_seconds(comm, cfg, tokens=64):
    model = GPT(cfg, np.random.default_rng(0))
    if comm.size > 1:
        shard_gpt(model, comm)
    prompt = np.arange(8)[None] % cfg.vocab_size
    model.generate(prompt, 4, temperature=0)                    # warm
    comm.barrier()
    t0 = time.perf_counter()
    out = model.generate(prompt, tokens, temperature=0)
    dt = comm.all_reduce(np.array([time.perf_counter() - t0]), op="max")[0]
    return dt / tokens, out


def largest(comm, budget, n_layer, b, s, regions):
    """The largest n_embd (steps of 16 tp) whose training step fits the budget: its parameters."""
    t, best, h = comm.size, None, 16 * comm.size
    while True:
        cfg = GPTConfig(block_size=s, vocab_size=256, n_layer=n_layer, n_head=h // 16, n_embd=h)
        peak = comm.all_reduce(np.array([step_peak(comm, cfg, b, regions)[0]], dtype=np.float64), op="max")[0]
        if peak > budget:
            return best
        full = GPT(cfg, np.random.default_rng(0)).num_params()
        best = {"tp": t, "n_embd": h, "max_params": int(full), "peak_bytes": int(peak)}
        h += 16 * t


def main(argv=None):
    backend.set_device("cpu")     # activation and step bytes are tracemalloc's: host memory
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--mem-budget", default="48MB")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    world = Communicator()
    W, R = world.size, world.rank
    say = print if R == 0 else (lambda *a, **k: None)
    tps = [t for t in (1, 2, 4) if t <= W]
    cfg = GPTConfig(block_size=args.seq, vocab_size=256, n_layer=4, n_head=8, n_embd=256, dropout=0.1)
    s, b, h, a = cfg.block_size, args.batch, cfg.n_embd, cfg.n_head
    rows, wire, fits, decode = [], [], [], []
    say(f"# bench.tensor_parallel: {W} ranks, float32, s={s} b={b} h={h} a={a}, dropout {cfg.dropout}")
    say("#  tp regions  measured_bytes  formula_bytes  ratio")
    for t in tps:
        sub = world.split(0 if R < t else None)
        for regions in (False, True):
            if regions and t == 1:
                continue
            if sub is not None:
                got = sub.all_reduce(np.array([activation_bytes(sub, cfg, b, regions)]), op="max")[0]
                want = formula_bytes(s, b, h, a, t, regions, cfg.dropout > 0)
                row = {"tp": t, "seq_parallel": regions, "measured_bytes": int(got), "formula_bytes": int(want)}
                rows.append(row)
                say(f"{t:4d} {str(regions):>7} {int(got):15d} {int(want):14d} {got / want:6.3f}")
            idle(world)
    say("#  tp  sent_bytes_per_rank  formula  ratio")
    for t in tps:
        sub = world.split(0 if R < t else None)
        if sub is not None:
            small = GPTConfig(block_size=args.seq, vocab_size=256, n_layer=2, n_head=8, n_embd=128)
            _, _, sent = step_peak(sub, small, b, False)
            if sent is not None:
                sent = sub.all_reduce(np.array([float(sent)]), op="max")[0]
                want = wire_formula(small, b, t)
                wire.append({"tp": t, "sent_bytes": int(sent), "formula_bytes": int(want)})
                say(f"{t:5d} {int(sent):20d} {int(want):8d} {sent / want if want else float('nan'):6.3f}")
        idle(world)
    budget = parse_bytes(args.mem_budget)
    say(f"#  tp  max_params within {budget / 2**20:.0f} MiB per rank (n_layer 2, s 64, b 2, regions at tp > 1)")
    for t in tps:
        sub = world.split(0 if R < t else None)
        if sub is not None:
            best = largest(sub, budget, 2, 2, 64, regions=t > 1)
            if best is not None:
                fits.append(best)
                say(f"{t:5d} {best['max_params']:12d} (n_embd {best['n_embd']}, peak {best['peak_bytes'] / 2**20:.1f} "
                    "MiB)")
        idle(world)
    say("#  tp  decode_s_per_token (greedy, n_embd 512, 4 layers, batch 1)  same_tokens")
    big = GPTConfig(block_size=128, vocab_size=256, n_layer=4, n_head=8, n_embd=512)
    ref = None
    for t in tps:
        sub = world.split(0 if R < t else None)
        if sub is not None:
            sec, out = decode_seconds(sub, big)
            ref = out if ref is None else ref
            decode.append({"tp": t, "s_per_token": float(sec), "same_tokens": bool(np.array_equal(out, ref))})
            say(f"{t:5d} {sec:12.5f} {np.array_equal(out, ref)}")
        idle(world)
    if fits and R == 0:
        base = next((f["max_params"] for f in fits if f["tp"] == 1), None)
        for f in fits:
            if base:
                say(f"# tp {f['tp']}: {f['max_params'] / base:.2f}x the parameters of tp 1")
    if args.json and R == 0:
        atomic_write_json(args.json, {"meta": {"ranks": W, "s": s, "b": b, "h": h, "a": a},
                                      "rows": rows, "wire": wire, "max_params": fits, "decode": decode})
    if args.plot and R == 0 and rows:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            say("note: matplotlib is not installed; no plot")
        else:
            fig, ax = plt.subplots(figsize=(6, 4))
            labels = [f"tp{r['tp']}{'+regions' if r['seq_parallel'] else ''}" for r in rows]
            xs = np.arange(len(rows))
            ax.bar(xs - 0.2, [r["measured_bytes"] / 2**20 for r in rows], 0.4, label="measured")
            ax.bar(xs + 0.2, [r["formula_bytes"] / 2**20 for r in rows], 0.4, label="Korthikanti et al.")
            ax.set_xticks(xs, labels)
            ax.set_ylabel("activation MiB per rank per layer")
            ax.legend()
            fig.tight_layout()
            fig.savefig(args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
