"""build_step: the one place that composes data parallelism / ZeRO, sequence parallelism,
pipeline parallelism and tensor parallelism into one training step with one interface.

    step = build_step(model_cfg, par, train, mesh)     # every rank, the same arguments
    loss = step.forward_backward(batches, step=n)      # batches: grad_accum global (B, T) pairs
    norm = step.clip_grad_norm(1.0)
    step.update(lr)
    val = step.eval_loss(val_batches)                  # the one-process mean loss
    path = step.save(out_dir, n, manifest, keep); step.restore(opened_checkpoint)
    print(step.describe(batch_size))                 # the start-up banner's layout line

The mesh (collectives/mesh.py): world rank = ((pp_rank * dp + dp_rank) * sp + sp_rank) * tp
+ tp_rank. Every rank builds the whole GPT from the seed, so its parameters are one
process's; under pp it keeps its stage's layers (parallel/pipeline/stage.py) and releases the
others' arrays.

What each rank holds of a global batch x, y (B, T), drawn identically on every rank:

    rows          (B/dp, T)           replica d's rows [d B/dp, (d+1) B/dp)        (Step._local)
    tokens        (B/dp, T/sp)        sp rank s's tokens: zigzag for ring attention (Liu et al.
                                      2023), contiguous for Ulysses (Jacobs et al. 2023)
                                      (parallel/sequence/model.py SequenceParallel.shard_batch)
    micro-batch   (B/dp/m, T/sp)      pp > 1: rows cut into m, run by the schedule
                                      (parallel/pipeline/executor.py)
    activation    (B/dp/m, T/sp, C)   what crosses a stage boundary, between the ranks of the
                                      same (dp, sp) coordinates (mesh.pp_comm)

Which axis sums and which averages. Each sp rank's loss share is sum(local CE) / n_targets(
replica batch), so the shares summed over sp are the replica's one-process mean loss: the
gradient must be SUMMED over sp and AVERAGED over dp. One collective does both: the ZeroEngine
averages over mesh.group("dp", "sp") (size dp sp) and every share is scaled by sp:

    grad = 1/(dp sp) sum_{d,s} sp * g_{d,s} = 1/dp sum_d (sum_s g_{d,s})

so ZeRO shards parameters, gradients and AdamW state over all dp sp ranks (stage 3 gathers
each layer over them; the layer's ring attention or all-to-all runs inside the gather, on the
sp communicator). With grad_accum k, every pass's loss is scaled by 1/k and the reduction
runs once, in the last pass's backward (ZeroEngine.no_sync for the others; stages 2-3 reduce
every pass, as they keep no full gradient).

Pipeline (pp > 1; GPipe, Huang et al. 2019; 1F1B and interleaved, Narayanan et al. 2021;
ZB-H1, Qi et al. 2023, arXiv 2401.10241): the stage's ZeroEngine (stage 0 or 1) over its
dp x sp group owns only the stage's parameters (its own flat layout). Every micro-batch only
accumulates (no_sync); the last stage's loss is scaled by 1/m like the mean. Then:

    tied wte      the first and last stage each hold wte (Press & Wolf 2017); its gradient is
                  summed between them (mesh.pp_ends()) before the dp reduction
    reduction     engine.finish_grads(): all-reduce (stage 0) / reduce-scatter (stage 1) over dp x sp
    norm^2        sum over pp and dp x sp of each rank's shard of squares, the last stage leaving
                  out its copy of wte (ZeroEngine.grad_norm(exclude, also=(tp_comm, pp_comm)))
    update        AdamW on the shard, both copies of wte alike, so they stay equal

Sums commute with averages, so every stage's gradient is exactly the one-process gradient of
its parameters, and so are the norm, the clipping and the update. ZeRO 2-3 are refused under
pp (parallel/config.py): they would reduce-scatter once per micro-batch and shard wte at
different offsets on the two stages.

Tensor parallelism (tp > 1; Shoeybi et al. 2019, Megatron-LM): before anything else the
model is cut into this rank's Megatron slices (parallel/tensor/model.py shard_gpt: heads and
MLP units split, the tied wte split by vocabulary rows, the loss vocabulary-parallel), so
every rank of a tp group holds 1/tp of each matrix and the same LayerNorms, wpe and
row-parallel biases. The tp collectives run inside the layers' forward and backward, so
nothing above changes: ZeRO shards each tp rank's own slices over its dp x sp group
(mesh.group("dp", "sp") holds the ranks of one tp coordinate), the pipeline's peers and the
tied pair are per tp coordinate. The gradient norm sums over tp too, the replicated
parameters counted on tp rank 0 only (their gradients are equal on every tp rank). With
--tp-token-shards (Korthikanti et al. 2022's sequence-parallel regions) the residual stream,
LayerNorms and dropout hold tokens [r T/tp, (r+1) T/tp) of tp rank r, which is where the
step locates the noise (Step._token_positions); the replicated parameters' gradients are then
summed over tp inside their layers (copy_to_tp on the parameter), so they are equal again.

Compressed communication (ZeRO++ qwZ / qgZ, bf16; parallel/data/wire.py): ``wire_of(par)``
hands the ZeroEngine a Wire over the same dp x sp group, so the gathers and the gradient
reduce-scatter carry codes instead of float32; nothing else in the step changes (refused with
pp and tp by parallel/config.py).

Randomness (dropout, the sparse FFN's coin and Gumbel noise) is the model's counter-based
generator (engine/random.py): the step sets (step, accumulation pass), each forward sets the
global rows and token positions it computes, so every layout draws one process's numbers.

The loss reported is the mean over the grad_accum passes and the dp replicas (an all-reduce
over mesh.dp_comm), the validation loss likewise.
"""
import time

import numpy as np

from engine import backend, no_grad
from engine.flat import placeholder
from models.terraformer import build_model

from .checkpoint import check_params, load_sharded, save_sharded
from .checkpoint.reshard import shard_file
from .checkpoint.sharded import flat_layout, shard_tensors
from .data import Wire, ZeroEngine
from .pipeline import PipelineEngine, PipelineStage
from .sequence import SequenceParallel
from .tensor import shard_gpt
from .tensor.model import slice_specs
from .tensor.comm import token_range

TIED = "transformer.wte.weight"


def build_step(model_cfg, par, train, mesh):
    """The Step of this rank. model_cfg: GPTConfig; par: parallel/config.py ParallelConfig
    (checked); train: an object with seed, dtype, lr, betas, eps, weight_decay; mesh: the Mesh
    of par's shape. Builds the model from train.seed, installs sharded attention (sp > 1),
    keeps this rank's stage (pp > 1) and the ZeroEngine over the gradient group."""
    model = build_model(model_cfg, np.random.default_rng(train.seed))   # a GPT or a Terraformer
    if train.dtype != "float32":
        model.astype(train.dtype)
    replicated = []                                     # tp > 1: parameters every tp rank holds whole
    if mesh.tp_size > 1:                                # Megatron layers, this rank's slices (parallel/tensor/)
        replicated = shard_gpt(model, mesh.tp_comm, par.vocab_granule, tokens=par.tp_token_shards)
    grad_comm = mesh.group("dp", "sp")                  # ZeRO's group: sums over sp, averages over dp
    seq = None
    if mesh.sp_size > 1:                                # each share scaled by sp: see the docstring
        seq = SequenceParallel(mesh.sp_comm, model, mode=par.sp_attention, loss_scale=mesh.sp_size)
    stage = None
    if mesh.pp_size > 1:
        stage = PipelineStage(model, mesh.pp_rank, mesh.pp_size, par.virtual_stages)
        mine = {id(p) for p in stage.parameters()}
        for p in model.parameters():                    # other stages' layers: shapes only
            if id(p) not in mine:
                p.data, p.grad = placeholder(p.data.shape, p.data.dtype), None
    engine = ZeroEngine(model if stage is None else stage, grad_comm, stage=par.zero, lr=train.lr,
                        betas=tuple(train.betas), eps=train.eps, weight_decay=train.weight_decay,
                        bucket_bytes=int(par.bucket_mb * 2**20), wire=wire_of(par, grad_comm),
                        offload=par.offload, recompute=par.recompute)
    pipe = None
    if stage is not None:
        pipe = PipelineEngine(mesh.pp_comm, model_cfg, stage, par.schedule, par.micro_batches, par.virtual_stages,
                              seq, tie_comm=mesh.pp_ends())
    return Step(model, par, mesh, engine, seq=seq, stage=stage, pipe=pipe, replicated=replicated)


def wire_of(par, grad_comm):
    """The Wire (parallel/data/wire.py) of par's compression flags over the ZeRO group: what
    is not quantized travels as bf16 under --comm-dtype bf16 (a collective when two hops)."""
    bf16 = "bf16" if par.comm_dtype == "bf16" else None
    weights = par.quant_weights if par.quant_weights != "none" else bf16
    grads = par.quant_grads if par.quant_grads != "none" else bf16
    return Wire(grad_comm, weights=weights, grads=grads, block=par.quant_block, error_feedback=par.error_feedback,
                node_size=par.quant_node_size)


class Step:
    """One training step of this rank's part of the model, whatever the layout (see the
    module docstring). ``model`` is the whole GPT (for counting parameters and FLOPs; under
    pp the other stages' parameters are placeholders), ``engine`` the ZeroEngine, ``tracer``
    (parallel/trace.py) records the step's actions when set."""

    def __init__(self, model, par, mesh, engine, seq=None, stage=None, pipe=None, replicated=()):
        self.model, self.par, self.mesh, self.engine = model, par, mesh, engine
        self.seq, self.stage, self.pipe = seq, stage, pipe
        self.replicated = list(replicated)                   # tp: counted once, on tp rank 0
        self.module = model if stage is None else stage      # what this rank runs
        self.tracer = None

    @property
    def tracer(self):
        return self._tracer

    @tracer.setter
    def tracer(self, t):
        self._tracer = t
        if self.pipe is not None:
            self.pipe.tracer = t

    def _local(self, x):
        """This replica's rows of a global batch (B, T) -> (B/dp, T), and their indices (B/dp,)."""
        b, d = x.shape[0] // self.mesh.dp_size, self.mesh.dp_rank
        return x[d * b:(d + 1) * b], np.arange(d * b, (d + 1) * b)

    def _replica_mean(self, value):
        if self.mesh.dp_size == 1:
            return float(value)
        return float(self.mesh.dp_comm.all_reduce(np.array([value], dtype=np.float64), op="avg")[0])

    # -- training ----------------------------------------------------------------------------
    def forward_backward(self, batches, step=0):
        """Forward and backward of the global batches (x, y) (B, T) of one optimizer step
        (grad_accum of them), gradients reduced as the docstring says. Returns the mean loss
        over all of them (one process's value, on every rank)."""
        self.engine.zero_grad()
        k, total = len(batches), 0.0
        for i, (x, y) in enumerate(batches):
            self.model.noise.set_step(step, i)
            (x, rows), (y, _) = self._local(x), self._local(y)           # (B/dp, T) on this replica
            if self.pipe is not None:
                with self.engine.no_sync():                               # reduced once, below
                    total += self.pipe.step_grads(backend.to_device(x), backend.to_device(y), scale=1.0 / k,
                                                  sync_tied=i == k - 1, rows=rows)
            else:
                total += self._model_pass(x, y, rows, 1.0 / k, last=i == k - 1, index=i)
        if self.pipe is not None:
            t0 = time.perf_counter()
            self.engine.finish_grads()                                    # all-reduce (0) / reduce-scatter (1)
            if self.tracer is not None:
                self.tracer.add("reduce", 0, 0, t0, time.perf_counter())
        return self._replica_mean(total / k)

    def _model_pass(self, x, y, rows, scale, last, index):
        """pp = 1: the whole local model forward and backward on x, y (B/dp, T); returns the
        replica's one-process mean loss."""
        eng, seq, noise = self.engine, self.seq, self.model.noise
        t0 = time.perf_counter()
        if seq is None:
            with noise.located(rows, pos=self._token_positions(x.shape[1])):
                loss = eng(backend.to_device(x), backend.to_device(y))[1]
            value = loss.item()
        else:
            s = seq.shard_batch(x, y)                                     # tokens (B/dp, T/sp)
            with noise.located(rows):                                     # seq.forward locates the tokens
                loss = eng.forward_with(seq.forward, s)[1]
            value = seq.global_loss(loss)
        t1 = time.perf_counter()
        eng.backward(loss if scale == 1.0 else loss * scale, sync=last)
        if self.tracer is not None:                                       # F, and B with the dp reduction
            self.tracer.add("F", index, 0, t0, t1)
            self.tracer.add("B", index, 0, t1, time.perf_counter())
        return value

    def _token_positions(self, T):
        """The positions of this rank's tokens in the residual stream: all T, or under
        sequence-parallel regions (--tp-token-shards) its [r T/tp, (r+1) T/tp)."""
        if not self.par.tp_token_shards or self.mesh.tp_size == 1:
            return None
        lo, hi = token_range(T, self.mesh.tp_comm)
        return np.arange(lo, hi)

    def clip_grad_norm(self, max_norm):
        """Clip the whole model's averaged gradient by its global norm (<= 0: no clipping);
        returns the norm."""
        if self.pipe is None and self.mesh.tp_size == 1:
            return self.engine.clip_grad_norm(max_norm)
        skip = [TIED] if self.stage is not None and self.stage.tied and not self.stage.is_first else []
        if self.mesh.tp_rank > 0:                                            # the same on every tp rank
            skip += self.replicated
        norm = self.engine.grad_norm(exclude=skip, also=(self.mesh.tp_comm, self.mesh.pp_comm))
        return self.engine.clip_grad_norm(max_norm, norm=norm)

    def update(self, lr):
        """AdamW on this rank's shard (stages 1-2 then gather the parameters)."""
        t0 = time.perf_counter()
        self.engine.step(lr)
        if self.tracer is not None:
            self.tracer.add("optim", 0, 0, t0, time.perf_counter())

    def bytes_by_kind(self):
        """{kind: bytes} this rank has sent so far over every communicator of its mesh and wire
        (collectives/transport.py KINDS): train.py logs the difference per step."""
        total = {}
        for c in self.mesh.communicators() + self.engine.wire.communicators():
            for kind, n in c.bytes_by_kind.items():
                total[kind] = total.get(kind, 0) + n
        return total

    # -- evaluation ----------------------------------------------------------------------------
    def eval_loss(self, batches):
        """Mean loss of the global batches (x, y), forward only, averaged over the replicas."""
        self.module.eval()
        self.model.eval()
        try:
            with no_grad():
                losses = [self._eval_one(self._local(x)[0], self._local(y)[0]) for x, y in batches]
        finally:
            self.module.train()
            self.model.train()
        return self._replica_mean(np.mean(losses))

    def _eval_one(self, x, y):
        if self.pipe is not None:
            return self.pipe.eval_loss(backend.to_device(x), backend.to_device(y))
        if self.seq is None:
            return self.engine(backend.to_device(x), backend.to_device(y))[1].item()
        return self.engine.forward_with(self.seq.evaluate, x, y)

    # -- checkpoints (parallel/checkpoint/) ----------------------------------------------------
    def _layout(self):
        """pp > 1 or tp > 1: every rank saves and loads together (group: the world), each
        stage's (stage: (pp rank, pp)) and each tp rank's dp x sp group holding its own shards."""
        out = {}
        if self.pipe is not None:
            out["stage"] = (self.mesh.pp_rank, self.mesh.pp_size)
        if self.mesh.tp_size > 1:
            out["slices"] = slice_specs(self.module)              # what this rank cut, by name
        if out:
            out["group"] = self.mesh.world
        return out

    def save(self, out_dir, step, manifest, keep=None):
        """Every rank writes its shard of parameters and AdamW state, rank 0 the manifest, into
        out_dir/step_<step>, published atomically; returns the path on every rank."""
        eng, layout = self.engine, self._layout()
        slices = layout.pop("slices", None)
        tp = None if slices is None else (self.mesh.tp_rank, self.mesh.tp_size, slices)
        return save_sharded(out_dir, step, eng.comm, eng.flat, eng.shard_state(), manifest, keep=keep, tp=tp,
                            **layout)

    def shard(self):
        """(record, tensors, steps) of this rank's checkpoint shard, without writing it: record
        {"rank", "world", "stage", "tp", "file", "layout"} is fixed for the run (the keys save
        exchanges), tensors {name: 1-D host view} and steps {dt: optimizer step} change every
        step. For buddy replicas (parallel/checkpoint/replicas.py), which write it later."""
        eng, layout = self.engine, self._layout()
        slices, stage = layout.get("slices"), layout.get("stage")
        tp = None if slices is None else (self.mesh.tp_rank, self.mesh.tp_size, slices)
        tpk = None if tp is None else tp[:2]
        N, r = eng.comm.size, eng.comm.rank
        tensors, ranges, steps = shard_tensors(eng.flat, eng.shard_state(), r, N)
        record = {"rank": r, "world": N, "stage": stage, "tp": tpk, "file": shard_file(r, N, stage, tpk),
                  "ranges": ranges, "layout": None if r else flat_layout(eng.flat, N, tp)}
        return record, tensors, steps

    def restore(self, ckpt):
        """Parameters and AdamW moments from an opened sharded checkpoint saved at any layout
        (each rank reads the saved shards overlapping its range, by parameter name); returns
        its manifest. A collective; a bad shard fails every rank alike."""
        if self.mesh.tp_size == 1:
            check_params(ckpt, self.model.named_parameters())     # names, shapes, dtypes
        eng = self.engine
        state, manifest, _ = load_sharded(ckpt.path, eng.comm, eng.flat, verify=False, **self._layout())
        eng.load_shard_state(state)
        return manifest

    # -- the banner ----------------------------------------------------------------------------
    def describe(self, batch_size):
        """One paragraph: the layout, what each rank computes, how gradients are reduced."""
        par, mesh, T = self.par, self.mesh, self.model.config.block_size
        world = mesh.world.size
        parts = [f"dp={par.dp}"]
        if self.seq is not None:
            parts.append(f"sp={par.sp} ({par.sp_attention} attention)")
        if self.pipe is not None:
            parts.append(f"pp={par.pp} ({par.schedule}, {par.micro_batches} micro-batches"
                         + (f", {par.virtual_stages} chunks per rank" if par.virtual_stages > 1 else "") + ")")
        rows = batch_size // par.dp // (par.micro_batches if self.pipe is not None else 1)
        tokens = f" of {T // par.sp} tokens" if self.seq is not None else ""
        return (f"layout: {world} ranks, {' '.join(parts)} ZeRO stage {par.zero} | {rows} sequences{tokens} per "
                f"rank per micro-batch | gradients averaged over {self.engine.comm.size} ranks (dp x sp) | "
                f"buckets {self.engine.buckets.describe()}"
                + (" | optimizer offloaded to the host (ZeRO-Offload)" if self.engine.offload is not None else "")
                + (f" | recompute {par.recompute}" if par.recompute != "none" else "")
                + (f" | {self.engine.wire.describe()}" if self.engine.wire.describe() else ""))
