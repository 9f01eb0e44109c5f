"""How train.py composes data parallelism / ZeRO with sequence parallelism in one step (and,
per pipeline stage, with pipeline parallelism: parallel/pipeline_layout.py).

Sequence parallelism (parallel/sequence.py: ring attention, Liu et al. 2023; Ulysses,
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

With pipeline parallelism (pp > 1) the same holds stage by stage: grad_comm is the dp x sp
group of this rank's pp stage, its ZeroEngine owns only the stage's parameters, and the
SequenceParallel installed here is handed to the PipelineEngine, which shards every
micro-batch (B/dp/m, T) -> (B/dp/m, T/sp) and takes each rank's loss share, scaled by sp,
on the last stage (parallel/pipeline_layout.py); forward_loss and eval_loss are then unused.
"""
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
