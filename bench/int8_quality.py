"""Quality of int8 weight-only decoding (models/quantized.py) against float32 on trained models.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.int8_quality --data tinyshakespeare.txt [--json FILE]
    python -m bench.int8_quality --ckpt out                        # reuse a train.py checkpoint (dense)

Each variant (``dense``: train.py's GPT at n_layer 4, n_embd 128, block 128, SHAPE below; ``both``: the
same with the sparse FFN, N 32, and sparse QKV, S 4) is trained by train.py itself (one process,
``--steps`` steps, char-level for a text file), unless ``--ckpt`` gives a checkpoint to reuse. The
float32 model and the same checkpoint quantized at load to int8 are then compared on:

  teacher-forced  ``--windows`` validation windows of block_size tokens (seed 1): at every position,
                  whether int8's argmax (its greedy next token) equals float32's, and the mean
                  cross-entropy of each; perplexity = exp(loss), ratio int8 / float32
  free-running    from ``--prompts`` prompts (16 validation tokens each), ``--new`` greedy tokens
                  decoded with the KV cache by each model: the fraction of generated positions
                  where both chose the same token (after a first difference the contexts differ,
                  so this also counts the divergence it causes) and the first such position

Goal (issue 17): the tokens equal on >= 95% of positions, perplexity within 1%.
"""
import argparse
import math
import os
import subprocess
import sys
import tempfile

import numpy as np

from engine.autograd import no_grad
from engine.data import Batcher, DataError, load_dataset
from engine.io import CheckpointError
from models.gpt import GPT, GPTConfig
from models.quantized import quantize_gpt

from . import report

VARIANTS = {"dense": [], "both": ["--ffn-sparsity", "32", "--qkv-modules", "4"]}
SHAPE = ["--n-layer", "4", "--n-embd", "128", "--block-size", "128"]   # fixed: not train.py's first-run defaults
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(out_dir, data, steps, extra):
    """train.py on one process into out_dir; returns out_dir."""
    cmd = [sys.executable, "train.py", "--data", data, "--max-steps", str(steps), "--out-dir", out_dir,
           "--ckpt-interval", "0", "--eval-interval", "0", "--log-interval", str(max(1, steps // 4)), *SHAPE, *extra]
    if data and not data.endswith(".bin"):
        cmd += ["--tokenizer", "char"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print("".join(proc.stdout.splitlines(keepends=True)[-3:]), end="", file=sys.stderr, flush=True)
    if proc.returncode:
        raise DataError(f"train.py exited {proc.returncode}: {' '.join(proc.stderr.split()[-40:])}")
    return out_dir


def load_models(ckpt):
    """(float32 model, int8 model, manifest) of a checkpoint, both from the same weights."""
    from sample import read_checkpoint
    path, manifest, params = read_checkpoint(ckpt)
    models = []
    for _ in range(2):
        m = GPT(GPTConfig(**manifest["config"]["model"]), rng=0)
        m.load_state_dict(params)
        models.append(m.eval())
    return models[0], quantize_gpt(models[1]), manifest


def teacher_forced(f32, q8, windows):
    """(fraction of positions with the same argmax, float32 loss, int8 loss) over (x, y) windows."""
    same = total = 0
    losses = {"f32": [], "int8": []}
    with no_grad():
        for x, y in windows:
            lf, loss_f = f32(x, y)
            lq, loss_q = q8(x, y)
            same += int((lf.data.argmax(-1) == lq.data.argmax(-1)).sum())
            total += x.size
            losses["f32"].append(float(loss_f.data))
            losses["int8"].append(float(loss_q.data))
    return same / total, float(np.mean(losses["f32"])), float(np.mean(losses["int8"]))


def free_running(f32, q8, prompts, new):
    """(fraction of generated positions with the same token, mean first differing position or new)."""
    a = f32.generate(prompts, new, temperature=0)[:, prompts.shape[1]:]        # (P, new)
    b = q8.generate(prompts, new, temperature=0)[:, prompts.shape[1]:]
    diff = a != b
    first = [int(np.argmax(d)) if d.any() else new for d in diff]
    return float((~diff).mean()), float(np.mean(first))


def evaluate(name, ckpt, windows_n, prompts_n, new):
    f32, q8, manifest = load_models(ckpt)
    train_cfg = manifest["config"]["train"]
    data = load_dataset(train_cfg["data"] or None, tokenizer=train_cfg["tokenizer"],
                        val_fraction=train_cfg["val_fraction"], block_size=f32.config.block_size)
    val = Batcher(data.val, 1, f32.config.block_size, seed=1)
    windows = [val.next() for _ in range(windows_n)]
    prompts = np.concatenate([val.next()[0][:, :16] for _ in range(prompts_n)])   # (P, 16)
    name = name or ("sparse" if f32.config.sparse else "dense")
    agree, loss_f, loss_q = teacher_forced(f32, q8, windows)
    same, first = free_running(f32, q8, prompts, new)
    return dict(variant=name, ckpt=ckpt, data=train_cfg["data"] or "default corpus", steps=manifest.get("step"),
                params=f32.num_params(),
                argmax_agreement=agree, greedy_agreement=same, first_difference=first,
                val_loss_f32=loss_f, val_loss_int8=loss_q, ppl_f32=math.exp(loss_f), ppl_int8=math.exp(loss_q),
                ppl_ratio=math.exp(loss_q - loss_f), positions=windows_n * f32.config.block_size,
                generated=prompts_n * new)


HEAD = (f"{'variant':<7} {'steps':>5} {'ppl f32':>8} {'ppl int8':>8} {'ratio':>7} "
        f"{'argmax same':>11} {'greedy same':>11} {'1st diff':>8}")


def line(r):
    return (f"{r['variant']:<7} {r['steps']:>5} {r['ppl_f32']:>8.4f} {r['ppl_int8']:>8.4f} "
            f"{r['ppl_ratio']:>7.4f} {100 * r['argmax_agreement']:>10.2f}% "
            f"{100 * r['greedy_agreement']:>10.2f}% {r['first_difference']:>8.1f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="", help="training text ('' = train.py's default corpus)")
    p.add_argument("--steps", type=int, default=300, help="train.py steps per variant (default 300)")
    p.add_argument("--variants", default="dense,both", help=f"comma-separated from {', '.join(VARIANTS)}")
    p.add_argument("--ckpt", default=None, help="reuse this checkpoint instead of training (one variant)")
    p.add_argument("--out-dir", default=None, help="train into OUT_DIR/<variant> and keep it (default: a temporary dir)")
    p.add_argument("--windows", type=int, default=20, help="validation windows, teacher-forced (default 20)")
    p.add_argument("--prompts", type=int, default=8, help="free-running prompts (default 8)")
    p.add_argument("--new", type=int, default=100, help="greedy tokens per prompt (default 100)")
    p.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    args = p.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    if not names or any(v not in VARIANTS for v in names) or min(args.steps, args.windows, args.prompts, args.new) < 1:
        print(f"error: --variants from {', '.join(VARIANTS)}; --steps, --windows, --prompts, --new >= 1",
              file=sys.stderr)
        return 2
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.out_dir or tmp
            todo = [(None, args.ckpt)] if args.ckpt else [
                (n, train(os.path.join(root, n), args.data, args.steps, VARIANTS[n])) for n in names]
            for name, ckpt in todo:
                rows.append(evaluate(name, ckpt, args.windows, args.prompts, args.new))
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report(f"int8 weight-only against float32, greedy; data: {rows[0]['data']}; {rows[0]['positions']} "
           f"teacher-forced positions, {rows[0]['generated']} generated tokens per variant",
           HEAD, [line(r) for r in rows], rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
