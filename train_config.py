"""train.py's flags and their checks: TrainConfig (the training loop's fields), the model's
defaults for ``python train.py``, and parse_configs, which turns argv (flags, ``--config
FILE.toml``, ``--resume DIR``) into checked GPTConfig values, a ParallelConfig and a TrainConfig
before anything is loaded or any message moves. Imported by train.py and by elastic/plan.py,
which checks a job's flags without starting it.
"""
import math
from dataclasses import dataclass, field, fields

from collectives import ulfm
from collectives.launch import env_world
from engine import backend
from engine.config import ConfigError, build, parse_values
from models.gpt import GPTConfig
from parallel import LayoutError, ParallelConfig, check_layout
from parallel.config import check_offload_device
from parallel.checkpoint import policy


def _f(default, help, **meta):
    return field(default=default, metadata=dict(help=help, **meta))


# The defaults are the first run (issue 21): `python train.py` on the stdlib corpus in about 3
# minutes on an idle 2-core machine. Chosen by measurement (byte loss = nats per byte; cosine to
# lr/10 after 20 warm-up steps): every row trains for the same time, about 2m30s of steps on
# this machine at its default threads (step counts in proportion to 40-step timings), final val
# loss (the loss is the same at any thread count; the sweep ran two at a time, 1 thread each):
#   layers  block  batch  lr     steps  val       layers  block  batch  lr     steps  val
#   4       128    12     2e-3   1040   1.888     4       64     16     2e-3   1500   1.730
#   4       128     8     2e-3   1560   1.868     4       64      8     2e-3   2900   1.770
#   4       128     8     3e-3   1560   1.858     3       64     16     2e-3   2150   1.629
#   4       128     6     2e-3   2080   1.812     3       64     16     3e-3   2150   1.617
#   3       128    12     2e-3   1300   1.789     3       64     12     2e-3   2760   1.638
#   2       64     16     2e-3   3070   1.567     3       64     12     3e-3   2760   1.642
#   2       64     24     3e-3   1980   1.583     2       64     16     3e-3   3070   1.558  <- default
# (all 128 wide, 4 heads). At a fixed time, fewer and cheaper steps lose to more of them: depth
# and context cost more per step than they return within 3 minutes. The old default (4 layers,
# block 128, batch 12, 1600 steps) reached 1.6985 in 4m42s here.
MODEL_DEFAULTS = dict(block_size=64, vocab_size=0, n_layer=2, n_head=4, n_embd=128, dropout=0.0, bias=True)
MODEL_HELP = dict(block_size="context length: learned positions, and the length of each training window",
                  vocab_size="vocabulary size; 0: the data's (byte 256, char: the corpus's characters, .bin: meta.json)",
                  n_layer="transformer blocks", n_head="attention heads (must divide n_embd)",
                  n_embd="embedding width C", dropout="dropout probability on embeddings and residual branches",
                  bias="biases in Linear and LayerNorm layers (GPT-2: yes)")


@dataclass
class TrainConfig:
    data: str = _f("", "UTF-8 text file or nanoGPT .bin token file; '' = this Python's stdlib sources", metavar="PATH")
    tokenizer: str = _f("byte", "tokenizer for text data", choices=("byte", "char"))
    val_fraction: float = _f(0.1, "fraction of the tokens (the last ones) held out for validation")
    batch_size: int = _f(16, "sequences per step")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(3000, "optimizer steps in total (the cosine schedule ends here)")
    lr: float = _f(3e-3, "peak learning rate")
    min_lr: float = _f(3e-4, "learning rate at the end of the cosine decay")
    warmup: int = _f(20, "linear warm-up steps")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (Linear weights only)")
    betas: tuple[float, float] = _f((0.9, 0.99), "AdamW beta1 beta2", metavar="B")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)")
    eval_interval: int = _f(250, "steps between validation losses (0: only at the end)")
    eval_iters: int = _f(10, "validation batches per evaluation")
    log_interval: int = _f(1, "steps between log lines")
    ckpt_interval: int = _f(1000, "steps between checkpoints (0: only at the end)")
    keep: int = _f(3, "checkpoints kept in out_dir (0: all)")
    out_dir: str = _f("out", "directory of the checkpoints step_<N>/ and latest", metavar="DIR")
    resume: str = _f("", "continue from an out dir (its latest) or a step_<N> dir: its model, dtype, tokenizer, data",
                     metavar="DIR")
    overwrite: bool = _f(False, "replace out_dir's checkpoints (--resume from it: the newer) at the first save")
    good_factor: float = _f(4.0, "good checkpoint: loss finite, <= this x the run's lowest (0: any); --keep keeps it")
    seed: int = _f(1337, "seed of the initialisation, the batches and dropout")
    dtype: str = _f("float32", "parameter and activation dtype", choices=("float32", "float64"))
    device: str = _f(backend.default_device(), "cpu (NumPy) or gpu (CuPy); default: $ENGINE_DEVICE, else cpu", choices=("cpu", "gpu"))
    metrics: str = _f("", "write one JSON line per step to this file", metavar="FILE")
    mem_trace_interval: int = _f(25, "trace memory (tracemalloc) on step 1 and every N steps; 1: every step")
    replica_every: int = _f(0, "copy each rank's shard into a buddy rank's RAM every N steps, for python -m elastic "
                               "(parallel/checkpoint/replicas.py; 0: off)")
    replica_dir: str = _f("", "where buddy replicas live ('': /dev/shm/mte-replicas-<uid>)", metavar="DIR")
    on_failure: str = _f("abort", "when a rank dies: abort (python -m elastic relaunches the job) or shrink (go on "
                                  "with the survivors; Open MPI's ULFM)", choices=("abort", "shrink"))
    plot: str = _f("", "draw train and val loss against steps and tokens into this PNG at the end ('': "
                       "<out_dir>/loss.png when matplotlib is installed; off: none)", metavar="FILE.png")
    trace: str = _f("", "write a Chrome trace (Perfetto) of this run's second step (its first if it runs one): a "
                        "row per rank, a box per forward, backward, weight-gradient, comm wait, dp reduction, update",
                    metavar="FILE.json")


SECTIONS = (("model", GPTConfig), ("parallel", ParallelConfig), ("train", TrainConfig))


def need(ok, msg):
    """Raise ConfigError(msg) unless ok: the one-line error every rank prints (train.py main)."""
    if not ok:
        raise ConfigError(msg)


def parse_configs(argv, description=None):
    """(model field values, ParallelConfig, TrainConfig), every check passed. The GPTConfig is
    built once the data gives the vocabulary (vocab_size 0 = the data's); it is validated now."""
    values = parse_values(argv, SECTIONS, description=description, defaults={"model": MODEL_DEFAULTS}, helps=MODEL_HELP,
                          given=(given := {}))
    if values["train"].get("resume"):                           # the run's model, dtype, tokenizer, data
        policy.resume_values(values, given, values["train"]["resume"], [f.name for f in fields(GPTConfig)])
    model = values["model"]
    need(model["vocab_size"] >= 0, f"vocab_size must be >= 0, got {model['vocab_size']}")
    build(GPTConfig, dict(model, vocab_size=model["vocab_size"] or 1), "model")
    par, cfg = build(ParallelConfig, values["parallel"], "parallel"), build(TrainConfig, values["train"], "train")
    for name in ("batch_size", "grad_accum", "max_steps", "eval_iters", "log_interval", "eps", "mem_trace_interval"):
        need(getattr(cfg, name) > 0, f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup", "eval_interval", "ckpt_interval", "keep", "seed", "weight_decay", "grad_clip",
                 "good_factor", "replica_every"):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(not cfg.replica_every or env_world() > 1, "replica_every needs 2 or more ranks (a buddy holds each copy)")
    need(cfg.on_failure != "shrink" or ulfm.available(), "on_failure shrink needs an MPI that can shrink a job "
         f"(Open MPI 5 launched with --with-ft ulfm); this one is {ulfm.library()}")
    need(0 < cfg.val_fraction < 1, f"val_fraction must lie in (0, 1), got {cfg.val_fraction}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"lr must be a positive number, got {cfg.lr}")
    need(0 <= cfg.min_lr <= cfg.lr, f"min_lr must lie in [0, lr={cfg.lr}], got {cfg.min_lr}")
    need(all(0 <= b < 1 for b in cfg.betas), f"betas must lie in [0, 1), got {cfg.betas}")
    try:
        check_layout(par, model, cfg.batch_size)
        check_offload_device(par, cfg.device)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return model, par, cfg
