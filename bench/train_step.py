"""One GPT training step: train.py's step against PyTorch eager, in the same launch, on the CPU or a GPU.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python -m bench.train_step [--json FILE]   # 1 thread each
    python -m bench.train_step [--json FILE]            # all threads of one process, both sides
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n C python -m bench.train_step  # the whole machine:
                                                        # dp = C ranks of 1 thread against PyTorch with C threads
    python -m bench.train_step --device gpu [--model gpt2]  # CuPy against PyTorch CUDA eager
    python -m bench.train_step --train-iters 2000      # train.py's step alone: val loss after 2000 iterations
    python -m bench.train_step --profile 25            # cProfile of train.py's step, top 25 by own time

The configuration is nanoGPT's published CPU run ("I only have a macbook", nanoGPT README):
tinyshakespeare char-level, n_layer 4, n_head 4, n_embd 128, block 64, batch 12, dropout 0,
float32, AdamW lr 1e-3, betas (0.9, 0.99), weight decay 0.1, grad clip 1.0 (warm-up 100 and
cosine decay to 1e-4 over max_iters for --train-iters). On this machine nanoGPT ran it at
about 91 ms/step and reached val loss 1.886 after 2000 iterations.

The engine's side is what train.py runs: ``train.prepare`` builds the Run (the Step of
parallel/step.py ``build_step``, ZeroEngine, the Batcher) from train.py's own flags, and each
step is train.py's ``measured_step``: the batch drawn by the data path, forward and backward,
the global grad-norm clipping, AdamW, the memory tracer (tracemalloc every 25th step, as
train.py's default), the bytes counters and the record the log line prints (formatted, not
printed). PyTorch's side is nanoGPT's model and step (bench/torch_gpt.py) from the engine's
initial weights, with the same decay groups and the same batches (a Batcher of train.py's
seed), so the first losses agree (printed as a check).

Threads: the engine's BLAS threads come from the environment (OPENBLAS_NUM_THREADS /
OMP_NUM_THREADS, else every core); engine/threads.py spreads the GELU and AdamW chunks over
the same count (ENGINE_THREADS overrides it). Under ``mpiexec -n C`` the engine runs dp = C, one process per core, and PyTorch
runs on rank 0 with ``--torch-threads`` (default C times the ranks' threads) while the other
ranks wait asleep (a polled non-blocking barrier: no core spins), the same global batch.

After the warm-up steps, timing alternates blocks of engine and torch steps, so drift in
machine load (other users) hits both; ms/step is the median over measured steps (the CPU time
of the process, user + system, is printed beside it: less sensitive to other processes
competing for the cores). Then ``--profile-steps`` engine steps run under engine/perf.py's
OpProfile: milliseconds per step by op kind (matmul, attention, elementwise, reductions,
gather/scatter, optimizer, the norm, the data path; "python" is the step minus all of them:
the graph walk, Tensor objects, the model's code) and minor page faults per step (what fresh
allocations cost), printed and in the JSON under "profile".

--device gpu runs the engine on CuPy (engine/backend.py; ENGINE_DEVICE=gpu-emulated makes it
the NumPy device double) and PyTorch on torch.device("cuda") with fused AdamW, as nanoGPT
configures it on CUDA; both sides synchronize their device before each clock read. Without
CUDA in torch (the emulated run) the PyTorch side stays on the CPU, and the output says so.
--model gpt2 is GPT-2 small's shape (n_layer 12, n_head 12, n_embd 768, block 1024, nanoGPT's
padded vocab 50304, batch 12) on uniform random tokens; --model tiny is a smoke-test shape.
"""
import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import train as train_py
from bench import blas_core, use_device
from collectives.launch import env_world
from engine import backend
from engine.autograd import no_grad
from engine.data import Batcher, DataError, Dataset, load_dataset
from engine.flat import FlatParameters
from engine.io import atomic_write_json
from engine.optim import AdamW, clip_grad_norm_, cosine_lr
from engine.perf import DeviceMemoryTracer, MemoryTracer, OpProfile
from engine.threads import blas_threads
from models.gpt import GPTConfig
from models.terraformer import build_model

from .torch_gpt import TorchTrainer

DEFAULT_DATA = "/work/shared/data/tinyshakespeare.txt"
MODEL = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0)
MODELS = {   # name -> (shape, vocab of random tokens: None = char-level --data)
    "baby": (MODEL, None),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0), 50304),
    "tiny": (dict(n_layer=1, n_head=2, n_embd=32, block_size=16, dropout=0.0), 256),
}
TRAIN = dict(batch_size=12, lr=1e-3, min_lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0,
             warmup_iters=100, eval_interval=250, eval_iters=20)


class TrainPyStep:
    """train.py's step: the Run that ``train.prepare`` builds from train.py's flags (dp = the
    launch's ranks), stepped by ``train.measured_step`` exactly as train.py's loop steps it."""

    def __init__(self, cfg, data, device):
        self.tracer = MemoryTracer()                            # first, as train.py's main()
        self.out = tempfile.mkdtemp(prefix="bench-train-step-")  # train.py's --out-dir; nothing is written
        t = TRAIN
        argv = ["--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head), "--n-embd", str(cfg.n_embd),
                "--block-size", str(cfg.block_size), "--dropout", str(cfg.dropout), "--batch-size", str(t["batch_size"]),
                "--lr", str(t["lr"]), "--min-lr", str(t["min_lr"]), "--betas", *map(str, t["betas"]),
                "--weight-decay", str(t["weight_decay"]), "--grad-clip", str(t["grad_clip"]), "--device", device,
                "--dp", str(env_world()), "--out-dir", self.out, "--eval-interval", "0", "--ckpt-interval", "0",
                "--max-steps", "1000000"]
        self.run = train_py.prepare(argv, data=data)
        if device == "gpu":                                     # as train.py's train()
            self.tracer.stop()
            self.tracer = DeviceMemoryTracer()
        else:
            self.tracer.every = self.run.cfg.mem_trace_interval
        self.run.model.train()
        self.initial = {k: backend.to_numpy(v).copy() for k, v in self.run.model.state_dict().items()}
        self.decay = {n for n, p in self.run.model.named_parameters() if p.decay}
        self.is_main = self.run.is_main

    def step(self, lr):
        run = self.run
        run.step += 1
        rec = train_py.measured_step(run, self.tracer, lr, peak=1.0)   # peak: only the unreported MFU
        train_py.log_line(rec)                                  # formatted as the loop's log line
        return rec["loss"]

    def synchronize(self):
        backend.synchronize()

    def eval_loss(self, batches):
        return self.run.stepper.eval_loss(batches)

    def close(self):
        shutil.rmtree(self.out, ignore_errors=True)


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


def timed(trainer, n, lr):
    """Per step: (wall seconds, CPU seconds of this process: user + system), the device synchronized
    before each clock read."""
    out = []
    for _ in range(n):
        trainer.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.step(lr)
        trainer.synchronize()
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return out


def idle_barrier(mpi_comm, deadline_s=900.0):
    """Wait for every rank without spinning a core (MPICH's blocking waits poll): a non-blocking
    barrier tested every 2 ms; an error after ``deadline_s`` (the no-hang rule)."""
    req, t0 = mpi_comm.Ibarrier(), time.monotonic()
    while not req.Test():
        if time.monotonic() - t0 > deadline_s:
            raise RuntimeError(f"rank {mpi_comm.Get_rank()}: other ranks did not reach the barrier "
                               f"in {deadline_s:.0f} s")
        time.sleep(0.002)


def op_profile(eng, steps, lr):
    """ms per step by op kind over ``steps`` engine steps (engine/perf.py OpProfile), with the
    phases outside autograd timed by name; CPU time at one thread in one process, else wall."""
    import parallel.data.zero as zero
    run = eng.run
    one = blas_threads() == 1 and run.world == 1
    clock = time.process_time if one else time.perf_counter
    prof, z = OpProfile(clock), run.stepper.engine
    prof.patch(AdamW, "step", "optimizer:AdamW.step")
    prof.patch(z, "local_grad_norm_sq", "reductions:grad_norm_sq")
    prof.patch(zero, "clip_grad_norm_", "elementwise:clip")
    prof.patch(z, "zero_grad", "memset:zero_grad")
    prof.patch(z, "finish_grads", "communication:finish_grads")
    prof.patch(run.batcher, "next", "data:Batcher.next")
    with prof:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = clock()
        for _ in range(steps):
            eng.step(lr)
        eng.synchronize()
        total = clock() - t0
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    out = prof.breakdown(total, steps)
    out.update(clock="cpu" if one else "wall", steps=steps, minor_faults_per_step=faults / steps)
    return out


def print_profile(p):
    print(f"profile of train.py's step ({p['steps']} steps, {p['clock']} time, {p['ms_per_step']:.2f} ms/step; "
          f"{p['minor_faults_per_step']:.1f} minor page faults/step):")
    for k, ms in p["kinds_ms"].items():
        print(f"  {k:28s} {ms:8.2f} ms  {100 * ms / p['ms_per_step']:5.1f}%")


def linear_gemms(torch, cfg, vocab, rows, reps=15):
    """The GEMMs of one step's Linears timed alone on each side, in this process: for every
    Linear (per layer: attention's C -> 3C and C -> C, the MLP's C -> 4C and 4C -> C; the tied
    head C -> vocab) its forward x W^T and backward's dx = dy W and dW = dy^T x, on ``rows``
    rows, float32, with NumPy (the engine's BLAS) and with torch, interleaved; ms per step (medians). The rest of a side's step (elementwise work, attention,
    the optimizer, Python) is its step time minus this: the part each library's GEMM speed
    fixes, read beside the part the engine's own code decides. Measured at one thread a side
    only: with several, a GEMM called alone pays its threads' wake-up (torch's two-thread GEMMs
    here took longer alone, 119 ms, than its whole step, 71 ms)."""
    C, out = cfg.n_embd, {"engine": 0.0, "torch": 0.0}
    shapes = [(C, 3 * C), (C, C), (C, 4 * C), (4 * C, C)]
    rng = np.random.default_rng(0)
    for (n_in, n_out), count in [*((s, cfg.n_layer) for s in shapes), ((C, vocab), 1)]:
        x, g, w = (rng.standard_normal(s, dtype=np.float32) for s in ((rows, n_in), (rows, n_out), (n_out, n_in)))
        tx, tg, tw = (torch.from_numpy(a) for a in (x, g, w))
        fns = {"engine": lambda: (x @ w.T, g @ w, g.T @ x), "torch": lambda: (tx @ tw.T, tg @ tw, tg.T @ tx)}
        times = {k: [] for k in fns}
        for r in range(reps + 2):
            for k in (("engine", "torch") if r % 2 == 0 else ("torch", "engine")):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        for k in out:
            out[k] += count * 1e3 * statistics.median(times[k][2:])      # the first two: warm-up
    return out


def compare(args, cfg, data):
    try:
        import torch
    except ImportError:
        print("error: the PyTorch baseline needs torch (pip install -e .[test]); "
              "--train-iters and --profile run without it", file=sys.stderr)
        raise SystemExit(2) from None
    eng = TrainPyStep(cfg, data, args.device)
    run, lr = eng.run, TRAIN["lr"]
    world, threads = run.world, blas_threads()
    torch_threads = args.torch_threads or world * threads
    torch.set_num_threads(torch_threads)
    torch_device, note = "cpu", ""
    if backend.device() == "gpu":
        if torch.cuda.is_available():
            torch_device = "cuda"
        else:
            note = " (note: torch has no CUDA here, so its side runs on the CPU)"
    ref = None
    if eng.is_main:                                   # the same windows as train.py's Batcher
        ref = TorchTrainer(torch, cfg, eng.initial, eng.decay, torch_device,
                           Batcher(data.train, TRAIN["batch_size"], cfg.block_size, seed=run.cfg.seed))
    mpi = run.mesh.world.mpi if world > 1 else None

    def torch_steps(n, timer):
        out = timer(ref, n) if ref is not None else []
        if mpi is not None:                           # the other ranks sleep meanwhile
            idle_barrier(mpi)
        return out

    first = (eng.step(lr), torch_steps(1, lambda r, n: [r.step(lr)]))
    first = (first[0], first[1][0] if first[1] else None)
    for _ in range(1, args.warmup):                   # warm-up: caches, allocator, BLAS
        eng.step(lr)
        torch_steps(1, lambda r, n: r.step(lr))
    times = {"engine": [], "torch": []}
    for r, i in enumerate(range(0, args.steps, args.block)):
        n = min(args.block, args.steps - i)
        for name in (("engine", "torch") if r % 2 == 0 else ("torch", "engine")):
            times[name] += timed(eng, n, lr) if name == "engine" else torch_steps(n, lambda t, k: timed(t, k, lr))
    prof = op_profile(eng, args.profile_steps, lr) if args.profile_steps else None
    eng.close()
    if not eng.is_main:
        return None
    gemms = None
    if world == 1 and threads == 1 and torch_threads == 1 and backend.device() == "cpu" and args.model != "gpt2":
        gemms = linear_gemms(torch, cfg, data.vocab_size, TRAIN["batch_size"] * cfg.block_size)
    wall = {k: [w for w, _ in v] for k, v in times.items()}
    ms = {k: 1e3 * statistics.median(v) for k, v in wall.items()}
    mean = {k: 1e3 * statistics.fmean(v) for k, v in wall.items()}
    cpu = {k: 1e3 * statistics.median([c for _, c in v]) for k, v in times.items()}
    ratio = ms["engine"] / ms["torch"]
    engine_device = "gpu (device double)" if backend.emulated() and backend.device() == "gpu" else backend.device()
    mode = (f"whole machine: engine dp={world} x {threads} thread(s), torch {torch_threads} threads" if world > 1
            else f"one process: {threads} thread(s), torch {torch_threads}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}: n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_embd {cfg.n_embd}, "
          f"block {cfg.block_size}, batch {TRAIN['batch_size']}, float32, AdamW; {mode}")
    core = blas_core() if backend.device() == "cpu" else "-"
    print(f"device: engine {engine_device} (train.py's step; OpenBLAS kernels {core}), torch {torch_device}{note}; "
          f"load average {load:.2f} on {os.cpu_count()} cores")
    print(f"data: {data.source} (vocab {data.vocab_size}); {args.steps} timed steps each "
          f"after {args.warmup} warm-up, alternating blocks of {args.block}")
    print(f"first-step loss: engine {first[0]:.6f}  torch {first[1]:.6f}")
    print(f"{'':8s} {'ms/step':>9s} {'mean':>9s} {'min':>9s} {'cpu ms':>9s}")
    for k in ("engine", "torch"):
        print(f"{k:8s} {ms[k]:9.2f} {mean[k]:9.2f} {1e3 * min(wall[k]):9.2f} {cpu[k]:9.2f}")
    print(f"ratio engine/torch: {ratio:.3f} (median wall time; CPU time ratio {cpu['engine'] / cpu['torch']:.3f})")
    if gemms:
        print(f"the Linears' GEMMs alone (forward, dx, dW): engine {gemms['engine']:.2f} ms, torch "
              f"{gemms['torch']:.2f} ms per step ({gemms['engine'] / gemms['torch']:.3f}x); the rest of the step: "
              f"engine {ms['engine'] - gemms['engine']:.2f} ms, torch {ms['torch'] - gemms['torch']:.2f} ms")
    if prof:
        print_profile(prof)
    return {"engine_ms_per_step": ms["engine"], "torch_ms_per_step": ms["torch"], "ratio": ratio,
            "engine_mean_ms": mean["engine"], "torch_mean_ms": mean["torch"],
            "engine_cpu_ms_per_step": cpu["engine"], "torch_cpu_ms_per_step": cpu["torch"], "threads": threads,
            "torch_threads": torch_threads, "ranks": world, "mode": mode, "load_average": load, "blas_core": core,
            "steps": args.steps, "warmup": args.warmup, "first_loss": {"engine": first[0], "torch": first[1]},
            "data": data.source, "model": args.model, "engine_device": engine_device, "torch_device": torch_device,
            "engine_step": "train.py measured_step", "profile": prof, "linear_gemms_ms": gemms}


def train(args, cfg, data):
    """train.py's step alone for --train-iters iterations with nanoGPT's schedule; val loss every eval_interval."""
    eng = TrainPyStep(cfg, data, args.device)
    val = Batcher(data.val, TRAIN["batch_size"], cfg.block_size, seed=1)
    say = print if eng.is_main else (lambda *a, **k: None)
    n, log = args.train_iters, []
    t0 = time.perf_counter()
    for it in range(n + 1):
        if it % TRAIN["eval_interval"] == 0 or it == n:
            v = eng.eval_loss([val.next() for _ in range(TRAIN["eval_iters"])])
            log.append({"iter": it, "val_loss": v})
            say(f"iter {it:5d}  val loss {v:.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if it == n:
            break
        eng.step(cosine_lr(it, TRAIN["lr"], TRAIN["warmup_iters"], n, TRAIN["min_lr"]))
    eng.close()
    ms = 1e3 * (time.perf_counter() - t0) / n
    say(f"val loss after {n} iterations: {log[-1]['val_loss']:.4f} (nanoGPT: 1.886 after 2000); "
        f"{ms:.1f} ms/iter including evals")
    return {"train_iters": n, "val_loss": log[-1]["val_loss"], "evals": log, "ms_per_iter": ms} if eng.is_main else None


def profile(args, cfg, data, top):
    import cProfile
    import pstats
    eng = TrainPyStep(cfg, data, args.device)
    for _ in range(args.warmup):
        eng.step(TRAIN["lr"])
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        eng.step(TRAIN["lr"])
    prof.disable()
    eng.close()
    if eng.is_main:
        pstats.Stats(prof).sort_stats("tottime").print_stats(top)
        print_profile(op_profile_only(args, cfg, data))
    return 0


def op_profile_only(args, cfg, data):
    eng = TrainPyStep(cfg, data, args.device)
    for _ in range(args.warmup):
        eng.step(TRAIN["lr"])
    out = op_profile(eng, args.steps, TRAIN["lr"])
    eng.close()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    p.add_argument("--steps", type=int, default=30, help="timed steps per side (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first (default 5)")
    p.add_argument("--block", type=int, default=5, help="steps per alternating timing block (default 5)")
    p.add_argument("--profile-steps", type=int, default=10,
                   help="engine steps timed by op kind after the comparison (default 10; 0: none)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="PyTorch's threads (default: the engine's threads times the launch's ranks)")
    p.add_argument("--data", default=DEFAULT_DATA, help=f"text file, char-level (default {DEFAULT_DATA})")
    p.add_argument("--train-iters", type=int, metavar="N", help="train the engine N iterations; report val loss")
    p.add_argument("--profile", type=int, metavar="TOP", help="cProfile --steps engine steps; print TOP rows")
    p.add_argument("--model", choices=tuple(MODELS), default="baby",
                   help="baby: nanoGPT's char-level CPU run (default); gpt2: GPT-2 small's shape on random tokens")
    p.add_argument("--device", choices=("cpu", "gpu"), default=backend.default_device(),
                   help="cpu (NumPy) or gpu (CuPy; torch on CUDA); default: $ENGINE_DEVICE, else cpu")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.block < 1 or args.profile_steps < 0 or args.torch_threads < 0:
        p.error("--steps, --warmup and --block must be positive, --profile-steps and --torch-threads >= 0")
    shape, vocab = MODELS[args.model]
    try:
        data = load_data(args.data, shape["block_size"], vocab)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not use_device(args.device):                # no CuPy
        return 2
    cfg = GPTConfig(vocab_size=data.vocab_size, **shape)
    if args.profile:
        return profile(args, cfg, data, args.profile)
    result = train(args, cfg, data) if args.train_iters else compare(args, cfg, data)
    if args.json and result is not None:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
