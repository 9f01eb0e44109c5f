"""Unbatched decoding time per token, dense against the sparse layers of "Sparse is Enough in
Scaling Transformers" (Jaszczur et al., NeurIPS 2021, arXiv 2111.12763, Table 1), in one launch.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.sparse_decode [--json FILE]
    python -m bench.sparse_decode --shapes small --tokens 32     # the small shape only
    python -m bench.sparse_decode --device gpu                   # on CuPy (synchronized per token)

Variants, each a GPT (models/gpt.py) with a KV cache, float32, batch 1:
  dense       GPT-2 blocks
  sparse_ff   the FFN with one unit of every N active (models/sparse_ffn.py): a token reads d_ff/N
              rows of W1 and of W2 instead of all d_ff
  sparse_qkv  q, k, v from the multiplicative layer and 3x3 / 3x1 convolutions over (length,
              modules) (models/sparse_qkv.py): d S + d M + 21 M^2 weights instead of 3 d^2
  both        the two together

Shapes: ``paper`` is the paper's medium model (d_model 1024, d_ff 4096, 16 heads, 24 layers,
vocab 32000, FFN sparsity 64, QKV modules 16; ~335M parameters here, 1.3 GB in float32; the
paper's "800M" counts its encoder-decoder); ``small`` is d_model 256, d_ff 1024, 4 heads,
4 layers, vocab 4096, N 32, S 8. One variant is built at a time, a prompt of ``--prompt``
tokens is prefilled, ``--warmup`` tokens are decoded untimed, then ``--tokens`` tokens are
timed one by one (greedy); s/token is the median, speed-up is dense's over the variant's.
The paper's figures (800M model, seconds per token; speed-ups 1.72x Sparse FF, 2.62x both)
are printed beside ours. Decoding one token is a chain of matrix-vector products, bound by
the bytes of weights read, so the speed-up follows the bytes each variant reads per token.
"""
import argparse
import gc
import statistics
import sys
import time

import numpy as np

from engine import backend
from engine.autograd import no_grad
from engine.io import atomic_write_json
from models.generate import KVCache, next_logits
from models.gpt import GPT, GPTConfig

PAPER = {"dense": 0.160, "sparse_ff": 0.093, "sparse_qkv": 0.152, "both": 0.061}   # Table 1, s/token
SHAPES = {
    "paper": dict(n_embd=1024, n_head=16, n_layer=24, vocab_size=32000, N=64, S=16),
    "small": dict(n_embd=256, n_head=4, n_layer=4, vocab_size=4096, N=32, S=8),
    "tiny": dict(n_embd=32, n_head=2, n_layer=2, vocab_size=64, N=8, S=4),     # smoke tests
}
VARIANTS = ("dense", "sparse_ff", "sparse_qkv", "both")


def build(shape, variant, block_size, seed=0):
    s = SHAPES[shape]
    ff = s["N"] if variant in ("sparse_ff", "both") else 0
    qkv = s["S"] if variant in ("sparse_qkv", "both") else 0
    cfg = GPTConfig(block_size=block_size, vocab_size=s["vocab_size"], n_layer=s["n_layer"], n_head=s["n_head"],
                    n_embd=s["n_embd"], ffn_sparsity=ff, qkv_modules=qkv)
    return GPT(cfg, rng=seed).eval()


def time_decode(model, prompt, warmup, tokens):
    """Seconds of each timed decode step (prefill and warm-up untimed)."""
    caches = [KVCache(model.config.block_size) for _ in model.blocks]
    idx = np.asarray(prompt)[None]                                     # (1, T0)
    times = []
    with no_grad():
        logits = next_logits(model, idx, caches)
        for i in range(warmup + tokens):
            tok = logits.argmax(axis=1)[:, None]                       # (1, 1) greedy
            backend.synchronize()                                      # no-op on the CPU
            t0 = time.perf_counter()
            logits = next_logits(model, tok, caches)                   # host logits: the device waited
            backend.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return times


def run(shapes, prompt_len, warmup, tokens, seed=0):
    rows = []
    for shape in shapes:
        block = prompt_len + warmup + tokens
        prompt = np.random.default_rng(seed).integers(0, SHAPES[shape]["vocab_size"], prompt_len)
        dense = None
        for variant in VARIANTS:
            model = build(shape, variant, block, seed)
            params = model.num_params()
            s = statistics.median(time_decode(model, prompt, warmup, tokens))
            del model
            gc.collect()                                               # one model in memory at a time
            dense = s if variant == "dense" else dense
            rows.append(dict(shape=shape, variant=variant, device=backend.device(), s_per_token=s,
                             speedup=dense / s, params=params,
                             paper_s_per_token=PAPER[variant], paper_speedup=PAPER["dense"] / PAPER[variant]))
            print(f"  built, timed and freed {shape}/{variant}: {s * 1e3:.2f} ms/token", file=sys.stderr, flush=True)
    return rows


def table(rows):
    head = (f"{'shape':<6} {'variant':<11} {'params':>12} {'s/token':>10} {'speed-up':>9} | "
            f"{'paper s/token':>13} {'paper speed-up':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<6} {r['variant']:<11} {r['params']:>12,} {r['s_per_token']:>10.4f} "
                     f"{r['speedup']:>8.2f}x | {r['paper_s_per_token']:>13.3f} {r['paper_speedup']:>13.2f}x")
    return "\n".join(lines)


def add_decode_args(p, shapes):
    """The decoding flags this benchmark and bench/int8_decode.py share: --shapes (default
    ``shapes``), --prompt, --warmup, --tokens, --json."""
    p.add_argument("--shapes", default=shapes, help="comma-separated: paper, small, tiny")
    p.add_argument("--prompt", type=int, default=8, help="prompt tokens (prefilled, untimed)")
    p.add_argument("--warmup", type=int, default=2, help="decoded tokens not timed")
    p.add_argument("--tokens", type=int, default=8, help="decoded tokens timed (median)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")


def decode_shapes(args):
    """The shapes of --shapes, or None after printing the one-line error of a bad flag."""
    shapes = [s for s in args.shapes.split(",") if s]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or not shapes:
        print(f"error: unknown shape {bad[0] if bad else '(none)'!r}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return None
    if min(args.prompt, args.tokens) < 1 or args.warmup < 0:
        print("error: --prompt and --tokens must be >= 1, --warmup >= 0", file=sys.stderr)
        return None
    return shapes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_decode_args(p, "paper,small")
    p.add_argument("--device", choices=("cpu", "gpu"), default=backend.default_device(),
                   help="cpu (NumPy) or gpu (CuPy); default: $ENGINE_DEVICE, else cpu")
    args = p.parse_args(argv)
    shapes = decode_shapes(args)
    if shapes is None:
        return 2
    try:
        backend.set_device(args.device)
    except RuntimeError as e:                      # no CuPy
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = run(shapes, args.prompt, args.warmup, args.tokens)
    where = "the device double" if backend.emulated() and args.device == "gpu" else args.device
    print(f"unbatched greedy decoding on {where}, float32, KV cache; paper: Jaszczur et al. 2021 Table 1 (800M model)")
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
