"""One GPT training step: this engine against PyTorch eager, in the same launch, on the CPU or a GPU.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.train_step [--json FILE] [--steps N] [--data PATH]
    python -m bench.train_step --device gpu [--model gpt2]  # CuPy against PyTorch CUDA eager
    python -m bench.train_step --train-iters 2000      # the engine alone: val loss after 2000 iterations
    python -m bench.train_step --profile 25            # cProfile of the engine's step, top 25 by own time

The configuration is nanoGPT's published CPU run ("I only have a macbook", nanoGPT README):
tinyshakespeare char-level, n_layer 4, n_head 4, n_embd 128, block 64, batch 12, dropout 0,
float32, AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, grad clip 1.0 (warm-up 100 and
cosine decay to 1e-4 over max_iters for --train-iters). On this machine nanoGPT ran it at
about 91 ms/step and reached val loss 1.886 after 2000 iterations.

One step, on both sides: forward with the loss, backward, global grad-norm clipping, AdamW,
zero the gradients. The PyTorch model is nanoGPT's (Linear layout, scaled_dot_product_attention,
non-fused AdamW as nanoGPT uses on the CPU) started from the engine's initial weights, with the
same decay groups and the same batches, so the first losses agree (printed as a check).
Both use the same thread count (torch.set_num_threads = the BLAS threads from the
environment). After the warm-up steps, timing alternates blocks of engine and torch steps,
so drift in machine load (other users) hits both; ms/step is the median over measured steps
(the CPU time of the process, user + system, is printed beside it: less sensitive to other
processes competing for the cores).

--device gpu runs the engine on CuPy (engine/backend.py; ENGINE_DEVICE=gpu-emulated makes it
the NumPy device double) and PyTorch on torch.device("cuda") with fused AdamW, as nanoGPT
configures it on CUDA; both sides synchronize their device before each clock read. Without
CUDA in torch (the emulated run) the PyTorch side stays on the CPU, and the output says so.
--model gpt2 is GPT-2 small's shape (n_layer 12, n_head 12, n_embd 768, block 1024, nanoGPT's
padded vocab 50304, batch 12) on uniform random tokens; --model tiny is a smoke-test shape.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

from engine import backend
from engine.autograd import no_grad
from engine.data import Batcher, DataError, Dataset, load_dataset
from engine.flat import FlatParameters
from engine.io import atomic_write_json
from engine.optim import AdamW, clip_grad_norm_, cosine_lr
from models.gpt import GPTConfig
from models.terraformer import build_model

DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"
MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
MODELS = {   # name -> (shape, vocab of random tokens: None = char-level --data)
    "baby": (MODEL, None),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0), 50304),
    "tiny": (dict(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0), 256),
}
TRAIN = dict(batch_size=12, lr=1e-3, min_lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0,
             warmup_iters=100, eval_interval=250, eval_iters=20)


def blas_threads():
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return os.cpu_count() or 1


class EngineTrainer:
    """The engine's step: parameters and gradients in one flat buffer, one AdamW over it."""

    def __init__(self, cfg, seed=1337):
        self.model = build_model(cfg, rng=seed)                 # a GPT, or a Terraformer (bench/terraformer.py)
        self.initial = {k: v.copy() for k, v in self.model.state_dict().items()}
        self.decay = {n for n, p in self.model.named_parameters() if p.decay}
        self.flat = FlatParameters(self.model.named_parameters())
        self.grads = self.flat.grad["float32"]
        self.opt = AdamW(self.flat.data["float32"], self.grads, self.flat.decay_mask["float32"],
                         lr=TRAIN["lr"], betas=TRAIN["betas"], weight_decay=TRAIN["weight_decay"])

    def step(self, x, y, lr):
        _, loss = self.model(x, y)
        loss.backward()
        clip_grad_norm_(self.grads, TRAIN["grad_clip"])
        self.opt.step(lr)
        self.flat.zero_grad()
        return loss.item()

    def synchronize(self):
        backend.synchronize()

    def eval_loss(self, batches):
        self.model.eval()
        with no_grad():
            losses = [self.model(x, y)[1].item() for x, y in batches]
        self.model.train()
        return float(np.mean(losses))


def torch_gpt(torch, cfg):
    """nanoGPT's model.py (flash path) in miniature: same names and layouts as models/gpt.py."""
    nn, F = torch.nn, torch.nn.functional
    C, nh, p = cfg.n_embd, cfg.n_head, cfg.dropout

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj, self.resid_dropout = nn.Linear(C, 3 * C), nn.Linear(C, C), nn.Dropout(p)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))   # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p if self.training else 0, is_causal=True)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), Attention(), nn.LayerNorm(C)
            self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))
            self.mlp_dropout = nn.Dropout(p)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            m = self.mlp
            return x + self.mlp_dropout(m.c_proj(F.gelu(m.c_fc(self.ln_2(x)), approximate="tanh")))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, C), wpe=nn.Embedding(cfg.block_size, C), drop=nn.Dropout(p),
                h=nn.ModuleList([Block() for _ in range(cfg.n_layer)]), ln_f=nn.LayerNorm(C)))
            self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx, targets):
            t = self.transformer
            x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device)))
            for block in t.h:
                x = block(x)
            logits = self.lm_head(t.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return TorchGPT()


class TorchTrainer:
    """nanoGPT's step on ``device`` ('cpu' or 'cuda'); fused AdamW on CUDA, as nanoGPT picks it."""

    def __init__(self, torch, cfg, initial, decay, device="cpu"):
        self.torch, self.device = torch, torch.device(device)
        self.model = torch_gpt(torch, cfg)
        self.model.load_state_dict({k: torch.from_numpy(backend.to_numpy(v)) for k, v in initial.items()},
                                   strict=False)
        self.model.to(self.device)
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": TRAIN["weight_decay"]},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(groups, lr=TRAIN["lr"], betas=TRAIN["betas"], **fused)

    def step(self, x, y, lr):
        torch = self.torch
        for g in self.opt.param_groups:
            g["lr"] = lr
        _, loss = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), TRAIN["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def load_data(path, block_size, vocab=None):
    """tinyshakespeare char-level by default; the built-in corpus (engine.data) if the file is absent;
    with ``vocab``, uniform random tokens (seed 0) enough for every batch this benchmark draws."""
    if vocab:
        tokens = np.random.default_rng(0).integers(0, vocab, size=256 * block_size, dtype=np.int64)
        return Dataset(tokens, tokens[: 8 * block_size], None, vocab, f"random tokens (vocab {vocab}, seed 0)")
    if path and os.path.exists(path):
        return load_dataset(path, tokenizer="char", block_size=block_size)
    print(f"note: {path} not found; using the built-in corpus (char-level)", file=sys.stderr)
    return load_dataset(None, tokenizer="char", block_size=block_size)


def draw(batcher, n):
    """n batches as contiguous (B, T) int64 arrays, as nanoGPT's get_batch makes them."""
    return [tuple(np.ascontiguousarray(a) for a in batcher.next()) for _ in range(n)]


def timed(trainer, batches, lr):
    """Per step: (wall seconds, CPU seconds of this process: user + system), the device synchronized
    before each clock read."""
    out = []
    for x, y in batches:
        trainer.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.step(x, y, lr)
        trainer.synchronize()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def compare(args, cfg, data):
    try:
        import torch
    except ImportError:
        print("error: the PyTorch baseline needs torch (pip install -e .[test]); "
              "--train-iters and --profile run without it", file=sys.stderr)
        raise SystemExit(2) from None
    threads = blas_threads()
    torch.set_num_threads(threads)
    torch_device, note = "cpu", ""
    if backend.device() == "gpu":
        if torch.cuda.is_available():
            torch_device = "cuda"
        else:
            note = " (note: torch has no CUDA here, so its side runs on the CPU)"
    batcher = Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0)
    batches = draw(batcher, args.warmup + args.steps)
    eng = EngineTrainer(cfg)
    ref = TorchTrainer(torch, cfg, eng.initial, eng.decay, torch_device)
    lr = TRAIN["lr"]
    first = (eng.step(*batches[0], lr), ref.step(*batches[0], lr))
    for b in batches[1:args.warmup]:                       # warm-up: caches, allocator, BLAS
        eng.step(*b, lr), ref.step(*b, lr)
    times = {"engine": [], "torch": []}
    todo = batches[args.warmup:]
    for r, i in enumerate(range(0, len(todo), args.block)):
        order = (("engine", eng), ("torch", ref)) if r % 2 == 0 else (("torch", ref), ("engine", eng))
        for name, trainer in order:
            times[name] += timed(trainer, todo[i:i + args.block], lr)
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    ms = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    mean = {k: 1e3 * statistics.fmean(v) for k, v in wall.items()}
    cpu = {k: 1e3 * statistics.median([c for _, c in v]) for k, v in times.items()}
    ratio = ms["engine"] / ms["torch"]
    engine_device = "gpu (device double)" if backend.emulated() and backend.device() == "gpu" else backend.device()
    print(f"model {args.model}: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, "
          f"block {cfg.block_size}, batch {TRAIN['batch_size']}, float32, AdamW; threads {threads}")
    print(f"device: engine {engine_device}, torch {torch_device}{note}")
    print(f"data: {data.source} (vocab {data.vocab_size}); {args.steps} timed steps each "
          f"after {args.warmup} warm-up, alternating blocks of {args.block}")
    print(f"first-step loss: engine {first[0]:.6f}  torch {first[1]:.6f}")
    print(f"{'':8s} {'ms/step':>9s} {'mean':>9s} {'min':>9s} {'cpu ms':>9s}")
    for k in ("engine", "torch"):
        print(f"{k:8s} {ms[k]:9.2f} {mean[k]:9.2f} {1e3 * min(wall[k]):9.2f} {cpu[k]:9.2f}")
    print(f"ratio engine/torch: {ratio:.3f} (median wall time; CPU time ratio {cpu['engine'] / cpu['torch']:.3f})")
    return {"engine_ms_per_step": ms["engine"], "torch_ms_per_step": ms["torch"], "ratio": ratio,
            "engine_mean_ms": mean["engine"], "torch_mean_ms": mean["torch"],
            "engine_cpu_ms_per_step": cpu["engine"], "torch_cpu_ms_per_step": cpu["torch"], "threads": threads,
            "steps": args.steps, "warmup": args.warmup, "first_loss": {"engine": first[0], "torch": first[1]},
            "data": data.source, "model": args.model, "engine_device": engine_device, "torch_device": torch_device}


def train(args, cfg, data):
    """The engine alone for --train-iters iterations with nanoGPT's schedule; val loss every eval_interval."""
    eng = EngineTrainer(cfg)
    batcher = Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0)
    val = Batcher(data.val, TRAIN["batch_size"], cfg.block_size, seed=1)
    n, log = args.train_iters, []
    t0 = time.perf_counter()
    for it in range(n + 1):
        if it % TRAIN["eval_interval"] == 0 or it == n:
            v = eng.eval_loss([val.next() for _ in range(TRAIN["eval_iters"])])
            log.append({"iter": it, "val_loss": v})
            print(f"iter {it:5d}  val loss {v:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if it == n:
            break
        eng.step(*batcher.next(), cosine_lr(it, TRAIN["lr"], TRAIN["warmup_iters"], n, TRAIN["min_lr"]))
    ms = 1e3 * (time.perf_counter() - t0) / n
    print(f"val loss after {n} iterations: {log[-1]['val_loss']:.4f} (nanoGPT: 1.886 after 2000); "
          f"{ms:.1f} ms/iter including evals")
    return {"train_iters": n, "val_loss": log[-1]["val_loss"], "evals": log, "ms_per_iter": ms}


def profile(args, cfg, data, top):
    import cProfile
    import pstats
    eng = EngineTrainer(cfg)
    batcher = Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=0)
    for _ in range(args.warmup):
        eng.step(*batcher.next(), TRAIN["lr"])
    batches = draw(batcher, args.steps)
    prof = cProfile.Profile()
    prof.enable()
    for b in batches:
        eng.step(*b, TRAIN["lr"])
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(top)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first (default 5)")
    p.add_argument("--block", type=int, default=5, help="steps per alternating timing block (default 5)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"text file, char-level (default {DEFAULT_DATA})")
    p.add_argument("--train-iters", type=int, metavar="N", help="train the engine N iterations; report val loss")
    p.add_argument("--profile", type=int, metavar="TOP", help="cProfile --steps engine steps; print TOP rows")
    p.add_argument("--model", choices=tuple(MODELS), default="baby",
                   help="baby: nanoGPT's char-level CPU run (default); gpt2: GPT-2 small's shape on random tokens")
    p.add_argument("--device", choices=("cpu", "gpu"), default=backend.default_device(),
                   help="cpu (NumPy) or gpu (CuPy; torch on CUDA); default: $ENGINE_DEVICE, else cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.block < 1:
        p.error("--steps, --warmup and --block must be positive")
    shape, vocab = MODELS[args.model]
    try:
        data = load_data(args.data, shape["block_size"], vocab)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        backend.set_device(args.device)
    except RuntimeError as e:                      # no CuPy
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = GPTConfig(vocab_size=data.vocab_size, **shape)
    if args.profile:
        return profile(args, cfg, data, args.profile)
    result = train(args, cfg, data) if args.train_iters else compare(args, cfg, data)
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
