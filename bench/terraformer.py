"""The Terraformer's claims (Jaszczur et al. 2021, section 5; Kitaev et al. 2020), each against
its baseline in the same launch:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.terraformer [--json FILE] [--plot FILE.png]
    python -m bench.terraformer --parts memory,seq --max-seq 4096      # a subset

  memory   activation peak bytes of one training step (forward + backward; tracemalloc, the
           parameters and their gradients already allocated, so only what the step adds) at
           depth 2, 4, 8, 12: the dense GPT against the reversible model (engine/reversible.py,
           the same blocks, copied streams); step seconds at each depth (median of 5, untraced,
           the two models' steps alternating; wall and CPU time of this process).
           Shape: n_embd 128, 4 heads, T 256, batch 4, byte vocabulary, float32.
  seq      the same peak against sequence length 512 .. --max-seq (step times: median of 2):
           full attention (the engine's blockwise kernel, memory linear in T) against LSH
           attention (chunk 64, n_buckets = T / 64, 2 rounds) and LSH + reversible; the longest length within --mem-budget (default: full attention's
           peak at 1024). Shape: n_embd 64, 2 heads, 2 layers, batch 1.
  decode   unbatched decoding s/token at bench.sparse_decode's paper shape (d 1024, 24 layers,
           vocab 32000, FFN sparsity 64, 16 QKV modules): dense, the Scaling Transformer (sparse
           FFN + QKV) and + the sparse loss layer (S = 4), each thread count in its own child
           process (the BLAS reads its thread count at start); the three models are held at
           once and decode one token each in turn (median of --tokens per variant).
  quality  val loss after the same steps on the same batches (bench/train_step.py's nanoGPT CPU
           config: 4 layers, C 128, block 64, batch 12) for dense, Scaling Transformer (FFN
           sparsity 32, 4 QKV modules) and Terraformer (+ reversible, LSH chunk 16 x 4 buckets x
           2 rounds, loss sparsity 4), char-level, on --data files ('' = the built-in corpus).

JSON rows: {"part", "model", "n_layer", "seq_len", "peak_bytes", ...}. Goals (the issue):
reversible peak at 12 layers <= 1.3x its peak at 2 (dense: about 6x) and step time <= 1.4x
dense's; LSH's longest sequence in the budget >= 4x full attention's; decoding with the sparse
loss >= 1.3x faster than without at the paper shape; Terraformer val loss within 3% of dense.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from engine.autograd import no_grad
from engine.data import Batcher, DataError, load_dataset
from engine.io import atomic_write_json
from engine.optim import cosine_lr
from models.generate import KVCache, next_logits
from models.gpt import GPTConfig
from models.terraformer import build_model

from . import sparse_decode
from .train_step import MODEL, TRAIN, EngineTrainer

PARTS = ("memory", "seq", "decode", "quality")
DATA = "/work/shared/data/tinyshakespeare.txt"


# -- activation memory -----------------------------------------------------------------------
def step_peak(model, x, y):
    """Peak bytes one forward + backward adds (the parameters' gradients allocated before)."""
    model.train()
    model(x, y)[1].backward()                                   # gradients allocated
    model.zero_grad()
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    model(x, y)[1].backward()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    model.zero_grad()
    return peak


def step_times(models, x, y, repeat):
    """Median (wall, CPU) seconds of forward + backward per model, the models' steps alternating
    so that load from other processes hits each alike."""
    wall, cpu = [[] for _ in models], [[] for _ in models]
    for _ in range(repeat):
        for i, m in enumerate(models):
            t0, c0 = time.perf_counter(), time.process_time()
            m(x, y)[1].backward()
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
            m.zero_grad()
    return [(statistics.median(w), statistics.median(c)) for w, c in zip(wall, cpu)]


def measure(variants, base, batch, repeat, part, seed=0):
    """One row per (name, extra config) of ``variants``: peak bytes and alternating step times."""
    models = [build_model(GPTConfig(**base, **extra), rng=seed) for _, extra in variants]
    cfg = models[0].config
    x = np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, cfg.block_size))
    y = np.roll(x, -1, axis=1)
    peaks = [step_peak(m, x, y) for m in models]
    times = step_times(models, x, y, repeat)
    rows = []
    for (name, _), m, peak, (w, c) in zip(variants, models, peaks, times):
        rows.append(dict(part=part, model=name, n_layer=cfg.n_layer, seq_len=cfg.block_size, peak_bytes=int(peak),
                         s_per_step=w, cpu_s_per_step=c, params=m.num_params()))
        print(f"  {part} {name} L={cfg.n_layer} T={cfg.block_size}: {peak / 2**20:.1f} MiB, {w:.3f} s "
              f"({c:.3f} s CPU)", file=sys.stderr, flush=True)
    del models
    gc.collect()
    return rows


def part_memory(depths=(2, 4, 8, 12), repeat=5):
    rows = []
    for L in depths:
        base = dict(block_size=256, vocab_size=256, n_layer=L, n_head=4, n_embd=128)
        rows += measure((("dense", {}), ("reversible", dict(reversible=True))), base, 4, repeat, "memory")
    return rows


def part_seq(max_seq, repeat=2):
    rows, T = [], 512
    while T <= max_seq:
        base = dict(block_size=T, vocab_size=256, n_layer=2, n_head=2, n_embd=64)
        lsh = dict(attention="lsh", lsh_chunk=64, lsh_buckets=T // 64, lsh_hashes=2)
        rows += measure((("full", {}), ("lsh", lsh), ("lsh+reversible", dict(lsh, reversible=True))), base, 1,
                        repeat, "seq")
        T *= 2
    return rows


def longest(rows, budget):
    """{model: the longest seq_len whose peak fits the budget (0: none)}."""
    out = {}
    for r in rows:
        fits = r["peak_bytes"] <= budget
        out[r["model"]] = max(out.get(r["model"], 0), r["seq_len"] if fits else 0)
    return out


# -- decoding ----------------------------------------------------------------------------------
DECODE = {"dense": {}, "scaling": dict(ffn="N", qkv="S"), "scaling+loss": dict(ffn="N", qkv="S", loss=4)}


def decode_rows(shape, tokens, warmup=2, prompt_len=8, seed=0):
    """This process's decode s/token for each variant (the BLAS threads are the environment's):
    the three models are held at once and decode in turn, one token each, so that load from
    other processes hits every variant alike; s/token is each one's median."""
    s = sparse_decode.SHAPES[shape]
    block = prompt_len + warmup + tokens
    prompt = np.random.default_rng(seed).integers(0, s["vocab_size"], prompt_len)[None]   # (1, T0)
    models, state = {}, {}
    for name, v in DECODE.items():
        cfg = GPTConfig(block_size=block, vocab_size=s["vocab_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                        n_embd=s["n_embd"], ffn_sparsity=s["N"] if "ffn" in v else 0,
                        qkv_modules=s["S"] if "qkv" in v else 0, loss_sparsity=v.get("loss", 0))
        models[name] = build_model(cfg, rng=seed).eval()
        caches = [KVCache(block) for _ in models[name].blocks]
        with no_grad():
            state[name] = (caches, next_logits(models[name], prompt, caches), [])   # prefill, untimed
    with no_grad():
        for i in range(warmup + tokens):
            for name, model in models.items():
                caches, logits, times = state[name]
                tok = logits.argmax(axis=1)[:, None]                   # (1, 1) greedy
                t0 = time.perf_counter()
                logits = next_logits(model, tok, caches)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
                state[name] = (caches, logits, times)
    rows, dense = [], None
    for name, model in models.items():
        sec = statistics.median(state[name][2])
        dense = sec if name == "dense" else dense
        rows.append(dict(part="decode", model=name, shape=shape, n_layer=s["n_layer"], seq_len=block,
                         s_per_token=sec, speedup_vs_dense=dense / sec, params=model.num_params()))
        print(f"  decode {shape}/{name}: {sec * 1e3:.1f} ms/token", file=sys.stderr, flush=True)
    return rows


def part_decode(shape, tokens, threads=(1, 2)):
    rows = []
    for n in threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        out = subprocess.run([sys.executable, "-m", "bench.terraformer", "--decode-child", shape, "--tokens",
                              str(tokens)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"decode child ({n} threads) failed: {out.stderr[-2000:]}")
        sys.stderr.write(out.stderr)
        rows += [dict(r, threads=n) for r in json.loads(out.stdout.strip().splitlines()[-1])]
    return rows


# -- quality -----------------------------------------------------------------------------------
QUALITY = {"dense": {}, "scaling": dict(ffn_sparsity=32, qkv_modules=4),
           "terraformer": dict(ffn_sparsity=32, qkv_modules=4, reversible=True, attention="lsh", lsh_chunk=16,
                               lsh_buckets=4, lsh_hashes=2, loss_sparsity=4)}


def part_quality(datas, iters, eval_batches):
    rows = []
    for path in datas:
        data = load_dataset(path or None, tokenizer="char", block_size=MODEL["block_size"])
        val = Batcher(data.val, TRAIN["batch_size"], MODEL["block_size"], seed=1)
        batches = [val.next() for _ in range(eval_batches)]
        dense = None
        for name, extra in QUALITY.items():
            eng = EngineTrainer(GPTConfig(vocab_size=data.vocab_size, **MODEL, **extra), seed=1337)
            train = Batcher(data.train, TRAIN["batch_size"], MODEL["block_size"], seed=0)
            t0 = time.perf_counter()
            for it in range(iters):
                eng.step(*train.next(), cosine_lr(it, TRAIN["lr"], TRAIN["warmup_iters"], iters, TRAIN["min_lr"]))
            sec = (time.perf_counter() - t0) / iters
            loss = eng.eval_loss(batches)
            dense = loss if name == "dense" else dense
            rows.append(dict(part="quality", model=name, data=data.source, n_layer=MODEL["n_layer"],
                             seq_len=MODEL["block_size"], iters=iters, val_loss=loss, ratio_vs_dense=loss / dense,
                             params=eng.model.num_params(), ms_per_iter=1e3 * sec))
            print(f"  quality {os.path.basename(path) or 'corpus'}/{name}: {loss:.4f} ({sec * iters:.0f} s)",
                  file=sys.stderr, flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------
def report(rows, budget):
    out, by = [], {}
    for r in rows:
        by.setdefault(r["part"], []).append(r)
    if "memory" in by:
        m = by["memory"]
        out.append("activation peak of one training step (tracemalloc), T 256, batch 4, C 128, float32")
        out.append(f"{'model':<12} {'layers':>6} {'peak MiB':>9} {'/ 2 layers':>10} {'s/step':>8} {'/ dense':>8} "
                   f"{'CPU s':>7} {'/ dense':>8}")
        first = {r["model"]: r["peak_bytes"] for r in m if r["n_layer"] == min(x["n_layer"] for x in m)}
        dense = {r["n_layer"]: r for r in m if r["model"] == "dense"}
        for r in m:
            d = dense[r["n_layer"]]
            out.append(f"{r['model']:<12} {r['n_layer']:>6} {r['peak_bytes'] / 2**20:>9.2f} "
                       f"{r['peak_bytes'] / first[r['model']]:>9.2f}x {r['s_per_step']:>8.3f} "
                       f"{r['s_per_step'] / d['s_per_step']:>7.2f}x {r['cpu_s_per_step']:>7.3f} "
                       f"{r['cpu_s_per_step'] / d['cpu_s_per_step']:>7.2f}x")
        out.append("")
    if "seq" in by:
        s = by["seq"]
        budget = budget or next((r["peak_bytes"] for r in s if r["model"] == "full" and r["seq_len"] == 1024), 0)
        fit = longest(s, budget)
        out.append("activation peak against sequence length, 2 layers, C 64, batch 1 (LSH: chunk 64, T/64 buckets, "
                   "2 rounds)")
        out.append(f"{'model':<15} {'T':>6} {'peak MiB':>9} {'/ full':>7} {'s/step':>8} {'/ full':>7}")
        full = {r["seq_len"]: r for r in s if r["model"] == "full"}
        for r in s:
            f = full.get(r["seq_len"])
            out.append(f"{r['model']:<15} {r['seq_len']:>6} {r['peak_bytes'] / 2**20:>9.2f} "
                       f"{r['peak_bytes'] / f['peak_bytes']:>6.2f}x {r['s_per_step']:>8.3f} "
                       f"{r['s_per_step'] / f['s_per_step']:>6.2f}x")
        out.append(f"longest T within {budget / 2**20:.2f} MiB: " + ", ".join(f"{k} {v}" for k, v in fit.items())
                   + (f" (lsh / full: {fit['lsh'] / fit['full']:.1f}x)" if fit.get("full") else ""))
        out.append("")
    if "decode" in by:
        out.append(f"unbatched greedy decoding s/token, KV cache, float32, {by['decode'][0]['shape']} shape "
                   "(bench.sparse_decode)")
        out.append(f"{'model':<13} {'threads':>7} {'params':>12} {'s/token':>9} {'/ dense':>8} {'/ scaling':>9}")
        sc = {r["threads"]: r["s_per_token"] for r in by["decode"] if r["model"] == "scaling"}
        for r in by["decode"]:
            out.append(f"{r['model']:<13} {r['threads']:>7} {r['params']:>12,} {r['s_per_token']:>9.4f} "
                       f"{r['speedup_vs_dense']:>7.2f}x {sc[r['threads']] / r['s_per_token']:>8.2f}x")
        out.append("")
    if "quality" in by:
        out.append("val loss after the same training (char level), ratio to dense")
        out.append(f"{'data':<22} {'model':<12} {'params':>8} {'iters':>6} {'val loss':>9} {'/ dense':>8} "
                   f"{'ms/iter':>8}")
        for r in by["quality"]:
            out.append(f"{os.path.basename(r['data'])[:22]:<22} {r['model']:<12} {r['params']:>8,} {r['iters']:>6} "
                       f"{r['val_loss']:>9.4f} {r['ratio_vs_dense']:>8.4f} {r['ms_per_iter']:>8.1f}")
    return "\n".join(out)


def plot(path, rows):
    import matplotlib                                           # lazily: only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, part, key in ((axes[0], "memory", "n_layer"), (axes[1], "seq", "seq_len")):
        ax.set_title(f"activation peak against {key}" if any(r["part"] == part for r in rows) else f"({part}: not run)")
        for name in dict.fromkeys(r["model"] for r in rows if r["part"] == part):
            pts = [(r[key], r["peak_bytes"] / 2**20) for r in rows if r["part"] == part and r["model"] == name]
            ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xlabel(key)
        ax.set_ylabel("activation peak (MiB)")
        if ax.lines:
            ax.legend()
    axes[1].set_xscale("log", base=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated from {', '.join(PARTS)}")
    p.add_argument("--max-seq", type=int, default=8192, help="longest sequence of the seq part (from 512, doubling)")
    p.add_argument("--mem-budget", type=float, default=0, help="bytes (0: full attention's peak at T 1024)")
    p.add_argument("--decode-shape", default="paper", choices=tuple(sparse_decode.SHAPES))
    p.add_argument("--tokens", type=int, default=8, help="decoded tokens timed per variant (median)")
    p.add_argument("--data", default=f"{DATA},", help="comma-separated text files for quality ('' = built-in corpus)")
    p.add_argument("--iters", type=int, default=300, help="training steps per quality variant")
    p.add_argument("--eval-batches", type=int, default=20)
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--plot", metavar="FILE.png")
    p.add_argument("--decode-child", metavar="SHAPE", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.decode_child:                                          # one thread count's decode rows, as JSON
        print(json.dumps(decode_rows(a.decode_child, a.tokens)))
        return 0
    parts = [x for x in a.parts.split(",") if x]
    if not parts or any(x not in PARTS for x in parts) or a.max_seq < 512 or a.tokens < 1 or a.iters < 1:
        print(f"error: --parts from {', '.join(PARTS)}; --max-seq >= 512; --tokens, --iters >= 1", file=sys.stderr)
        return 2
    rows = []
    try:
        if "memory" in parts:
            rows += part_memory()
        if "seq" in parts:
            rows += part_seq(a.max_seq)
        if "decode" in parts:
            rows += part_decode(a.decode_shape, a.tokens)
        if "quality" in parts:
            rows += part_quality(a.data.split(","), a.iters, a.eval_batches)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report(rows, a.mem_budget))
    if a.json:
        atomic_write_json(a.json, rows)
    if a.plot:
        plot(a.plot, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
