"""Quality of the sparse layers of "Sparse is Enough in Scaling Transformers" (Jaszczur et al.,
NeurIPS 2021, arXiv 2111.12763): the paper claims the same perplexity as the dense model. Here:
a dense GPT, the same shape with the sparse FFN, and with both the sparse FFN and sparse QKV,
trained for the same steps on the same batches, and each validation loss with its ratio to dense.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.sparse_quality --data tinyshakespeare.txt [--iters N] [--json FILE]

The model and optimiser are bench/train_step.py's (nanoGPT's CPU config: char-level, n_layer 4,
n_head 4, n_embd 128, block 64, batch 12, AdamW lr 1e-3 with 100 warm-up steps and cosine decay
to 1e-4 over --iters, grad clip 1). Sparse settings: the paper's code defaults (FFN sparsity
N 32, controller rank 64, temperature 0.1, hard-mask probability 0.3) and S = 4 QKV modules
(= n_head, Trax's default). All variants see the same training batches (seed 0) and are scored
on the same --eval-batches validation batches (seed 1), in evaluation mode (the sparse FFN's
hard argmax mask, as in decoding). Goal: sparse within 2% of dense.
"""
import argparse
import sys
import time

from engine.data import Batcher, DataError, load_dataset
from engine.io import atomic_write_json
from engine.optim import cosine_lr
from models.gpt import GPTConfig

from .train_step import MODEL, TRAIN, EngineTrainer

VARIANTS = {"dense": {}, "sparse_ff": dict(ffn_sparsity=32), "both": dict(ffn_sparsity=32, qkv_modules=4),
            "sparse_qkv": dict(qkv_modules=4)}
DEFAULT = "dense,sparse_ff,both"


def train_one(cfg, data, iters, eval_batches, seed=1337):
    eng = EngineTrainer(cfg, seed=seed)
    batcher = Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0)
    t0 = time.perf_counter()
    for it in range(iters):
        eng.step(*batcher.next(), cosine_lr(it, TRAIN["lr"], TRAIN["warmup_iters"], iters, TRAIN["min_lr"]))
    seconds = time.perf_counter() - t0
    return eng.eval_loss(eval_batches), seconds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="UTF-8 text file, char-level ('' = the built-in corpus)")
    p.add_argument("--iters", type=int, default=600, help="training steps per variant (default 600)")
    p.add_argument("--eval-batches", type=int, default=40, help="validation batches of 12 x 64 (default 40)")
    p.add_argument("--variants", default=DEFAULT, help=f"comma-separated from {', '.join(VARIANTS)} "
                                                        f"(default {DEFAULT}; dense first gives the ratios)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    if not names or any(v not in VARIANTS for v in names) or args.iters < 1 or args.eval_batches < 1:
        print(f"error: --variants from {', '.join(VARIANTS)}; --iters and --eval-batches >= 1", file=sys.stderr)
        return 2
    try:
        data = load_dataset(args.data or None, tokenizer="char", block_size=MODEL["block_size"])
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    val = Batcher(data.val, TRAIN["batch_size"], MODEL["block_size"], seed=1)
    eval_batches = [val.next() for _ in range(args.eval_batches)]
    rows, dense = [], None
    for name in names:
        cfg = GPTConfig(vocab_size=data.vocab_size, **MODEL, **VARIANTS[name])
        loss, seconds = train_one(cfg, data, args.iters, eval_batches)
        dense = loss if name == "dense" else dense
        rows.append(dict(variant=name, val_loss=loss, ratio=None if dense is None else loss / dense,
                         iters=args.iters, tokens=args.iters * TRAIN["batch_size"] * MODEL["block_size"],
                         ms_per_iter=1e3 * seconds / args.iters, **VARIANTS[name]))
        print(f"  trained {name}: val loss {loss:.4f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print(f"char-level {data.source}, {args.iters} iterations x {TRAIN['batch_size']} x {MODEL['block_size']} "
          f"tokens, val loss on {args.eval_batches} batches")
    head = f"{'variant':<10} {'val loss':>9} {'/ dense':>8} {'ms/iter':>8}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.4f}"
        print(f"{r['variant']:<10} {r['val_loss']:>9.4f} {ratio:>8} {r['ms_per_iter']:>8.1f}")
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
