"""How train.py composes data parallelism / ZeRO with sequence parallelism in one step (and,
per pipeline stage, with pipeline parallelism: parallel/pipeline_layout.py).

Sequence parallelism (parallel/sequence/model.py: ring attention, Liu et al. 2023; Ulysses,
Jacobs et al. 2023) splits every sequence of a dp replica's batch over the sp ranks, so
rank (d, s) of the dp x sp grid holds rows [d B/dp, (d+1) B/dp) and tokens T/sp of them:

    x, y (B, T)  global batch, drawn identically on every rank
    rows         (B/dp, T)      this dp replica's slice (train.py Run.local)
    tokens       (B/dp, T/sp)   this sp rank's tokens (SequenceParallel.shard_batch)

Each rank's loss share is sum(local CE) / n_targets(replica batch), so sum over sp of the
shares is the replica's one-process mean loss. The parameter gradient must therefore be
SUMMED over sp and AVERAGED over dp. One collective does both: the ZeroEngine averages
over the dp x sp group (size dp * sp) and every share is scaled by sp (loss_scale=sp):

    grad = 1/(dp sp) sum_{d,s} sp * g_{d,s} = 1/dp sum_d (sum_s g_{d,s})

so ZeRO shards parameters, gradients and AdamW state over all dp * sp ranks (stage 3
gathers each layer over them; the layer's ring attention or all-to-all runs inside the
gather, on the sp communicator). The gradient norm, clipping and AdamW then see exactly
the one-process gradient. With sp = 1 nothing changes: the engine runs over dp and the
model's own forward is used.

    comm, seq = sequence_parallel(mesh, model, "ring")   # before building the engine
    eng = ZeroEngine(model, comm, stage=3, ...)
    loss, value = forward_loss(eng, seq, x, y)           # x, y (B/dp, T)
    eng.backward(loss)
    val = eval_loss(eng, seq, x, y)                      # the replica batch's mean loss

train.py does not call these directly: it drives a ModelStep (below), or with pp > 1 a
PipelineStep, which share one interface (forward_backward, clip_grad_norm, eval_loss).

With pipeline parallelism (pp > 1) the same holds stage by stage: grad_comm is the dp x sp
group of this rank's pp stage, its ZeroEngine owns only the stage's parameters, and the
SequenceParallel installed here is handed to the PipelineEngine, which shards every
micro-batch (B/dp/m, T) -> (B/dp/m, T/sp) and takes each rank's loss share, scaled by sp,
on the last stage (parallel/pipeline_layout.py); forward_loss and eval_loss are then unused.
"""
import time

from .sequence import SequenceParallel


def grad_comm(mesh):
    """The communicator gradients are averaged and ZeRO state sharded over: mesh.dp_comm
    when sp = 1, else this rank's dp x sp group (ordered dp-major: key dp_rank * sp + sp_rank;
    one group per (pp, tp) coordinate, so a pipeline stage's group holds only its own ranks)."""
    if mesh.sp_size == 1:
        return mesh.dp_comm
    c, s = mesh.coords, mesh.shape
    return mesh.world.split(c["pp"] * s["tp"] + c["tp"], key=c["dp"] * s["sp"] + c["sp"], label="dp x sp")


def sequence_parallel(mesh, model, mode):
    """(communicator for the ZeroEngine, SequenceParallel or None when sp = 1). Installs the
    sharded attention (ring or ulysses) in model's blocks, with each rank's loss share
    scaled by sp because the engine averages over dp x sp (see above)."""
    comm = grad_comm(mesh)
    if mesh.sp_size == 1:
        return comm, None
    return comm, SequenceParallel(mesh.sp_comm, model, mode=mode, loss_scale=mesh.sp_size)


def forward_loss(engine, seq, x, y):
    """(loss tensor to pass to engine.backward, this replica's one-process mean loss as a
    float) for x, y (B/dp, T). seq None: the engine's (model's) own forward."""
    if seq is None:
        _, loss = engine(x, y)
        return loss, loss.item()
    _, share = engine.forward_with(seq.forward, seq.shard_batch(x, y))   # tokens (B/dp, T/sp)
    return share, seq.global_loss(share)


def eval_loss(engine, seq, x, y):
    """The one-process mean loss of x, y (B/dp, T) (call under no_grad; sp: summed over sp)."""
    if seq is None:
        return engine(x, y)[1].item()
    return engine.forward_with(seq.evaluate, x, y)


class ModelStep:
    """One training or evaluation step of the whole local model (pp = 1) under dp / ZeRO and
    sp. The same interface as parallel/pipeline_layout.py's PipelineStep, so train.py runs
    either without asking which:

        value = step.forward_backward(x, y, scale=1/k, last=...)   # x, y (B/dp, T); a float
        norm = step.clip_grad_norm(max_norm)
        value = step.eval_loss(x, y)                                # under no_grad
        step.tracer = Tracer()                                      # records F and B (parallel/trace.py)

    engine: the ZeroEngine; seq: the SequenceParallel, or None when sp = 1."""

    def __init__(self, engine, seq=None):
        self.engine, self.seq, self.tracer = engine, seq, None
        self._k = 0                                  # index of the accumulated batch (trace rows)

    def forward_backward(self, x, y, scale=1.0, last=True):
        """Forward and backward of x, y (B/dp, T), the loss scaled by ``scale`` (1/k for k
        accumulated batches); with ``last`` the gradients are reduced over dp (x sp) during
        this backward. Returns this replica's one-process mean loss."""
        t0 = time.perf_counter()
        loss, value = forward_loss(self.engine, self.seq, x, y)       # sp: tokens (B/dp, T/sp)
        t1 = time.perf_counter()
        self.engine.backward(loss if scale == 1.0 else loss * scale, sync=last)
        if self.tracer is not None:                  # the whole model's F, B (B ends with the dp reduce)
            self.tracer.add("F", self._k, 0, t0, t1)
            self.tracer.add("B", self._k, 0, t1, time.perf_counter())
        self._k = 0 if last else self._k + 1
        return value

    def clip_grad_norm(self, max_norm):
        """Clip the averaged gradient by its global norm (<= 0: no-op); returns the norm."""
        return self.engine.clip_grad_norm(max_norm)

    def eval_loss(self, x, y):
        """This replica's one-process mean loss of x, y (B/dp, T) (call under no_grad)."""
        return eval_loss(self.engine, self.seq, x, y)
