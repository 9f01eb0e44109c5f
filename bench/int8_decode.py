"""Unbatched decoding time per token with int8 weights (models/quantized.py, engine/int8.py) against
float32, dense and with both sparse layers of Jaszczur et al. 2021, at 1 and 2 BLAS threads.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.int8_decode [--json FILE]
    python -m bench.int8_decode --shapes small --threads 1 --tokens 16      # quick

Variants, at bench/sparse_decode.py's shapes (``paper``: d_model 1024, d_ff 4096, 24 layers,
vocab 32000, FFN sparsity 64, 16 QKV modules; 335M parameters dense), KV cache, batch 1, greedy:
  dense       float32 GPT-2 blocks
  int8        the same model with every matrix a token is multiplied by as per-channel int8
  both        float32, sparse FFN and sparse QKV
  both_int8   the sparse model in int8 (controller, gathered unit rows, E and the kernels)
The four models are held at once (each int8 one quantized from the float one of the same seed, so
with exactly its weights; 3.1 GB at the paper shape) and decode in turn, one token each per round,
so that load from other processes on a shared machine falls on all alike. s/token is the median
of ``--tokens`` timed steps after ``--warmup``; speed-up is dense float32's s/token over the
variant's, at the same thread count.
Weight bytes per token: the bytes of parameters one decoding step reads (every matrix in full,
except the embeddings' looked-up rows and a sparse FFN's d_ff/N chosen rows of W1 and W2; wte
in full, as it is also the output layer), int8 counting codes and scales; GB/s is bytes / s.

Each thread count runs in its own child process (BLAS reads its thread count when it loads)
with OMP_NUM_THREADS = OPENBLAS_NUM_THREADS = t; the dense baseline runs in that same child.
The int8 kernel's casts run on one thread; BLAS's threads share its GEMVs.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from engine.autograd import no_grad
from engine.int8 import Int8Weight
from engine.io import atomic_write_json
from engine.nn import Embedding, Parameter
from models.generate import KVCache, next_logits
from models.quantized import Int8SparseFFN, quantize_gpt
from models.sparse_ffn import SparseFFN

from . import report
from .sparse_decode import SHAPES, add_decode_args, build, decode_shapes

VARIANTS = (("dense", "dense", False), ("int8", "dense", True), ("both", "both", False), ("both_int8", "both", True))


def weight_bytes_per_token(model):
    """Bytes of parameters (and int8 codes + scales) one decoding step reads."""
    total = 0
    for name, m in model.named_modules():
        own = [(k, v) for k, v in vars(m).items() if isinstance(v, (Parameter, Int8Weight))]
        for k, v in own:
            size = v.nbytes if isinstance(v, Int8Weight) else v.data.nbytes
            if isinstance(m, (SparseFFN, Int8SparseFFN)) and k in ("w1", "w2"):
                size = size // v.shape[0] * (v.shape[0] // m.N)          # d_ff/N of its d_ff rows
            elif isinstance(m, Embedding) and name != "transformer.wte":
                size //= v.shape[0]                                  # one row of wpe
            total += size
    return int(total)


def time_interleaved(models, prompt, warmup, tokens):
    """Seconds of each timed decode step of each model, the models taking turns token by token
    (the first to go rotates), so a load that comes and goes on a shared machine weighs on every
    variant alike. Prefill and warm-up untimed; greedy."""
    caches = [[KVCache(m.config.block_size) for _ in m.blocks] for m in models]
    times = [[] for _ in models]
    with no_grad():
        logits = [next_logits(m, np.asarray(prompt)[None], c) for m, c in zip(models, caches)]   # (1, V) each
        for i in range(warmup + tokens):
            for k in range(len(models)):
                j = (i + k) % len(models)
                tok = logits[j].argmax(axis=1)[:, None]                    # (1, 1)
                t0 = time.perf_counter()
                logits[j] = next_logits(models[j], tok, caches[j])
                if i >= warmup:
                    times[j].append(time.perf_counter() - t0)
    return times


def run_variants(shape, prompt_len, warmup, tokens, seed=0):
    """Rows for the four variants at this process's thread count: all four models are held
    (float32 and int8 from the same seed, so int8 has exactly the float weights) and timed in turn."""
    block = prompt_len + warmup + tokens
    prompt = np.random.default_rng(seed).integers(0, SHAPES[shape]["vocab_size"], prompt_len)
    models = []
    for name, base, int8 in VARIANTS:
        model = build(shape, base, block, seed)
        models.append(quantize_gpt(model) if int8 else model)
        gc.collect()
        print(f"  built {shape}/{name}", file=sys.stderr, flush=True)
    times = [statistics.median(t) for t in time_interleaved(models, prompt, warmup, tokens)]
    rows = []
    for (name, _, _), model, s in zip(VARIANTS, models, times):
        nbytes = weight_bytes_per_token(model)
        rows.append(dict(shape=shape, variant=name, s_per_token=s, weight_bytes_per_token=nbytes,
                         gb_per_s=nbytes / s / 1e9, speedup=times[0] / s))
    for r in rows:
        r["bytes_ratio"] = rows[0]["weight_bytes_per_token"] / r["weight_bytes_per_token"]
    return rows


def child(threads, shape, prompt, warmup, tokens):
    """Run the variants in a fresh process with ``threads`` BLAS threads; its rows."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rows.json")
        cmd = [sys.executable, "-m", "bench.int8_decode", "--child", "--shapes", shape, "--prompt", str(prompt),
               "--warmup", str(warmup), "--tokens", str(tokens), "--json", out]
        subprocess.run(cmd, env=env, check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        with open(out) as f:
            rows = json.load(f)
    for r in rows:
        r["threads"] = threads
    return rows


HEAD = (f"{'shape':<6} {'threads':>7} {'variant':<10} {'s/token':>9} {'speed-up':>9} "
        f"{'weight MB/token':>15} {'bytes / dense':>13} {'GB/s':>6}")


def line(r):
    return (f"{r['shape']:<6} {r['threads']:>7} {r['variant']:<10} {r['s_per_token']:>9.4f} "
            f"{r['speedup']:>8.2f}x {r['weight_bytes_per_token'] / 1e6:>15.1f} "
            f"{1 / r['bytes_ratio']:>13.3f} {r['gb_per_s']:>6.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(p, "paper")
    p.add_argument("--threads", default="1,2", help="comma-separated BLAS thread counts, one child process each")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = decode_shapes(args)
    if shapes is None:
        return 2
    try:
        threads = [int(t) for t in args.threads.split(",") if t]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        print(f"error: --threads must be positive integers, got {args.threads!r}", file=sys.stderr)
        return 2
    if args.child:
        atomic_write_json(args.json, [r for s in shapes for r in run_variants(s, args.prompt, args.warmup, args.tokens)])
        return 0
    rows = [r for s in shapes for t in threads for r in child(t, s, args.prompt, args.warmup, args.tokens)]
    report("unbatched greedy decoding, KV cache: float32 against per-channel int8 weights; speed-up over dense "
           "float32 at the same thread count", HEAD, [line(r) for r in rows], rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
