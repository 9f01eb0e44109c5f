"""Train a GPT on one process or on N with data, ZeRO, pipeline and sequence parallelism.

    python train.py                                    # stdlib corpus, byte-level, small GPT, ~3 min on 2 cores
    mpiexec -n 4 python train.py --dp 4 --zero 2       # 4 data-parallel ranks, ZeRO stage 2 (0-3)
    mpiexec -n 2 python train.py --dp 2 --grad-accum 4 # global batch = batch_size * grad_accum sequences
    mpiexec -n 4 python train.py --sp 4 --block-size 256             # each sequence split over 4 ranks (ring)
    ENGINE_DEVICE=gpu mpiexec -n 2 python train.py --dp 2 --zero 2 --offload optimizer  # AdamW on the host (ZeRO-Offload)
    mpiexec -n 2 python train.py --dp 2 --zero 3 --quant-weights int8 --quant-grads int4 --error-feedback  # ZeRO++
    mpiexec -n 4 python train.py --dp 2 --sp 2 --sp-attention ulysses --zero 3   # 2 replicas x 2 sp ranks
    mpiexec -n 4 python train.py --pp 4 --micro-batches 4 --schedule 1f1b         # 4 pipeline stages
    mpiexec -n 4 python train.py --pp 2 --dp 2 --zero 1 --schedule zb-h1 --trace step.json   # 2 replicas x 2 stages
    mpiexec -n 2 python train.py --pp 2 --schedule interleaved --virtual-stages 2  # 2 layer chunks per rank
    mpiexec -n 8 python train.py --pp 2 --sp 2 --dp 2 --zero 1 --sp-attention ulysses   # 2 stages x 2 sp x 2 replicas
    python train.py --data input.txt --tokenizer char --max-steps 2000 --out-dir out-char   # any UTF-8 text
    python train.py --reversible --attention lsh --loss-sparsity 4 --ffn-sparsity 32   # a Terraformer (dp, ZeRO 0-3)
    python train.py --config run.toml --lr 3e-4        # TOML supplies fields, flags override it
    python train.py --resume out                       # continue an interrupted run from out/latest
    python train.py --help                             # every flag, generated from the dataclasses named below
    python sample.py --ckpt out --prompt "def "        # sample from the latest checkpoint

Flags come from the dataclasses GPTConfig (models/gpt.py), ParallelConfig (parallel/config.py)
and TrainConfig (train_config.py, with the checks of their values); ``--config FILE.toml``
supplies the same fields, flags override it. ``--batch-size`` is the GLOBAL batch: every layout
trains the model one process trains, composed by parallel/step.py ``build_step`` (tests:
test_ddp_train, test_sp_train, test_pp_train, test_noise_layouts). This file keeps the start-up
(the mesh, the data, the output and resume checks), the loop, logging (rank 0; totals over the
ranks; MFU as PaLM's appendix B), metrics (``--metrics``, JSON lines) and checkpoints
(parallel/checkpoint/: sharded, atomic, resumable at any layout; policy.py: which are good, what
a run may replace, what --resume takes from the manifest). Bad input, an unwritable output
included, prints one line ``error: ...`` and exits 2 on every rank before anything is written; a
NaN or inf loss or a failed save stops every rank with one line naming the last good checkpoint
(exit 1).
"""
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict

import numpy as np

from collectives import Mesh, MeshError, ulfm
from collectives.devices import select_gpu
from collectives.launch import env_rank, env_world
from elastic import contact
from elastic.inplace import peer_table, train_shrinking
from engine import backend
from engine.config import ConfigError, build
from engine.data import Batcher, DataError, load_dataset
from engine.io import CheckpointError, one_line
from engine.optim import cosine_lr
from engine.perf import DeviceMemoryTracer, MemoryTracer, measure_peak_flops
from models.gpt import GPTConfig
from parallel import build_step, open_checkpoint
from parallel.checkpoint import policy
from parallel.checkpoint.replicas import BuddyReplicas, default_store
from parallel.trace import Tracer, mesh_labels, write_chrome_trace
import train_ui
from train_config import need, parse_configs

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


# ---------------------------------------------------------------------------- set-up
class Run:
    """Everything a training run holds: configs, data, the Step (parallel/step.py), the batcher."""

    def __init__(self, model_cfg, par, cfg, data, mesh, step, batcher):
        self.model_cfg, self.par, self.cfg, self.data = model_cfg, par, cfg, data
        self.mesh, self.stepper, self.batcher, self.model = mesh, step, batcher, step.model
        self.rank, self.world, self.is_main = mesh.world.rank, mesh.world.size, mesh.world.rank == 0
        self.step, self.resumed_from, self.last_good, self.doomed, self.replicas = 0, None, None, [], None
        self.resumed_at, self.peers = None, None            # the step of resumed_from; [pid, host] by rank
        self.watch = policy.LossWatch(cfg.good_factor)      # the running minimum: is a checkpoint good?


def prepare(argv, world=None, data=None):
    """Parse, load and check everything that bad input can break; write nothing. ``world``: the
    job's Communicator (default: MPI's world); ``data``: the dataset, when already loaded."""
    model_values, par, cfg = parse_configs(argv, __doc__)
    if cfg.on_failure == "shrink":                              # a dead peer raises (collectives/ulfm.py)
        ulfm.enable()
    if env_world() > 1 and par.comm_timeout > 0:                # read when the Communicators are made
        os.environ.setdefault("ENGINE_COMM_TIMEOUT", f"{par.comm_timeout:g}")
    try:
        mesh = Mesh(dp=par.dp, pp=par.pp, sp=par.sp, tp=par.tp, world=world)
        backend.set_device(cfg.device)
        if cfg.device == "gpu":
            select_gpu(mesh.world.mpi)                          # local rank % GPUs (collectives/devices.py)
    except (MeshError, RuntimeError) as e:
        raise ConfigError(str(e)) from None
    need(cfg.plot in ("", "off") or train_ui.have_matplotlib(), f"--plot {cfg.plot} needs matplotlib "
         "(pip install matplotlib, or pip install -e '.[test]')")
    policy.check_outputs(mesh.world, cfg.out_dir, {"metrics": cfg.metrics, "trace": cfg.trace,   # a collective
                                                   "plot": cfg.plot if cfg.plot != "off" else ""},
                         kept=() if cfg.resume or cfg.overwrite else ("metrics",))
    vocab = model_values["vocab_size"]
    data = data or load_dataset(cfg.data or None, cfg.tokenizer, cfg.val_fraction, model_values["block_size"],
                                vocab_size=vocab or None)
    need(not vocab or vocab >= data.vocab_size,
         f"vocab_size {vocab} is smaller than the data's vocabulary ({data.vocab_size})")
    model_cfg = build(GPTConfig, dict(model_values, vocab_size=vocab or data.vocab_size), "model")
    ckpt = open_checkpoint(cfg.resume, mesh.world) if cfg.resume else None   # manifest, shard sizes and sha256
    if ckpt is not None:
        policy.check_resumable(ckpt, data.tokenizer, cfg.max_steps)
    doomed = policy.would_replace(cfg.out_dir, ckpt)            # never replaced without --overwrite
    if doomed and not cfg.overwrite:
        policy.refuse_replacing(cfg.out_dir, ckpt, doomed)
    step = build_step(model_cfg, par, cfg, mesh)                # parallel/step.py: the layout composed
    run = Run(model_cfg, par, cfg, data, mesh, step, Batcher(data.train, cfg.batch_size, model_cfg.block_size,
                                                            seed=cfg.seed))
    if ckpt is not None:
        manifest = step.restore(ckpt)                           # any layout; a collective
        run.batcher.load_state_dict(policy.data_state(ckpt))
        run.step, run.resumed_from, run.watch.best = ckpt.step, ckpt.path, manifest.get("best_loss", math.inf)
        run.resumed_at = ckpt.step
        run.last_good = ckpt.path if manifest.get("good", True) else None
    run.doomed = doomed
    if cfg.replica_every:                                       # a collective
        run.replicas = BuddyReplicas(mesh.world, step, cfg.replica_every, cfg.replica_dir or default_store())
    if cfg.on_failure == "shrink":                              # so that a stuck rank can be killed
        run.peers = peer_table(mesh.world)
    return run


def checkpoint_manifest(run, rec):
    """What resuming needs besides the tensors, and whether the checkpoint is good
    (parallel/checkpoint/policy.py LossWatch); the same on every rank."""
    cfg, why_not = run.cfg, run.watch.why_not_good(rec)
    return {"config": {"model": asdict(run.model_cfg), "parallel": asdict(run.par), "train": asdict(cfg)},
            "tokenizer": run.data.tokenizer.to_json(), "rng": {"data": run.batcher.rng.bit_generator.state},
            "data": {"source": run.data.source, "position": run.batcher.position,
                     "train_tokens": len(run.data.train), "val_tokens": len(run.data.val)},
            "metrics": rec, "good": why_not is None, "best_loss": run.watch.best}


def save_checkpoint(run, rec):
    """Every rank writes what it owns into out_dir/step_<N> (parallel/step.py Step.save, atomic);
    returns the path."""
    cfg, run.why_not_good = run.cfg, run.watch.why_not_good(rec)
    manifest = checkpoint_manifest(run, rec)
    path = run.stepper.save(cfg.out_dir, run.step, manifest, keep=None if run.doomed else cfg.keep or None)
    if run.doomed and run.is_main:                       # --overwrite: what it replaces goes now, then --keep
        policy.replace(cfg.out_dir, run.doomed, path, cfg.keep)
    run.doomed, run.last_good = [], run.last_good if run.why_not_good else path
    return path


# ---------------------------------------------------------------------------- loop
def evaluate(run):
    """Mean loss over eval_iters fixed validation batches (the same windows every time)."""
    batcher = Batcher(run.data.val, run.cfg.batch_size, run.model_cfg.block_size, seed=run.cfg.seed + 1)
    return run.stepper.eval_loss([batcher.next() for _ in range(run.cfg.eval_iters)])


def train_step(run, lr):
    """One optimizer step on grad_accum global batches: (mean loss, gradient norm); raises
    Diverged on a NaN or inf loss or norm, before the update."""
    cfg, step = run.cfg, run.stepper
    with np.errstate(over="ignore", invalid="ignore"):      # divergence is reported once, below
        loss = step.forward_backward([run.batcher.next() for _ in range(cfg.grad_accum)], step=run.step)
        if not math.isfinite(loss):
            raise Diverged(f"loss is {loss} at step {run.step}; stopping before the update")
        norm = step.clip_grad_norm(cfg.grad_clip)
        if not math.isfinite(norm):
            raise Diverged(f"gradient norm is {norm} at step {run.step}; stopping before the update")
        step.update(lr)
    backend.synchronize()
    return loss, norm


def measured_step(run, tracer, lr, peak):
    """Step run.step as the loop takes it (bench/train_step.py times this same call): the step,
    its memory trace, the bytes sent and their maximum over the ranks; returns its record."""
    step, T = run.step, run.model_cfg.block_size
    tokens_per_step = run.cfg.batch_size * T * run.cfg.grad_accum
    tracer.begin(step)
    sent0 = run.stepper.bytes_by_kind()              # bytes this rank sends in the step, per kind
    t0 = time.perf_counter()
    loss, norm = train_step(run, lr)
    run.watch.see(loss)
    dt, mem = time.perf_counter() - t0, tracer.end()
    sent = [n - sent0[k] for k, n in run.stepper.bytes_by_kind().items()]
    v = np.array([dt, mem, sum(sent), *sent], np.float64)
    if run.world > 1:                                # the slowest rank's time, the largest peak and bytes
        v = run.mesh.world.all_reduce(v, op="max")
    dt, mem = float(v[0]), float(v[1])
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "ms_per_step": dt * 1e3,
            "tokens_per_s": tokens_per_step / dt, "mfu": run.model.flops_per_token() * tokens_per_step / dt / peak,
            "peak_bytes": int(mem), "bytes_sent": int(v[2]),
            "bytes_by_kind": {k: int(n) for k, n in zip(sent0, v[3:]) if n}}


def log_line(rec):
    return (f"step {rec['step']:5d} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | {rec['ms_per_step']:7.1f} ms | "
            f"{rec['tokens_per_s']:7.0f} tok/s | mfu {100 * rec['mfu']:5.2f}% | mem {rec['peak_bytes'] / 2**20:6.1f} "
            f"MiB | sent {rec['bytes_sent'] / 2**20:.3f} MiB")


def banner(run, peak, tracer, say, plot):
    """The start-up lines (rank 0): the plan, model, data, layout, MFU and memory conventions."""
    cfg, model, T = run.cfg, run.model, run.model_cfg.block_size
    say(train_ui.plan_line(cfg.max_steps, run.step, cfg.batch_size * T * cfg.grad_accum, cfg.eval_interval,
                           cfg.ckpt_interval, cfg.out_dir, plot))
    say(f"model: {model.num_params():,} parameters | {asdict(run.model_cfg)}")
    say(f"data: {run.data.source} | {type(run.data.tokenizer).__name__} vocab {run.data.vocab_size} | train "
        f"{len(run.data.train):,} val {len(run.data.val):,} tokens | {cfg.batch_size * T * cfg.grad_accum} tokens/step")
    many = run.world > 1
    if many:
        say(run.stepper.describe(cfg.batch_size))
        # the launcher reports a rank killed by a signal by its PID: this line maps PIDs to ranks
        pids = run.mesh.world.all_gather(np.array([os.getpid()], dtype=np.int64))
        say("pids: " + " ".join(f"rank {r}={int(p)}" for r, p in enumerate(pids)))
    say(f"mfu: peak {peak / 1e9:.1f} GFLOP/s measured ({cfg.dtype} matmul, {cfg.device}" + (f", {run.world} ranks"
        if many else "") + f"), {model.flops_per_token() / 1e6:.2f} MFLOP/token | mem: {tracer.what}"
        + (" (largest rank), " if many else ", ") + ("every step" if tracer.every == 1 else
                                                    f"traced on the first step and every {tracer.every}th step only"))
    if run.resumed_from:
        say(f"resumed from {run.resumed_from} at step {run.step}")
    for note in run.data.notes if run.is_main else ():   # what the data loader decided (engine/data.py)
        print(f"note: {note}", file=sys.stderr, flush=True)


def train(run, tracer):
    cfg, model = run.cfg, run.model
    tty = run.is_main and sys.stdout.isatty()              # a terminal: a progress bar; else log lines
    say = train_ui.printer(tty) if run.is_main else (lambda *a, **k: None)
    plot = train_ui.plot_path(cfg.plot, cfg.out_dir) if run.is_main else None
    tokens_per_step = cfg.batch_size * run.model_cfg.block_size * cfg.grad_accum
    if cfg.device == "gpu" and isinstance(tracer, MemoryTracer):     # the arrays live on the device
        tracer.stop()
        tracer = DeviceMemoryTracer()
    else:
        tracer.every = cfg.mem_trace_interval
    peak = measure_peak_flops(cfg.dtype) * run.world
    banner(run, peak, tracer, say, plot)
    progress, history = train_ui.Progress(cfg.max_steps - run.step), []    # rank 0's ETA and loss curve
    model.train()
    trace_step = run.step + min(2, cfg.max_steps - run.step) if cfg.trace else None   # the second step, warm
    metrics = open(cfg.metrics, "a" if run.resumed_from else "w") if cfg.metrics and run.is_main else None
    with metrics or contextlib.nullcontext():
        while run.step < cfg.max_steps:
            run.step = step = run.step + 1
            lr = cosine_lr(step - 1, cfg.lr, cfg.warmup, cfg.max_steps, cfg.min_lr)
            if step == trace_step:                       # a barrier aligns the ranks' clocks
                run.stepper.tracer = Tracer().start(run.mesh.world)
            rec = measured_step(run, tracer, lr, peak)
            progress.tick()
            last = step == cfg.max_steps
            if tty:
                train_ui.redraw(progress.bar(step, cfg.max_steps, rec["loss"]))
            elif step % cfg.log_interval == 0 or last:
                say(log_line(rec) + progress.suffix(), flush=True)
            if (estimate := progress.estimate_line()) and run.is_main:
                say(estimate, flush=True)
            if step == trace_step:                       # gathered over the world, rank 0 writes
                write_chrome_trace(cfg.trace, run.stepper.tracer, run.mesh.world, mesh_labels(run.mesh))
                run.stepper.tracer = None
                say(f"step {step:5d} | trace {cfg.trace}", flush=True)
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or last:
                rec["val_loss"] = evaluate(run)
                say(f"step {step:5d} | val loss {rec['val_loss']:.4f}", flush=True)
            if metrics:
                print(json.dumps(rec), file=metrics, flush=True)
            history.append({k: rec[k] for k in ("step", "loss", "val_loss") if k in rec})
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last:
                path = save_checkpoint(run, rec)
                say(f"step {step:5d} | checkpoint {path}" + (f" | not good: {run.why_not_good}; last good: "
                    f"{run.last_good or 'none'}" if run.why_not_good else ""), flush=True)
            if run.replicas is not None:                 # a buddy's RAM holds this step's shard
                run.replicas.after_step(step, lambda: checkpoint_manifest(run, rec))
    if run.replicas is not None:
        run.replicas.close()
    if run.is_main:                                      # the plot, a sample from the checkpoint, what next
        train_ui.finish(run, history, plot, tokens_per_step, progress, say)
    return 0


def main(argv=None):
    tracer = MemoryTracer()                 # first, so the resident state is traced too
    contact.hello(env_rank())               # python -m elastic: its supervisor learns who died
    try:
        run = prepare(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError, CheckpointError) as e:
        if env_rank() == 0:                       # every rank fails alike; one line is enough
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        if run.cfg.on_failure == "shrink":          # a peer dies: go on with the survivors (elastic/inplace.py)
            return train_shrinking(run, argv, prepare, lambda r: train(r, tracer))
        return train(run, tracer)
    except (Diverged, CheckpointError, OSError, KeyboardInterrupt) as e:
        good, local = f"last good checkpoint: {run.last_good or 'none written'}", isinstance(e, OSError)
        if isinstance(e, KeyboardInterrupt):
            print(f"interrupted at step {run.step}; resume from the {good}", file=sys.stderr)
            return 130
        if run.is_main or local:                # a divergence or a failed save: alike on every rank (agreed)
            print(f"error: {f'rank {run.rank}: ' if local else ''}{one_line(e)} ({good})", file=sys.stderr, flush=True)
        if local and run.world > 1:             # rank 0's own file (metrics, trace): the others cannot know
            run.mesh.world.mpi.Abort(EXIT_FAILED)
        return EXIT_FAILED

if __name__ == "__main__":
    sys.exit(main())
