"""Train a GPT on one process or on N with data parallelism, ZeRO, pipeline and sequence
parallelism.

    python train.py                                    # stdlib corpus, byte-level, small GPT, ~1-2 min on 1 core
    mpiexec -n 4 python train.py --dp 4 --zero 2       # 4 data-parallel ranks, ZeRO stage 2 (0-3)
    mpiexec -n 2 python train.py --dp 2 --grad-accum 4 # global batch = batch_size * grad_accum sequences
    mpiexec -n 4 python train.py --sp 4 --block-size 256             # each sequence split over 4 ranks (ring)
    mpiexec -n 4 python train.py --dp 2 --sp 2 --sp-attention ulysses --zero 3   # 2 replicas x 2 sp ranks
    mpiexec -n 4 python train.py --pp 4 --micro-batches 4 --schedule 1f1b         # 4 pipeline stages
    mpiexec -n 4 python train.py --pp 2 --dp 2 --zero 1 --schedule zb-h1 --trace step.json   # 2 replicas x 2 stages
    mpiexec -n 2 python train.py --pp 2 --schedule interleaved --virtual-stages 2  # 2 layer chunks per rank
    mpiexec -n 8 python train.py --pp 2 --sp 2 --dp 2 --zero 1 --sp-attention ulysses   # 2 stages x 2 sp x 2 replicas
    python train.py --data input.txt --tokenizer char --max-steps 2000 --out-dir out-char   # any UTF-8 text
    python train.py --config run.toml --lr 3e-4        # TOML supplies fields, flags override it
    python train.py --resume out                       # continue an interrupted run from out/latest
    python train.py --help                             # every flag, generated from the dataclasses below
    python sample.py --ckpt out --prompt "def "        # sample from the latest checkpoint

One source of truth: the dataclasses ``GPTConfig`` (models/gpt.py), ``ParallelConfig`` and
``TrainConfig`` generate the command-line flags (field ``max_steps`` -> ``--max-steps``,
type from the annotation, help from the field metadata); ``--config FILE.toml`` supplies
the same fields (flat keys, or tables [model] [parallel] [train]); flags override it.

Data parallelism (parallel/data/zero.py): ``--batch-size`` is the GLOBAL batch, as on one
process: every rank draws the same windows from one seeded Batcher and takes its slice of
batch_size / dp sequences, the gradients are averaged over the dp ranks, so N ranks compute
what one process computes (tests/test_zero.py). Only rank 0 prints and writes metrics;
checkpoints are sharded (parallel/checkpoint/sharded.py: each rank writes the parameters and AdamW
state it owns, rank 0 the manifest; resumable at any dp, pp and stage, ``python consolidate.py``
makes one file). Rank 0's log line gives totals: tokens/s over all ranks, the largest per-rank peak
memory, MFU against N times the measured per-process peak. ``--comm-timeout`` (default 300 s
when there are several ranks) arms the collectives' watchdog (collectives/debug.py): a rank
that stops arriving is named and the job aborted instead of hanging.

Sequence parallelism (parallel/layout.py, parallel/sequence/model.py): ``--sp N`` splits each
window of block_size tokens over N ranks (``--sp-attention ring``: K/V blocks travel a ring,
zigzag split, block_size divisible by 2N; ``ulysses``: all-to-all to head sharding, block_size
divisible by N, any head count); dp * sp ranks in all. The ZeroEngine then runs over the
dp x sp group (gradients summed over sp, averaged over dp; ZeRO shards over all dp * sp
ranks), so the losses equal one process's (tests/test_sp_train.py).

Pipeline parallelism (parallel/pipeline_layout.py, parallel/pipeline/executor.py): ``--pp P`` cuts the
layers into P stages (embedding on the first, final LayerNorm, tied head and loss on the last)
and each replica's batch_size / dp sequences into ``--micro-batches M`` (default P), run by
``--schedule``: gpipe (Huang et al. 2019), 1f1b and interleaved with ``--virtual-stages V``
chunks per rank (Narayanan et al. 2021), zb-h1 (Qi et al. 2023, arXiv 2401.10241); dp * pp
ranks in all. Every rank builds the whole GPT from the seed and keeps its stage; a ZeroEngine
(stage 0 or 1; 2 and 3 are refused, as in DeepSpeed) over the stage's dp group owns its
parameters; the tied wte gradient is summed between the first and last stage, the gradient
norm is the whole model's; validation runs forward only through the stages. The losses equal
one process's (tests/test_pp_train.py). With ``--sp N`` too (dp * pp * sp ranks), every
micro-batch is sharded along its tokens inside each stage: activations (B/dp/m, T/sp, C) cross
stages between the ranks of the same (dp, sp) coordinates, the sharded attention runs within
the stage, and each stage's ZeroEngine spans its dp x sp group (parallel/pipeline_layout.py).
Checkpoints hold one set of shards per stage and resume at any layout (parameters are read
by name). ``--grad-accum`` composes (k pipeline passes per step); ``--micro-batches`` > 1
without ``--pp`` is refused (use --grad-accum). ``--trace FILE.json`` (any layout) writes a
Chrome trace of the run's second step: a row per rank, a box per forward, backward, weight
gradient, comm wait, dp reduction and optimizer step (open in https://ui.perfetto.dev).

Each step logs one line: loss, learning rate, ms/step, tokens/s, MFU and peak traced
memory. MFU (Chowdhery et al. 2022, PaLM appendix B; nanoGPT's estimate_mfu) =
flops_per_token * tokens/s / peak FLOP/s, with the peak measured at start-up by timing a
square matmul in the training dtype. Peak memory comes from tracemalloc, which sees every
NumPy allocation (see ``MemoryTracer`` for which steps are traced). ``--metrics FILE``
writes the same as JSON lines, plus ``val_loss`` on evaluation steps.

Bad input (a missing, empty or binary data file, data shorter than one block, an
impossible config, an unknown TOML key, a corrupt or mismatched checkpoint) prints one
line ``error: ...`` on stderr and exits with code 2 before anything is written. A NaN or
inf loss stops the run naming the step (exit code 1); the last checkpoint is untouched.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from collectives import Mesh, MeshError
from engine import backend, no_grad
from engine.checkpoint import list_checkpoints
from engine.config import ConfigError, build, parse_values
from engine.data import Batcher, DataError, load_dataset
from engine.io import CheckpointError
from engine.optim import cosine_lr
from engine.perf import MemoryTracer, measure_peak_flops
from models.gpt import GPT, GPTConfig
from parallel.checkpoint import check_params, load_sharded, open_checkpoint, save_sharded
from parallel.layout import ModelStep, sequence_parallel
from parallel.pipeline_layout import PipelineConfigError, PipelineStep, build_stage
from parallel.pipeline_layout import check_layout as check_pipeline
from parallel.pipeline.schedules import SCHEDULES
from parallel.trace import Tracer, write_chrome_trace
from parallel.sequence import SequenceParallelError, check_config
from parallel.data import ZeroEngine

EXIT_BAD_INPUT, EXIT_DIVERGED = 2, 1


class Diverged(RuntimeError):
    """The loss became NaN or inf."""


def _f(default, help, **meta):
    return field(default=default, metadata=dict(help=help, **meta))


ModelConfig = GPTConfig
MODEL_DEFAULTS = dict(block_size=128, vocab_size=0, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=True)
MODEL_HELP = dict(block_size="context length: learned positions, and the length of each training window",
                  vocab_size="vocabulary size; 0: the data's (byte 256, char: the corpus's characters, .bin: meta.json)",
                  n_layer="transformer blocks", n_head="attention heads (must divide n_embd)",
                  n_embd="embedding width C", dropout="dropout probability on embeddings and residual branches",
                  bias="biases in Linear and LayerNorm layers (GPT-2: yes)")


@dataclass
class ParallelConfig:
    """The parallel layout: dp * pp * sp must equal the number of MPI ranks."""
    dp: int = _f(1, "data-parallel replicas (the global batch is split among them)")
    zero: int = _f(0, "ZeRO stage over the dp (x sp) ranks: 0 DDP, 1 optimizer state, 2 + gradients, "
                      "3 + parameters",
                   choices=(0, 1, 2, 3))
    pp: int = _f(1, "pipeline stages: the layers are cut into pp stages, each batch into micro-batches "
                    "(ZeRO stage 0 or 1 over dp x sp)")
    micro_batches: int = _f(0, "micro-batches per batch in the pipeline (0: pp); batch_size / dp must divide by it",
                            metavar="M")
    schedule: str = _f("1f1b", "pipeline schedule: gpipe (all forwards, then all backwards), 1f1b, interleaved "
                               "(--virtual-stages chunks per rank), zb-h1 (zero bubble: backward split in B and W)",
                       choices=SCHEDULES)
    virtual_stages: int = _f(1, "model chunks per pp rank (the interleaved schedule; n_layer must divide by pp * v)",
                             metavar="V")
    sp: int = _f(1, "sequence-parallel ranks: each sequence's block_size tokens are split over them "
                    "(block_size must divide by sp for ulysses, by 2 sp for ring); ZeRO then shards over dp*sp")
    sp_attention: str = _f("ring", "attention across the sp ranks: ring (K/V blocks pass around a ring, zigzag "
                                   "split) or ulysses (all-to-all to head sharding; any head count)",
                           choices=("ring", "ulysses"))
    bucket_mb: float = _f(1.0, "gradient bucket size in MiB (each bucket is reduced as soon as backward fills it)")
    comm_timeout: float = _f(300.0, "seconds a collective waits for a missing rank before aborting the job, "
                                    "when there are several ranks (0: no watchdog)")


@dataclass
class TrainConfig:
    data: str = _f("", "UTF-8 text file, or nanoGPT-style uint16 .bin token file; '' = this Python's stdlib sources",
                   metavar="PATH")
    tokenizer: str = _f("byte", "tokenizer for text data", choices=("byte", "char"))
    val_fraction: float = _f(0.1, "fraction of the tokens (the last ones) held out for validation")
    batch_size: int = _f(12, "sequences per step")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(250, "optimizer steps in total (the cosine schedule ends here)")
    lr: float = _f(2e-3, "peak learning rate")
    min_lr: float = _f(2e-4, "learning rate at the end of the cosine decay")
    warmup: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (Linear weights only)")
    betas: tuple[float, float] = _f((0.9, 0.99), "AdamW beta1 beta2", metavar="B")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = _f(50, "steps between validation losses (0: only at the end)")
    eval_iters: int = _f(10, "validation batches per evaluation")
    log_interval: int = _f(1, "steps between log lines")
    ckpt_interval: int = _f(100, "steps between checkpoints (0: only at the end)")
    keep: int = _f(3, "checkpoints kept in out_dir (0: all)")
    out_dir: str = _f("out", "directory of the checkpoints step_<N>/ and latest", metavar="DIR")
    resume: str = _f("", "resume from a checkpoint: an out dir (its latest) or a step_<N> dir",
                    metavar="DIR")
    overwrite: bool = _f(False, "start afresh even though out_dir holds checkpoints (they are deleted "
                                "once the first new one is written)")
    seed: int = _f(1337, "seed of the initialisation, the batches and dropout")
    dtype: str = _f("float32", "parameter and activation dtype", choices=("float32", "float64"))
    device: str = _f("cpu", "cpu (NumPy) or gpu (CuPy)", choices=("cpu", "gpu"))
    metrics: str = _f("", "write one JSON line per step to this file", metavar="FILE")
    mem_trace_interval: int = _f(25, "trace memory (tracemalloc) on step 1 and every N steps; 1: every step")
    trace: str = _f("", "write a Chrome trace (Perfetto, chrome://tracing) of this run's second step (its first if "
                        "it runs one): a row per rank, a box per forward, backward, weight-gradient, comm wait, "
                        "dp reduction and optimizer step", metavar="FILE.json")


SECTIONS = (("model", ModelConfig), ("parallel", ParallelConfig), ("train", TrainConfig))


def parse_configs(argv):
    """(model field values, ParallelConfig, TrainConfig). The GPTConfig is built once the
    data gives the vocabulary (vocab_size 0 = the data's); it is validated now."""
    values = parse_values(argv, SECTIONS, description=__doc__, defaults={"model": MODEL_DEFAULTS}, helps=MODEL_HELP)
    model = values["model"]
    need(model["vocab_size"] >= 0, f"vocab_size must be >= 0, got {model['vocab_size']}")
    build(GPTConfig, dict(model, vocab_size=model["vocab_size"] or 1), "model")
    par, cfg = build(ParallelConfig, values["parallel"], "parallel"), build(TrainConfig, values["train"], "train")
    validate(par, cfg)
    try:                                  # every window of block_size tokens is split over the sp ranks
        check_config(par.sp, par.sp_attention, model["block_size"], block_size=model["block_size"])
    except SequenceParallelError as e:
        raise ConfigError(f"--sp {par.sp} --sp-attention {par.sp_attention} splits each window of --block-size "
                          f"{model['block_size']} tokens: {e}") from None
    if par.micro_batches == 0:            # default: one micro-batch per stage
        par.micro_batches = par.pp
    try:                                  # the layers are cut into pp (x v) stages, the batch into micro-batches
        check_pipeline(model["n_layer"], par.pp, par.schedule, par.micro_batches, par.virtual_stages, par.zero,
                       cfg.batch_size // par.dp, sparse_ffn=bool(model.get("ffn_sparsity")))
    except PipelineConfigError as e:
        raise ConfigError(str(e)) from None
    need(par.sp == 1 or not model.get("qkv_modules"), f"--sp {par.sp} with --qkv-modules {model.get('qkv_modules')}: "
         "the sparse QKV layer convolves over neighbouring positions, which sequence shards split; use --sp 1")
    return model, par, cfg


def need(ok, msg):
    if not ok:
        raise ConfigError(msg)


def validate(par, cfg):
    for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_interval", "ckpt_interval", "keep", "seed", "weight_decay", "grad_clip"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(0 < cfg.val_fraction < 1, f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    need(0 <= cfg.min_lr <= cfg.lr, f"min_lr must lie in [0, lr={cfg.lr}], got {cfg.min_lr}")
    need(all(0 <= b < 1 for b in cfg.betas), f"betas must lie in [0, 1), got {cfg.betas}")
    need(cfg.eps > 0, f"eps must be positive, got {cfg.eps}")
    need(cfg.mem_trace_interval >= 1, f"mem_trace_interval must be >= 1, got {cfg.mem_trace_interval}")
    for name in ("dp", "pp", "sp"):
        need(getattr(par, name) >= 1, f"{name} must be >= 1, got {getattr(par, name)}")
    need(not cfg.trace or os.path.isdir(os.path.dirname(os.path.abspath(cfg.trace))),
         f"trace {cfg.trace}: its directory does not exist")
    need(par.micro_batches >= 0, f"micro_batches must be >= 0, got {par.micro_batches}")
    need(par.virtual_stages >= 1, f"virtual_stages must be >= 1, got {par.virtual_stages}")
    need(cfg.batch_size % par.dp == 0, f"batch_size {cfg.batch_size} is not divisible by dp {par.dp}: each "
         "data-parallel rank takes an equal slice of the global batch")
    need(par.bucket_mb > 0, f"bucket_mb must be positive, got {par.bucket_mb}")
    need(par.comm_timeout >= 0, f"comm_timeout must be >= 0, got {par.comm_timeout}")


# ---------------------------------------------------------------------------- set-up
def env_rank():
    """This process's world rank from the launcher's environment (0 without mpiexec), known
    before MPI starts: bad configuration is reported by rank 0 only."""
    for k in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def env_world():
    return max(int(os.environ.get(k, "1")) for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


class Run:
    """Everything a training run holds: configs, data, model, the data-parallel engine
    (``dp``: parallel/data/zero.py, also for one process), its flat buffers and optimizers."""

    def __init__(self, model_cfg, par, cfg, data, model, mesh, engine, batcher):
        self.model_cfg, self.par, self.cfg, self.data = model_cfg, par, cfg, data
        self.model, self.mesh, self.dp, self.batcher = model, mesh, engine, batcher
        self.flat, self.opts = engine.flat, engine.optim
        self.rank, self.world = mesh.world.rank, mesh.world.size
        self.is_main = self.rank == 0
        self.step, self.resumed_from, self.last_ckpt = 0, None, None
        self.seq = None                     # SequenceParallel when sp > 1 (parallel/layout.py)
        self.pipe = None                    # PipelineStep when pp > 1 (parallel/pipeline_layout.py)
        self.stepper = None                 # run.pipe, or a ModelStep (parallel/layout.py): one interface
        self.tracer = None                  # parallel.trace.Tracer during the --trace step
        self.discard_old = cfg.overwrite and not cfg.resume   # --overwrite: old checkpoints go at the first save

    def local(self, x):
        """This dp rank's slice of a global batch: rows [r B/dp, (r+1) B/dp) of (B, T)."""
        b = x.shape[0] // self.mesh.dp_size
        r = self.mesh.dp_rank
        return backend.to_device(x[r * b:(r + 1) * b])                # (B/dp, T)


def prepare(argv):
    """Parse, load and check everything that bad input can break; write nothing."""
    model_values, par, cfg = parse_configs(argv)
    if env_world() > 1 and par.comm_timeout > 0:                # read when the Communicators are made
        os.environ.setdefault("ENGINE_COMM_TIMEOUT", f"{par.comm_timeout:g}")
    try:
        mesh = Mesh(dp=par.dp, pp=par.pp, sp=par.sp)
    except MeshError as e:
        raise ConfigError(str(e)) from None
    try:
        backend.set_device(cfg.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    vocab = model_values["vocab_size"]
    data = load_dataset(cfg.data or None, cfg.tokenizer, cfg.val_fraction, model_values["block_size"],
                        vocab_size=vocab or None)
    if vocab and vocab < data.vocab_size:
        raise ConfigError(f"vocab_size {vocab} is smaller than the data's vocabulary ({data.vocab_size})")
    model_cfg = build(GPTConfig, dict(model_values, vocab_size=vocab or data.vocab_size), "model")

    ckpt = None
    if cfg.resume:
        ckpt = open_checkpoint(cfg.resume, mesh.world)          # manifest, shard sizes and sha256
        where = f"checkpoint {ckpt.path}"
        if ckpt.manifest.get("tokenizer") != data.tokenizer.to_json():
            raise CheckpointError(f"{where} was trained with another tokenizer or vocabulary than the data gives")
        saved_dtype = ckpt.manifest.get("config", {}).get("train", {}).get("dtype")
        if saved_dtype != cfg.dtype:
            raise CheckpointError(f"{where} was trained in {saved_dtype}, not --dtype {cfg.dtype}")
        if ckpt.step >= cfg.max_steps:
            raise ConfigError(f"{where} is at step {ckpt.step} >= max_steps {cfg.max_steps}; raise --max-steps")
    inside = ckpt is not None and os.path.realpath(ckpt.path).startswith(os.path.realpath(cfg.out_dir) + os.sep)
    if list_checkpoints(cfg.out_dir) and not inside and not cfg.overwrite:
        raise ConfigError(f"out_dir {cfg.out_dir} already holds checkpoints; pass --resume {cfg.out_dir} "
                          "to continue, --overwrite to replace them, or another --out-dir")

    model = GPT(model_cfg, np.random.default_rng(cfg.seed))
    if cfg.dtype != "float32":
        model.astype(cfg.dtype)
    if (mesh.dp_size > 1 or mesh.sp_size > 1 or mesh.pp_size > 1) and model_cfg.dropout > 0:   # each rank its masks
        key = [cfg.seed, mesh.dp_rank] + ([mesh.sp_rank] if mesh.sp_size > 1 else []) + \
            ([mesh.pp_rank] if mesh.pp_size > 1 else [])
        model.dropout_rng = np.random.default_rng(key)
    # the sparse FFN's Gumbel noise is drawn row-major over the global batch: this rank's rows
    # are slice dp_rank of it (equal to one process's noise; under sp a distinct slice per rank)
    model.batch_shard = mesh.dp_rank * mesh.sp_size + mesh.sp_rank
    if ckpt is not None:                                  # names, shapes, dtypes, before any allocation
        check_params(ckpt, model.named_parameters())
    stage = build_stage(mesh, model, par.virtual_stages) if mesh.pp_size > 1 else None   # pp > 1: this rank's layers
    comm, seq = sequence_parallel(mesh, model, par.sp_attention)   # sp > 1: the engine spans dp x sp (of its stage)
    engine = ZeroEngine(model if stage is None else stage, comm, stage=par.zero, lr=cfg.lr, betas=tuple(cfg.betas),
                        eps=cfg.eps, weight_decay=cfg.weight_decay, bucket_bytes=int(par.bucket_mb * 2**20))
    batcher = Batcher(data.train, cfg.batch_size, model_cfg.block_size, seed=cfg.seed)
    run = Run(model_cfg, par, cfg, data, model, mesh, engine, batcher)
    run.seq = seq
    if stage is not None:                                 # parallel/pipeline_layout.py: pp x dp (x sp), ZeRO 0-1
        run.pipe = PipelineStep(mesh, model_cfg, stage, engine, par.schedule, par.micro_batches, par.virtual_stages,
                                seq=seq)
    run.stepper = run.pipe if run.pipe is not None else ModelStep(engine, seq)
    if ckpt is not None:
        restore(run, ckpt)
    return run


def restore(run, ckpt):
    """Parameters, AdamW moments, batcher and dropout generator from a sharded checkpoint
    (parallel/checkpoint/sharded.py) saved at any dp, pp and ZeRO stage: each rank reads the saved shards
    overlapping its own range (another layout: each parameter by name from the stage that saved
    it). A collective; a bad shard fails every rank alike."""
    where, eng = f"checkpoint {ckpt.path}", run.dp
    state, manifest, mine = load_sharded(ckpt.path, eng.comm, eng.flat, verify=False,   # prepare() verified
                                         **pipeline_layout(run))
    eng.load_shard_state(state)
    try:
        run.batcher.load_state_dict({"rng": manifest["rng"]["data"], "position": manifest["data"]["position"]})
        # dropout: each rank its own generator at the same rank count; one process takes rank 0's
        drop = mine["dropout"] if mine is not None else manifest["rng"]["dropout"] if run.world == 1 else None
        if drop is not None:
            run.model.dropout_rng.bit_generator.state = drop
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: bad RNG or data state in the manifest ({type(e).__name__}: {e})") from None
    run.step, run.resumed_from = ckpt.step, ckpt.path


def pipeline_layout(run):
    """With pp > 1 a checkpoint is saved and loaded by every rank of every stage (group: the
    world), each stage's dp (x sp) group holding its own shards (stage: (pp rank, pp))."""
    if run.pipe is None:
        return {}
    return {"group": run.mesh.world, "stage": (run.mesh.pp_rank, run.mesh.pp_size)}


def save(run, rec):
    """Every rank writes its shard of parameters and AdamW state, rank 0 the manifest, into
    out_dir/step_<N>, published atomically once all are fsynced (parallel/checkpoint/sharded.py);
    every rank returns its path. ENGINE_TEST_KILL_AT_STEP=k (tests only) SIGKILLs rank
    ENGINE_TEST_KILL_RANK (default: the last) right after the step-k checkpoint."""
    cfg, eng = run.cfg, run.dp
    rng = run.model.dropout_rng
    drop = rng.bit_generator.state if hasattr(rng, "bit_generator") else None
    manifest = {
        "config": {"model": asdict(run.model_cfg), "parallel": asdict(run.par), "train": asdict(cfg)},
        "tokenizer": run.data.tokenizer.to_json(),
        "rng": {"data": run.batcher.rng.bit_generator.state, "dropout": drop},   # numpy Generator states (JSON)
        "data": {"source": run.data.source, "position": run.batcher.position,
                 "train_tokens": len(run.data.train), "val_tokens": len(run.data.val)},
        "metrics": rec}
    path = save_sharded(cfg.out_dir, run.step, eng.comm, eng.flat, eng.shard_state(), manifest,
                        per_rank={"dropout": drop}, keep=cfg.keep or None, **pipeline_layout(run))
    if run.discard_old and run.is_main:                  # --overwrite: the previous run's checkpoints go
        for _, old in list_checkpoints(cfg.out_dir):
            if os.path.abspath(old) != os.path.abspath(path):
                shutil.rmtree(old, ignore_errors=True)
    run.discard_old = False
    if os.environ.get("ENGINE_TEST_KILL_AT_STEP") == str(run.step) and \
            run.rank == int(os.environ.get("ENGINE_TEST_KILL_RANK", run.world - 1)):
        print(f"rank {run.rank}: killed after the step {run.step} checkpoint (ENGINE_TEST_KILL_AT_STEP)", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return path


# ---------------------------------------------------------------------------- loop
def evaluate(run):
    """Mean loss over eval_iters fixed validation batches (the same windows every time; each
    dp rank evaluates its slice, the means are averaged)."""
    cfg = run.cfg
    batcher = Batcher(run.data.val, cfg.batch_size, run.model_cfg.block_size, seed=cfg.seed + 1)
    run.model.eval()
    with no_grad():                                        # pp > 1: forward only through the stages
        losses = [run.stepper.eval_loss(run.local(x), run.local(y))
                  for x, y in (batcher.next() for _ in range(cfg.eval_iters))]
    run.model.train()
    return float(run.mesh.dp_comm.all_reduce(np.array([np.mean(losses)]), op="avg")[0])


def train_step(run, lr):
    """One optimizer step: grad_accum forward/backward passes (each rank on its slice of the
    global batch; gradients reduced during the last backward), clipping, AdamW. Returns
    (mean loss over the global batch, gradient norm); raises Diverged on a NaN or inf loss,
    before the update."""
    cfg, eng, tr = run.cfg, run.dp, run.tracer
    eng.zero_grad()
    total = 0.0
    with np.errstate(over="ignore", invalid="ignore"):      # divergence is reported once, below
        for k in range(cfg.grad_accum):
            x, y = run.batcher.next()                                   # (B, T), (B, T): the global batch
            # (B/dp, T) on this rank; sp: T/sp tokens each; pp: micro-batches through the stages
            total += run.stepper.forward_backward(run.local(x), run.local(y), scale=1.0 / cfg.grad_accum,
                                                  last=k == cfg.grad_accum - 1)
        if run.world > 1:
            total = float(run.mesh.dp_comm.all_reduce(np.array([total]), op="avg")[0])
        if not math.isfinite(total):
            raise Diverged(f"loss is {total / cfg.grad_accum} at step {run.step}; stopping before the update")
        t0 = time.perf_counter()
        norm = run.stepper.clip_grad_norm(cfg.grad_clip)
        if not math.isfinite(norm):
            raise Diverged(f"gradient norm is {norm} at step {run.step}; stopping before the update")
        eng.step(lr)
        if tr is not None:
            tr.add("optim", 0, 0, t0, time.perf_counter())
    backend.synchronize()
    return total / cfg.grad_accum, norm


def start_trace(run):
    """Record this step's actions on every rank (parallel/trace.py; a barrier aligns the clocks)."""
    run.tracer = run.stepper.tracer = Tracer().start(run.mesh.world)


def write_trace(run):
    """Gather the step's events over the world; rank 0 writes the Chrome trace atomically."""
    mesh = run.mesh
    labels = [f"rank {r} (" + ", ".join(f"{a} {c}" for a, c in mesh.coords_of(r).items() if mesh.shape[a] > 1)
              + ")" if run.world > 1 else "rank 0" for r in range(run.world)]
    write_chrome_trace(run.cfg.trace, run.tracer, mesh.world, labels)
    run.tracer = run.stepper.tracer = None


def train(run, tracer):
    cfg, model, T = run.cfg, run.model, run.model_cfg.block_size
    say = print if run.is_main else (lambda *a, **k: None)
    tracer.every = cfg.mem_trace_interval
    peak = measure_peak_flops(cfg.dtype) * run.world
    flops_per_token = model.flops_per_token()
    tokens_per_step = cfg.batch_size * T * cfg.grad_accum
    say(f"model: {model.num_params():,} parameters | {asdict(run.model_cfg)}")
    say(f"data: {run.data.source} | {type(run.data.tokenizer).__name__} vocab {run.data.vocab_size} | "
        f"train {len(run.data.train):,} val {len(run.data.val):,} tokens | {tokens_per_step} tokens/step")
    if run.world > 1:
        par = run.par
        sp = f" sp={par.sp} ({par.sp_attention} attention)" if run.seq else ""
        tok = f" of {T // par.sp} tokens" if run.seq else ""
        pp = (f" pp={par.pp} ({par.schedule}, {par.micro_batches} micro-batches"
              + (f", {par.virtual_stages} chunks per rank" if par.virtual_stages > 1 else "") + ")") if run.pipe else ""
        say(f"layout: {run.world} ranks, dp={par.dp}{sp}{pp} ZeRO stage {par.zero} | "
            f"{cfg.batch_size // par.dp // (par.micro_batches if run.pipe else 1)} sequences{tok} per rank per "
            f"micro-batch | buckets {run.dp.buckets.describe()}")
        # the launcher reports a rank killed by a signal by its PID: this line maps PIDs to ranks
        pids = run.mesh.world.all_gather(np.array([os.getpid()], dtype=np.int64))
        say("pids: " + " ".join(f"rank {r}={int(p)}" for r, p in enumerate(pids)))
    say(f"mfu: peak {peak / 1e9:.1f} GFLOP/s measured ({cfg.dtype} matmul, {cfg.device}"
        + (f", {run.world} ranks" if run.world > 1 else "") + f"), "
        f"{flops_per_token / 1e6:.2f} MFLOP/token | mem: tracemalloc peak"
        + (" (largest rank)" if run.world > 1 else "") + ", "
        + ("every step" if tracer.every == 1 else f"traced on the first step and every {tracer.every}th step only"))
    if run.resumed_from:
        say(f"resumed from {run.resumed_from} at step {run.step}")
    if run.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = open(cfg.metrics, "a" if run.resumed_from else "w") if cfg.metrics and run.is_main else None
    model.train()
    run.last_ckpt = run.resumed_from
    trace_step = run.step + min(2, cfg.max_steps - run.step) if cfg.trace else None   # the second step, warm
    try:
        while run.step < cfg.max_steps:
            run.step += 1
            step = run.step
            lr = cosine_lr(step - 1, cfg.lr, cfg.warmup, cfg.max_steps, cfg.min_lr)
            if step == trace_step:
                start_trace(run)
            tracer.begin(step)
            t0 = time.perf_counter()
            try:
                loss, norm = train_step(run, lr)
            except Diverged as e:
                raise Diverged(f"{e} (last good checkpoint: {run.last_ckpt or 'none written'})") from None
            dt = time.perf_counter() - t0
            mem = tracer.end()
            if run.world > 1:                            # the slowest rank's time, the largest peak
                dt, mem = (float(v) for v in run.mesh.world.all_reduce(np.array([dt, mem], np.float64), op="max"))
            rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "ms_per_step": dt * 1e3,
                   "tokens_per_s": tokens_per_step / dt, "mfu": flops_per_token * tokens_per_step / dt / peak,
                   "peak_bytes": int(mem)}
            last = step == cfg.max_steps
            if step % cfg.log_interval == 0 or last:
                say(f"step {step:5d} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1e3:7.1f} ms | "
                    f"{rec['tokens_per_s']:7.0f} tok/s | mfu {100 * rec['mfu']:5.2f}% | "
                    f"mem {rec['peak_bytes'] / 2**20:6.1f} MiB", flush=True)
            if step == trace_step:
                write_trace(run)
                say(f"step {step:5d} | trace {cfg.trace}", flush=True)
            if (cfg.eval_interval and step % cfg.eval_interval == 0) or last:
                rec["val_loss"] = evaluate(run)
                say(f"step {step:5d} | val loss {rec['val_loss']:.4f}", flush=True)
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            if (cfg.ckpt_interval and step % cfg.ckpt_interval == 0) or last:
                run.last_ckpt = save(run, rec)
                say(f"step {step:5d} | checkpoint {run.last_ckpt}", flush=True)
    finally:
        if metrics:
            metrics.close()
    return 0


def main(argv=None):
    tracer = MemoryTracer()                 # first, so the resident state is traced too
    main_rank = env_rank() == 0
    try:
        run = prepare(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError, CheckpointError) as e:
        if main_rank:                       # every rank fails alike; one line is enough
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return train(run, tracer)
    except Diverged as e:
        if run.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print(f"interrupted at step {run.step}; resume from the last checkpoint: "
              f"{run.last_ckpt or 'none written'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
