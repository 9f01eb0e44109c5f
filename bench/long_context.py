"""Long-context benchmark: memory per rank and ring-step overlap under sequence parallelism.

    mpiexec -n 4 python -m bench.long_context
    mpiexec -n 4 python -m bench.long_context --mem-budget 64MB --json lc.json --plot lc.png
    mpiexec -n 4 python -m bench.long_context --mode ulysses --seq-lens 512,1024,2048

Three measurements, each for sp = 1, 2, 4 (those that fit the launch; ranks outside the sp
group sleep in a non-spinning barrier so they do not steal the cores):

1. Peak memory per rank against sequence length: one full training step (GPT forward,
   backward, gradient all-reduce over sp, AdamW) of a model whose block_size is the
   sequence length, measured with tracemalloc from before the model is built, so
   parameters, gradients and Adam moments count too; the maximum over the sp ranks. With
   the sequence sharded, activations shrink as 1/sp; the position table wpe (and its
   gradient and moments) grows with T on every rank, which pulls the ratio of trainable
   lengths below sp, while the attention kernel's (B, H, rows, 256) score tile, whose rows
   are the whole sequence at sp = 1 but one T/2sp chunk per ring pair, pushes it above.
2. The longest sequence that trains within --mem-budget bytes per rank: doubling, then
   bisection to a multiple of --unit tokens.
3. Ring attention forward at fixed sizes (the baseline for the overlap claim is the same
   work split in two): the whole ring (transfer of the next K/V block posted before the
   current block's compute, parallel/sequence/ring_attention.py) against compute alone (the same
   blocks, no transfers) and communication alone (the same N-1 transfers, no compute), per
   ring step; overlap is good when ring ~ max(compute, comm) (goal <= 1.1x).

--json writes {"meta", "rows": [{sp, seq_len, peak_bytes}], "max_seq_len": {sp: T},
"ring_steps": [{sp, seq_len, compute_ms, comm_ms, ring_ms, ratio}]}; --plot draws peak
memory against length, one line per sp, with the budget.
"""
import argparse
import sys
import time
import tracemalloc

import numpy as np

from collectives import Communicator
from engine.flat import FlatParameters
from bench import idle
from engine.config import parse_bytes
from engine.io import atomic_write_json
from engine.optim import AdamW
from models.gpt import GPT, GPTConfig
from parallel.sequence.ring_attention import RingAttention, RingShift, block_forward
from parallel.sequence import SequenceParallel, SequenceParallelError, check_config, layout_for
from parallel.sequence.split import local_segments


def train_step_peak(sub, mode, T, a):
    """Peak traced bytes of one training step at length T on this rank of sub."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    cfg = GPTConfig(block_size=T, vocab_size=a.vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    model = GPT(cfg, rng=0)
    flat = FlatParameters(model.named_parameters())
    opt = AdamW(flat.data["float32"], flat.grad["float32"], flat.decay_mask["float32"], lr=1e-3)
    sp = SequenceParallel(sub, model, mode=a.mode)
    x = np.random.default_rng(T).integers(0, a.vocab, (a.batch, T))
    sp.forward_backward(x, x, grads=[flat.grad["float32"]])
    opt.step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del model, flat, opt, sp
    return int(sub.all_reduce(np.array([peak], np.int64), op="max")[0])


def max_seq_len(sub, a, budget):
    """Longest multiple of `unit` tokens (and of the split) whose step fits `budget` bytes."""
    unit = a.unit
    ok, bad, T = 0, None, unit
    while bad is None:
        if train_step_peak(sub, a.mode, T, a) <= budget:
            ok, T = T, 2 * T
        else:
            bad = T
        if T > a.max_len:
            return ok
    while bad - ok > unit:
        mid = (ok + bad) // 2 // unit * unit
        if train_step_peak(sub, a.mode, mid, a) <= budget:
            ok = mid
        else:
            bad = mid
    return ok


def ring_timing(sub, T, a, reps):
    """(compute_ms, comm_ms, ring_ms) per ring step of a ring-attention forward at length T."""
    N, r = sub.size, sub.rank
    rng = np.random.default_rng(r)
    Tl, hs = T // N, a.n_embd // a.n_head
    q, k, v = (rng.standard_normal((a.batch, a.n_head, Tl, hs)).astype(np.float32) for _ in range(3))
    layout = layout_for("ring", N)
    segs = [local_segments(T, j, N, layout) for j in range(N)]
    kv = np.stack([k, v])                                    # (2, B, H, T/N, hs)
    spare = np.empty_like(kv)
    scale = hs ** -0.5

    def compute():
        for s in range(N):
            block_forward(q, kv, segs[r], segs[(r - s) % N], True, scale, 256, [None] * len(segs[r]))

    def comm():
        for s in range(N - 1):
            RingShift(sub, kv, spare, 99).wait()

    def ring():
        RingAttention().forward(q, k, v, comm=sub, causal=True, layout=layout)

    best = {}
    for name, fn in (("compute", compute), ("comm", comm), ("ring", ring)) * reps:
        sub.barrier()
        t0 = time.perf_counter()
        fn()
        dt = float(sub.all_reduce(np.array([time.perf_counter() - t0]), op="max")[0])
        best[name] = min(best.get(name, dt), dt)
    return tuple(1e3 * best[n] / N for n in ("compute", "comm", "ring"))


def plot(path, rows, budget, maxlen):
    import matplotlib                                        # lazily: only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for sp in sorted({r["sp"] for r in rows}):
        pts = sorted((r["seq_len"], r["peak_bytes"] / 2**20) for r in rows if r["sp"] == sp)
        ax.plot(*zip(*pts), marker="o", label=f"sp={sp} (max {maxlen.get(str(sp), '?')})")
    ax.axhline(budget / 2**20, color="gray", ls="--", label="budget")
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="peak MiB per rank",
           title="one training step under sequence parallelism")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="ring", choices=["ring", "ulysses"], help="sp attention (default ring)")
    p.add_argument("--sp", default="1,2,4", help="sp sizes to measure (those <= the launch size)")
    p.add_argument("--seq-lens", default="256,512,1024,2048", help="lengths for the memory table")
    p.add_argument("--mem-budget", default="64MB", help="bytes per rank for the longest-length search")
    p.add_argument("--unit", type=int, default=64, help="length granularity of the search")
    p.add_argument("--max-len", type=int, default=1 << 16, help="stop the search here")
    p.add_argument("--ring-lens", default="1024,4096", help="lengths for the ring-step timing")
    p.add_argument("--reps", type=int, default=3, help="timing repetitions (best kept)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    a = p.parse_args(argv)
    world = Communicator()
    R = world.rank
    say = (lambda *s: print(*s, flush=True)) if R == 0 else (lambda *s: None)
    try:
        budget = parse_bytes(a.mem_budget)
        sps = [int(s) for s in a.sp.split(",") if int(s) <= world.size]
        lens = [int(t) for t in a.seq_lens.split(",")]
        ring_lens = [int(t) for t in a.ring_lens.split(",") if t]
        for sp in sps:
            check_config(sp, a.mode, a.unit)
            for T in lens + (ring_lens if sp > 1 else []):
                check_config(sp, a.mode, T)
    except (ValueError, SequenceParallelError) as e:
        print(f"long_context: {e}", file=sys.stderr, flush=True)
        return 2
    rows, maxlen, steps = [], {}, []
    say(f"# peak memory per rank, one training step ({a.mode}; GPT L={a.n_layer} C={a.n_embd} "
        f"H={a.n_head} B={a.batch} float32; tracemalloc, params + grads + AdamW included)")
    say(f"{'sp':>3} {'seq_len':>8} {'peak_MiB':>9} {'per_token_KiB':>14}")
    for sp in sps:
        sub = world.split(0 if R < sp else None)
        if sub is not None:
            for T in lens:
                peak = train_step_peak(sub, a.mode, T, a)
                rows.append({"sp": sp, "seq_len": T, "peak_bytes": peak})
                say(f"{sp:>3} {T:>8} {peak / 2**20:>9.2f} {peak / T / 1024:>14.2f}")
            maxlen[str(sp)] = max_seq_len(sub, a, budget)
        idle(world)
    say(f"\n# longest trainable sequence within {budget / 2**20:.1f} MiB per rank (multiple of {a.unit})")
    say(f"{'sp':>3} {'max_seq_len':>12} {'vs_sp1':>7}")
    for sp in sps:
        if R == 0:
            say(f"{sp:>3} {maxlen[str(sp)]:>12} {maxlen[str(sp)] / max(maxlen['1'], 1):>7.2f}"
                if "1" in maxlen else f"{sp:>3} {maxlen[str(sp)]:>12}")
    if ring_lens and max(sps) > 1:
        say("\n# ring attention forward, per ring step (best of reps; max over ranks)")
        say(f"{'sp':>3} {'seq_len':>8} {'compute_ms':>11} {'comm_ms':>9} {'ring_ms':>9} {'ring/max':>9}")
    for sp in [s for s in sps if s > 1 and ring_lens]:
        sub = world.split(0 if R < sp else None)
        if sub is not None:
            for T in ring_lens:
                c, m, g = ring_timing(sub, T, a, a.reps)
                steps.append({"sp": sp, "seq_len": T, "compute_ms": c, "comm_ms": m, "ring_ms": g,
                              "ratio": g / max(c, m)})
                say(f"{sp:>3} {T:>8} {c:>11.3f} {m:>9.3f} {g:>9.3f} {g / max(c, m):>9.2f}")
        idle(world)
    if R == 0:
        meta = {"mode": a.mode, "budget_bytes": budget, "ranks": world.size, "n_layer": a.n_layer,
                "n_embd": a.n_embd, "n_head": a.n_head, "batch": a.batch, "dtype": "float32"}
        if a.json:
            atomic_write_json(a.json, {"meta": meta, "rows": rows, "max_seq_len": maxlen, "ring_steps": steps})
        if a.plot:
            plot(a.plot, rows, budget, maxlen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
