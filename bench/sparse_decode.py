"""Unbatched decoding time per token, dense against the sparse layers of "Sparse is Enough in
Scaling Transformers" (Jaszczur et al., NeurIPS 2021, arXiv 2111.12763, Table 1), in one launch.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.sparse_decode [--json FILE]
    python -m bench.sparse_decode --shapes small --tokens 32     # the small shape only
    python -m bench.sparse_decode --device gpu                   # on CuPy (synchronized per token)
    python -m bench.sparse_decode --threads 1,2                  # one child process per thread count

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

The four variants of a shape are held at once and decode in turn, one token each, then the
machine's memory bandwidth is measured, so load from other processes hits every variant and the
bandwidth measurement alike. Two kernels, three figures: a STREAM triad a = b + s c (McCalpin
1995; three float32 arrays of --triad-mib MiB, counted as 3 n itemsize bytes), on the pool's
threads and, with several threads, on this thread alone; and a read, y = M v over b and c as
matrices 1024 wide by the BLAS (counted as 2 n itemsize bytes), which streams memory the way a
decoded token does: read-only, through the BLAS's own threads. The bandwidth ("bw") is the best
of the three medians: with a multi-threaded BLAS the triad alone understates it (OpenBLAS's
worker spins on the other core after each call, and the pooled triad then measured 12.3 GB/s
against the dense decode's 21.4 at 2 threads), and a decode read-bound at that best figure is at
the limit. Bytes/token counts the weights a token must
read: every parameter once (the tied wte as the output layer, plus its one embedding row; one
row of wpe), except that a sparse FFN reads its controller and d_ff/N rows of W1 and of W2
(SparseFFN.decode_read_elements). GB/s = bytes/token / s/token; "of bw" = GB/s over the
bandwidth. Threads: ENGINE_THREADS / OPENBLAS_NUM_THREADS (engine/threads.py) for BLAS, the
sparse FFN's gathers and the triad; --threads N,M runs one child process per count.

Python's share: the sparse layers read so few bytes that a token's few dozen small calls per
layer show. Decoding's one-query attention (models/generate.py one_query_attention, 13 us
against the blockwise kernel's 30 us at 16 heads, 20 keys, hot in cache), LayerNorm's mean
vector built once and math.prod for a row count moved, paper shape, 1 thread, three launches
in alternation: sparse FFN 1.96x / 1.96x / 1.99x -> 2.02x / 2.02x / 2.04x, both layers 2.77x /
2.82x / 2.97x -> 3.03x / 3.05x / 3.05x (launch to launch the ratios move by about 3%).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench import blas_core, use_device
from engine import backend
from engine.autograd import no_grad
from engine.io import atomic_write_json
from engine.threads import parts, run_ranges, threads
from models.generate import KVCache, next_logits
from models.gpt import GPT, GPTConfig
from models.sparse_ffn import SparseFFN

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


def weight_bytes_per_token(model):
    """Bytes of weights one decoded token reads (see the module docstring)."""
    t = model.transformer
    n = sum(p.size for p in model.parameters()) - t.wpe.weight.size + t.wpe.weight.shape[1]   # one wpe row
    n += t.wte.weight.shape[1]                                         # wte: the output layer and one row
    for _, m in model.named_modules():
        if isinstance(m, SparseFFN):
            n += m.decode_read_elements() - sum(p.size for p in m.parameters())
    return n * t.wte.weight.dtype.itemsize


class Triad:
    """STREAM triad a = b + s c over three float32 arrays of ``mib`` MiB: on the CPU in cache-sized
    chunks (s c then + b on a chunk that stays in cache, so memory sees STREAM's three streams),
    pooled: the arrays cut into threads() contiguous parts, one pool task each walking its part
    chunk by chunk (a task per chunk would time the pool's overhead, not the memory: 11.6 GB/s
    against the dense decode's 22.5 at 2 threads); on a device in chunks of 4 Mi elements. One
    call: GB/s. ``read()``: GB/s of y = M v over b and c (the BLAS, read-only streams)."""

    def __init__(self, mib):
        xp = backend.xp()
        self.n = mib * (1 << 20) // 4
        self.a, self.b, self.c = (xp.full(self.n, v, dtype=xp.float32) for v in (0.0, 1.0, 2.0))
        k = self.n // 1024 * 1024
        self.rows = [m[:k].reshape(-1, 1024) for m in (self.b, self.c)]   # the read's matrices, 1024 wide
        self.v = xp.ones(1024, dtype=xp.float32)
        self.xp = xp

    def _part(self, i, j):
        a = self.a[i:j]
        self.xp.multiply(self.c[i:j], 3.0, out=a)
        a += self.b[i:j]

    def _walk(self, i, j, step=1 << 16):
        for k in range(i, j, step):
            self._part(k, min(k + step, j))

    def __call__(self, pooled=True):
        backend.synchronize()
        t0 = time.perf_counter()
        if self.xp is np and pooled:
            run_ranges(self._walk, parts(self.n, threads()))          # one task per thread
        elif self.xp is np:
            self._walk(0, self.n)                                     # this thread only
        else:
            for i in range(0, self.n, 1 << 22):
                self._part(i, min(i + (1 << 22), self.n))
        backend.synchronize()
        return 3 * self.n * 4 / (time.perf_counter() - t0) / 1e9

    def read(self):
        backend.synchronize()
        t0 = time.perf_counter()
        for m in self.rows:
            m @ self.v
        backend.synchronize()
        return sum(m.nbytes for m in self.rows) / (time.perf_counter() - t0) / 1e9


def decode_one(model, state):
    """Decode one greedy token with ``state`` = (caches, logits); seconds (device synchronized)."""
    caches, logits = state
    tok = logits.argmax(axis=1)[:, None]                               # (1, 1) greedy
    backend.synchronize()                                              # no-op on the CPU
    t0 = time.perf_counter()
    logits = next_logits(model, tok, caches)                           # host logits: the device waited
    backend.synchronize()
    state[1] = logits
    return time.perf_counter() - t0


def run(shapes, prompt_len, warmup, tokens, seed=0, triad_mib=64):
    rows = []
    triad = Triad(triad_mib)
    core = blas_core() if backend.device() == "cpu" else "-"
    for shape in shapes:
        block = prompt_len + warmup + tokens
        prompt = np.random.default_rng(seed).integers(0, SHAPES[shape]["vocab_size"], prompt_len)[None]   # (1, T0)
        models, states, times, bws = {}, {}, {v: [] for v in VARIANTS}, []
        load0 = os.getloadavg()[0]
        with no_grad():
            for v in VARIANTS:
                models[v] = build(shape, v, block, seed)
                caches = [KVCache(block) for _ in models[v].blocks]
                states[v] = [caches, next_logits(models[v], prompt, caches)]   # prefill, untimed
                print(f"  built and prefilled {shape}/{v}", file=sys.stderr, flush=True)
            for i in range(warmup + tokens):                           # round robin: one token each, then bandwidth
                for v in VARIANTS:
                    sec = decode_one(models[v], states[v])
                    if i >= warmup:
                        times[v].append(sec)
                bw = (triad(True), triad(False) if threads() > 1 else 0.0, triad.read())   # pooled, one thread, read
                if i >= warmup:
                    bws.append(bw)
        load = (load0 + os.getloadavg()[0]) / 2
        tri = max(statistics.median(b[0] for b in bws), statistics.median(b[1] for b in bws))
        read = statistics.median(b[2] for b in bws)
        bw = max(tri, read)
        dense = statistics.median(times["dense"])
        for v in VARIANTS:
            s = statistics.median(times[v])
            nbytes = weight_bytes_per_token(models[v])
            rows.append(dict(shape=shape, variant=v, device=backend.device(), threads=threads(),
                             s_per_token=s, speedup=dense / s, params=models[v].num_params(),
                             bytes_per_token=nbytes, gb_per_s=nbytes / s / 1e9, triad_gb_per_s=tri,
                             read_gb_per_s=read, bw_gb_per_s=bw,
                             bw_fraction=nbytes / s / 1e9 / bw, load=load,
                             paper_s_per_token=PAPER[v], paper_speedup=PAPER["dense"] / PAPER[v],
                             blas_core=core))
            print(f"  {shape}/{v}: {s * 1e3:.2f} ms/token", file=sys.stderr, flush=True)
        models.clear()
        states.clear()
    return rows


def table(rows):
    head = (f"{'shape':<6} {'thr':>3} {'variant':<11} {'params':>12} {'MB/token':>9} {'s/token':>9} {'speed-up':>9} "
            f"{'GB/s':>6} {'triad':>6} {'read':>6} {'of bw':>6} {'load':>5} | {'paper s/token':>13} {'paper speed-up':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shape']:<6} {r['threads']:>3} {r['variant']:<11} {r['params']:>12,} "
                     f"{r['bytes_per_token'] / 1e6:>9.1f} {r['s_per_token']:>9.4f} {r['speedup']:>8.2f}x "
                     f"{r['gb_per_s']:>6.2f} {r['triad_gb_per_s']:>6.2f} {r['read_gb_per_s']:>6.2f} {r['bw_fraction']:>6.0%} "
                     f"{r['load']:>5.1f} | "
                     f"{r['paper_s_per_token']:>13.3f} {r['paper_speedup']:>13.2f}x")
    return "\n".join(lines)


def run_threads(counts, argv):
    """One child process per thread count (BLAS reads its thread count at start-up): their rows."""
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as tmp:
            js = os.path.join(tmp, "rows.json")
            env = dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n),
                       ENGINE_THREADS=str(n))
            subprocess.run([sys.executable, "-m", "bench.sparse_decode", *argv, "--json", js], env=env, check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), stdout=subprocess.DEVNULL)
            with open(js) as f:
                rows += json.load(f)
    return rows


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
    p.add_argument("--threads", default="", help="comma-separated thread counts, one child process each "
                   "(default: this process, threads from the environment)")
    p.add_argument("--triad-mib", type=int, default=64, help="MiB of each of the triad's three arrays (the read streams two)")
    args = p.parse_args(argv)
    shapes = decode_shapes(args)
    if shapes is None:
        return 2
    counts = [c for c in args.threads.split(",") if c]
    if not all(c.isdigit() and int(c) > 0 for c in counts) or args.triad_mib < 1:
        print("error: --threads takes positive integers (e.g. 1,2) and --triad-mib must be >= 1", file=sys.stderr)
        return 2
    if not use_device(args.device):                # no CuPy
        return 2
    if counts:
        child = ["--shapes", args.shapes, "--prompt", str(args.prompt), "--warmup", str(args.warmup), "--tokens",
                 str(args.tokens), "--device", args.device, "--triad-mib", str(args.triad_mib)]
        rows = run_threads([int(c) for c in counts], child)
    else:
        rows = run(shapes, args.prompt, args.warmup, args.tokens, triad_mib=args.triad_mib)
    where = "the device double" if backend.emulated() and args.device == "gpu" else args.device
    print(f"unbatched greedy decoding on {where}, float32, KV cache (OpenBLAS kernels {rows[0]['blas_core']}); "
          f"paper: Jaszczur et al. 2021 Table 1 (800M model)")
    print("MB/token: weights read per token; GB/s = MB/token / s/token; triad: STREAM triad GB/s, read: y = M v "
          "GB/s, same launch, interleaved; of bw: GB/s over the better of the two; load: 1-min load average")
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
