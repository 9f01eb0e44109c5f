"""How train.py composes pipeline parallelism with data parallelism, ZeRO and sequence
parallelism in one step.

Mesh(dp, pp, sp) (collectives/mesh.py: world rank = (pp_rank * dp + dp_rank) * sp + sp_rank)
gives every rank a pp group (the stages of its replica at its sp coordinate), a dp group
and an sp group (the ranks of its stage). Every rank builds the whole GPT from the seed, so
its parameters are one process's; it keeps the layers of its stage
(parallel/pipeline/stage.py) and releases the others' arrays. A ZeroEngine over the stage's
dp x sp group (parallel/layout.py grad_comm: mesh.dp_comm when sp = 1) owns the stage's
parameters (its own flat buffer: each stage has its own layout), a PipelineEngine runs the
micro-batches (Huang et al. 2019 GPipe; Narayanan et al. 2021 1F1B and interleaved; Qi et
al. 2023, arXiv 2401.10241, ZB-H1):

    x, y (B, T)   global batch, drawn identically on every rank
    rows          (B/dp, T)        this dp replica's slice (train.py Run.local), the same on
                                   every sp rank of the replica
    micro-batch   (B/dp/m, T/sp)   what one F or B of the schedule sees: rows cut into m, then
                                   tokens sharded over sp (SequenceParallel.shard_batch: zigzag
                                   for ring attention, Liu et al. 2023; contiguous for Ulysses,
                                   Jacobs et al. 2023), with their global positions
    activation    (B/dp/m, T/sp, C) what crosses a stage boundary, between the ranks of the
                                   same (dp, sp) coordinates

Under sp the last stage's loss is each rank's share, sum of its local CE / the micro-batch's
target count, times loss_scale = sp (parallel/layout.py), and times 1/m as the mean is; the
logged loss is the shares summed over sp / sp, the one-process mean. Attention is the
sharded one SequenceParallel installed in the blocks, run inside each stage on its sp group.

One optimizer step, ZeRO stage 0 or 1:

    eng.buckets.enabled = False      every micro-batch only accumulates into the stage's flat
    pipe.step_grads(x, y)            gradient; the tied wte gradient is summed between the first
                                     and last stage of the same (dp, sp) coordinates (all-reduce
                                     over the pair)
    eng.finish_grads()               then averaged over dp x sp in one go: all-reduce (stage 0)
                                     or reduce-scatter to the owned shards (stage 1)
    norm^2 = sum over pp and dp x sp of each rank's shard of squares, wte counted once (first stage)
    eng.clip_grad_norm(c, norm); eng.step(lr)     AdamW on the shard; stage 1 all-gathers

Sums commute with averages, so the stage's gradient is 1/(dp sp) sum_{d,s} sp g_{d,s}, exactly
the one-process gradient of its parameters (tests/test_pp_train.py: within 1e-10 in float64,
with and without sp), and so are the norm, the clipping and the update; both copies of wte
get the same gradient and the same update.

ZeRO stages 2 and 3 are refused (``check_layout``), as DeepSpeed allows only ZeRO-1 with
pipeline parallelism: stage 2 keeps no full gradient, so it reduce-scatters during every
backward, that is once per micro-batch (m times the traffic) and in an order the schedule
interleaves across micro-batches and, with v chunks, across buckets; its tied-wte gradient
would be a shard at different flat offsets on the first and last stage, so the pair could
not simply be all-reduced. Stage 3 gathers each layer in forward and again in backward for
every micro-batch. A sparse FFN is refused too (its noise is drawn per layer call).

Memory per rank: the stage's parameters (about P/pp, plus wte on the first and last), its
gradient and AdamW state (stage 1: over dp x sp), and the schedule's activations
(parallel/pipeline/schedules.py activation_bound), each T/sp tokens long under sp.
"""
import math
import time

import numpy as np

from engine.optim import grad_norm_sq

from .pipeline import PipelineEngine
from .pipeline.stage import PipelineConfigError, PipelineStage, check_config
from .data.zero import placeholder

TIED = "transformer.wte.weight"


def check_layout(n_layer, pp, schedule, micro_batches, virtual_stages, zero, batch_per_replica, sparse_ffn=False):
    """Raise PipelineConfigError (one line, identical on every rank, before any message) if
    train.py cannot run this pipeline layout; pp = 1 needs micro_batches = v = 1."""
    if pp == 1:
        if micro_batches > 1:
            raise PipelineConfigError(f"--micro-batches {micro_batches} needs --pp > 1; without a pipeline, "
                                      "accumulate gradients with --grad-accum (each step then draws that many batches)")
        if virtual_stages > 1:
            raise PipelineConfigError(f"--virtual-stages {virtual_stages} needs --pp > 1 and --schedule interleaved")
        return
    check_config(n_layer, pp, schedule, micro_batches, virtual_stages)
    if zero >= 2:
        raise PipelineConfigError(f"--zero {zero} with --pp {pp} is not supported: ZeRO-2/3 reduce-scatter the "
                                  "gradients during every backward, once per micro-batch, and shard the tied wte "
                                  "at different offsets on the first and last stage; use --zero 1 (DeepSpeed "
                                  "likewise allows only ZeRO-1 with pipeline parallelism)")
    if sparse_ffn:
        raise PipelineConfigError(f"--pp {pp} with a sparse FFN (--ffn-sparsity) is not supported: its noise is "
                                  "drawn once per layer call, and the pipeline calls each layer once per "
                                  "micro-batch on its own rank, so the run would not equal one process")
    try:
        check_config(n_layer, pp, schedule, micro_batches, virtual_stages, batch_size=batch_per_replica)
    except PipelineConfigError as e:
        raise PipelineConfigError(f"{e} (batch_size / dp = {batch_per_replica} sequences per replica)") from None


def build_stage(mesh, model, virtual_stages=1):
    """This rank's PipelineStage of ``model`` (the whole GPT, built from the seed on every
    rank); the parameters of the other stages are released (read-only placeholders that
    keep their shapes, so the model still counts its parameters and FLOPs)."""
    stage = PipelineStage(model, mesh.pp_rank, mesh.pp_size, virtual_stages)
    mine = {id(p) for p in stage.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data, p.grad = placeholder(p.data.shape, p.data.dtype), None
    return stage


class PipelineStep:
    """One training or evaluation step of a pipeline stage under data parallelism (the
    interface of parallel/layout.py ModelStep, its pp = 1 counterpart).

    engine   the ZeroEngine (stage 0 or 1) over the stage's dp (x sp) group that owns ``stage``'s
             parameters
    pipe     the PipelineEngine over mesh.pp_comm (schedule, micro-batches, virtual stages, and
             ``seq``: the SequenceParallel of the stage's sp group, or None)
    ``tracer`` (parallel/trace.py), when set, also records the dp reduction."""

    def __init__(self, mesh, model_cfg, stage, engine, schedule, micro_batches, virtual_stages=1, seq=None):
        self.mesh, self.stage, self.engine = mesh, stage, engine
        self.pipe = PipelineEngine(mesh.pp_comm, model_cfg, stage, schedule, micro_batches, virtual_stages, seq)
        self.skip = TIED if stage.tied and not stage.is_first else None     # wte counted on the first stage

    @property
    def tracer(self):
        return self.pipe.tracer

    @tracer.setter
    def tracer(self, t):
        self.pipe.tracer = t

    def forward_backward(self, x, y, scale=1.0, last=True):
        """The micro-batches of x, y (B/dp, T) forward and backward; gradients accumulate
        (scaled by ``scale``: 1/k for k accumulated batches). With ``last``, the tied wte
        gradients are summed over the first and last stage and every gradient is averaged
        over dp (x sp). Returns this replica's mean loss (a float, on every rank of the pp group)."""
        eng = self.engine
        eng.buckets.enabled = False                  # ZeroEngine.backward(sync=False), per micro-batch
        loss = self.pipe.step_grads(x, y, scale=scale, sync_tied=last)
        if last:
            t0 = time.perf_counter()
            eng.buckets.enabled = True
            eng.finish_grads()                       # every bucket: all-reduce (0) / reduce-scatter (1)
            if self.tracer is not None:
                self.tracer.add("reduce", 0, 0, t0, time.perf_counter())
        return loss

    def grad_norm(self):
        """Global L2 norm of the whole model's averaged gradient: the squares of each rank's
        shard (the last stage leaving out its copy of wte), summed over dp (x sp) and over pp."""
        eng, total = self.engine, 0.0
        for dt, g in eng.grad_shards.items():
            lo, hi = eng.ranges[dt]
            pieces = [(lo, hi)]
            if self.skip is not None and eng.flat.index[self.skip][0] == dt:
                _, off, n, _ = eng.flat.index[self.skip]
                pieces = [(lo, min(hi, off)), (max(lo, off + n), hi)]      # [lo, hi) minus wte's range
            total += sum(grad_norm_sq(g[a - lo:b - lo]) for a, b in pieces if b > a)
        sq = np.array([total], dtype=np.float64)
        eng.comm.all_reduce(sq)                      # over dp (x sp): the stage's gradient
        self.mesh.pp_comm.all_reduce(sq)             # over pp: the model's
        return math.sqrt(float(sq[0]))

    def clip_grad_norm(self, max_norm):
        """Clip every stage's gradient by the global norm (both wte copies alike); returns it."""
        return self.engine.clip_grad_norm(max_norm, norm=self.grad_norm())

    def eval_loss(self, x, y):
        """This replica's mean loss of x, y (B/dp, T), forward only (under no_grad)."""
        return self.pipe.eval_loss(x, y)
