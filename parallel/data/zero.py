"""ZeRO stages 0-3 over the data-parallel axis (Rajbhandari et al. 2019, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", arXiv 1910.02054).

One engine for every data-parallel run, a single process included (N = 1, stage 0). The
flat buffers (engine/flat.py) are padded to N equal shards; rank r owns [r S, (r+1) S).
Model-state bytes per rank, float32 AdamW, P parameters (section 5 of the paper, with
float32 in place of its 2 + 2 + 12 bytes of mixed precision):

    stage  params  grads  m, v       per rank          communication per step
    0      full    full   full       16P               all-reduce grads (bucketed, in backward)
    1      full    full   shard      8P + 8P/N         reduce-scatter grads, all-gather params
    2      full    shard  shard      4P + 12P/N        bucketed reduce-scatter in backward; all-gather
    3      shard   shard  shard      16P/N + pool      per-layer all-gather in forward and again in
                                                       backward (parallel/data/fsdp.py); reduce-scatter

The pool: stage 3's K = 2 slots, each the size of the largest layer (parallel/data/pool.py).
Activations are independent of the stage: ``recompute`` "none" keeps them all; "full"
(activation checkpointing, Chen et al. 2016; Megatron's and torchtitan's full mode) keeps each
layer's input and recomputes the layer in backward (+1 forward); "selective" (Korthikanti et
al. 2022, section 4.2) drops only the attention probabilities, (B, nh, T, T) per layer, and
recomputes them blockwise from q, k, v in backward (the cheap, large part).

Step, any stage:  grads averaged over ``comm`` (parallel/data/buckets.py) -> global grad norm (sum
of squares of each rank's shard, all-reduced) -> clip -> AdamW on the owned shard (the
update is elementwise, so on a shard it equals the full update bit for bit) -> stages 1-2
all-gather the updated shards into the replicated parameters. Stage 0 keeps the full AdamW
state and updates the full buffer on every rank (classic DDP).

    eng = ZeroEngine(model, comm, stage=2, lr=1e-3, weight_decay=0.1)
    loss = eng(x, y)[1]                 # the model's forward (stage 3 gathers layers)
    eng.backward(loss)                  # buckets reduce while backward runs; waits at the end
    norm = eng.clip_grad_norm(1.0)
    eng.step(lr)                        # update the shard, gather parameters
    eng.zero_grad()

Compressed communication (``wire``, parallel/data/wire.py; ZeRO++, Wang et al. 2023): the
parameter gathers may carry int8 codes or bf16 (every rank computes with the decoded values;
stages 1-2 then keep the float32 master shard apart from the full buffer, + 4P/N bytes) and the
gradient reduce-scatter may run as an all-to-all of int8 / int4 / bf16 blocks reduced in float32.

ZeRO-Offload (``offload="optimizer"``, stages 1-2; Ren et al. 2021, arXiv 2101.06840;
parallel/data/offload.py): the master shard, m and v and the AdamW step move to the host;
gradient parts leave the device bucket by bucket as their reduce-scatter completes, the
updated shard comes back before the all-gather. ``param_shards``/``grad_shards`` are then the
host master and gradient shards (what the norm, clipping and checkpoints read). Device bytes:
stage 1 8P, stage 2 4P (+ buckets in flight); the host 17P/N (stage 2: 21P/N).
"""
import math
import time
from contextlib import contextmanager

import numpy as np

from engine.backend import get_array_module, to_numpy
from engine.flat import FlatParameters, copy_into, placeholder, shard_range
from engine.optim import AdamW, clip_grad_norm_, grad_norm_sq
from engine.recompute import checkpointed

from .buckets import GradBuckets
from .fsdp import ShardedLayers, default_layers
from .offload import MODES as OFFLOAD, HostOptimizer
from .wire import Wire

STAGES = (0, 1, 2, 3)
RECOMPUTE = ("none", "full", "selective")


class ZeroEngine:
    """Data parallelism with ZeRO stage 0-3 for one local model part.

    model    the LOCAL Module (a whole GPT, or a pipeline stage); its parameters are packed
             into ``self.flat`` (padded to comm.size shards); same layout on every rank
    comm     the Communicator gradients are averaged and state is sharded over (dp, or dp x sp)
    stage    0..3; layers: stage 3's sub-Modules gathered one at a time, each taking one tensor
             and returning one (parallel/data/fsdp.py; None: ``model.blocks``, else its children);
             parameters outside them form the root, gathered for the whole step
    AdamW hyper-parameters as engine/optim.py; bucket_bytes: gradient bucket size; wire: a
             parallel/data/wire.py Wire over comm (compressed gathers / reduce-scatter; stage >= 1).
    offload  "none", or "optimizer": ZeRO-Offload (stages 1-2, device parameters; see the docstring).
    recompute "none" (keep every activation), "full" (each layer recomputed in backward, any
             stage: engine/recompute.py) or "selective" (the attention probabilities recomputed:
             the model's ``selective_recompute()``, models/gpt.py); see the docstring."""

    def __init__(self, model, comm, stage=0, layers=None, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.0, bucket_bytes=1 << 20, align=1, wire=None, offload="none", recompute="none"):
        if stage not in STAGES:
            raise ValueError(f"ZeRO stage must be one of {STAGES}, got {stage!r}")
        if recompute not in RECOMPUTE:
            raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
        if recompute == "selective" and not hasattr(model, "selective_recompute"):
            raise ValueError(f"recompute 'selective': {type(model).__name__} has no selective_recompute()")
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
        if offload != "none" and stage not in (1, 2):
            raise ValueError(f"offload {offload!r} needs ZeRO stage 1 or 2 (the host owns a shard), got {stage}")
        host = offload == "optimizer"
        self.wire = Wire(comm) if wire is None else wire
        if stage == 0 and (self.wire.weights or self.wire.grads):
            raise ValueError("ZeRO stage 0 gathers no parameters and all-reduces gradients: nothing to compress")
        master = self.wire.weights is not None             # the float32 shard apart from what ranks compute with
        self.model, self.comm, self.stage = model, comm, stage
        N, r = comm.size, comm.rank
        self.flat = flat = FlatParameters(model.named_parameters(), world=N, align=align)
        self.ranges, self.param_shards, self.grad_shards, self.optim = {}, {}, {}, {}
        adamw, device, masks = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), {}, {}
        for dt in flat.dtypes:
            lo, hi = shard_range(flat.numel[dt], r, N, align)
            self.ranges[dt] = (lo, hi)
            data, grad, xp = flat.data[dt], flat.grad[dt], get_array_module(flat.data[dt])
            if stage == 0:
                p, g, mask = data, grad, flat.decay_mask[dt]
            else:
                mask = flat.decay_mask[dt][lo:hi].copy()
                flat.decay_mask[dt] = None                      # only the shard's mask is kept
                p = data[lo:hi] if stage < 3 and not master else data[lo:hi].copy()
                g = grad[lo:hi] if stage == 1 else None if host else xp.zeros(hi - lo, dtype=data.dtype)
                if stage >= 2:                                  # no full gradient buffer
                    flat.grad[dt] = placeholder(grad.shape, grad.dtype, xp)
                if stage == 3:                                  # no full parameter buffer
                    flat.data[dt] = placeholder(data.shape, data.dtype, xp)
            # the owned range: a view of the full buffers in stages 0-1 (params also in 2)
            self.param_shards[dt] = p[lo:hi] if stage == 0 else p
            self.grad_shards[dt] = g[lo:hi] if stage == 0 else g
            if host:                                            # the host's, below
                device[dt], masks[dt] = p, mask
            else:
                self.optim[dt] = AdamW(p, g, mask, **adamw)
        self.offload = None
        if host:                                                # the host master and gradient shards
            self.offload = HostOptimizer(device, masks, accumulate=stage >= 2, **adamw)
            self.optim = dict(self.offload.optim)
            self.param_shards = {dt: opt.params for dt, opt in self.optim.items()}
            self.grad_shards = dict(self.offload.grads)
        if stage >= 2:
            for prm in flat.params:
                prm.grad = None
        mode = ("all_reduce", "scatter", "scatter_copy", "scatter_copy")[stage]
        self.buckets = GradBuckets(flat, comm, mode, bucket_bytes, self.grad_shards if stage >= 2 and not host else None,
                                   wire=self.wire if self.wire.grads is not None else None,
                                   sink=self.offload.receive if host else None)
        self.layers, self.recompute = None, recompute
        if recompute == "selective":
            model.selective_recompute()
        if stage == 3:
            self.layers = ShardedLayers(self, layers, recompute=recompute == "full")
        elif recompute == "full":                           # each layer one Recomputed node
            for m in default_layers(model) if layers is None else layers:
                checkpointed(m, getattr(model, "noise", None))
        self._wait_s = 0.0              # seconds blocked waiting on collectives (comm_wait)
        self._sync = True               # False inside no_sync()
        if master and stage < 3:        # compute with the decoded weights from the start
            for dt in flat.dtypes:
                self._gather_params(dt)

    # -- forward and backward -------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        """The local model's forward (stage 3: parameters outside the layers are gathered first)."""
        return self.forward_with(self.model, *args, **kwargs)

    def forward_with(self, fn, *args, **kwargs):
        """fn(*args, **kwargs) in place of the model's forward, e.g. a sequence-parallel one
        (parallel/step.py): stage 3 gathers the root first; the layers gather themselves."""
        if self.layers is not None:
            self.layers.gather_root()
        return fn(*args, **kwargs)

    @contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate gradients locally (stages 0-1), as PyTorch's
        ``DistributedDataParallel.no_sync``: gradient accumulation, pipeline micro-batches.
        The gradients are reduced by the first backward after it, or by ``finish_grads()``.
        Stages 2-3 keep no full gradient, so they reduce every backward regardless."""
        self._sync = False
        self.buckets.enable(self.stage >= 2)
        try:
            yield self
        finally:
            self._sync = True
            self.buckets.enable(True)

    def backward(self, out, grad=None, sync=True):
        """out.backward(grad) with bucketed gradient reduction overlapping it, then the wait.
        sync=False (or inside ``no_sync()``), stages 0-1: only accumulate locally."""
        sync = sync and self._sync
        self.buckets.enable(sync or self.stage >= 2)
        out.backward(grad)
        if sync or self.stage >= 2:
            self.finish_grads()
        self.buckets.enable(self._sync or self.stage >= 2)

    def finish_grads(self):
        """Reduce what is accumulated (buckets no backward started) and wait for every bucket
        in flight: the averaged gradient shard is then complete."""
        self.buckets.enable(True)
        with self.timed_wait():
            self.buckets.finish()
        if self.offload is not None:                    # the gradient parts are on the host
            self.offload.arrived()
        self.buckets.enable(self._sync or self.stage >= 2)

    @contextmanager
    def timed_wait(self):
        """Time spent inside counts as waiting on communication (``comm_wait``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._wait_s += time.perf_counter() - t0

    @property
    def comm_wait(self):
        """Seconds this engine has spent blocked on collectives since it was built."""
        return self._wait_s

    # -- the update -----------------------------------------------------------------------
    def local_grad_norm_sq(self, exclude=()):
        """Sum of squares of this rank's gradient shard, leaving out the parameters named in
        ``exclude`` (a tied copy, or a replicated one, that another engine counts already;
        names this engine does not hold are ignored)."""
        total = 0.0
        for dt, g in self.grad_shards.items():
            lo, hi = self.ranges[dt]
            cut = sorted((off, off + n) for d, off, n, _ in (self.flat.index[m] for m in exclude
                                                               if m in self.flat.index) if d == dt)
            a = lo                                              # [lo, hi) minus the excluded ranges
            for s, e in cut + [(hi, hi)]:
                if min(s, hi) > a:
                    total += grad_norm_sq(g[a - lo:min(s, hi) - lo])
                a = max(a, e)
        return total

    def grad_norm(self, exclude=(), also=()):
        """Global L2 norm of the averaged gradient: each rank's shard's squares (minus
        ``exclude``), summed over comm, and over each Communicator in ``also`` (the pipeline
        stages and the tensor-parallel ranks, whose engines each hold part of the model)."""
        sq = np.array([self.local_grad_norm_sq(exclude)], dtype=np.float64)
        with self.timed_wait():
            self.comm.all_reduce(sq)
            for c in also:
                if c.size > 1:
                    c.all_reduce(sq)
        return math.sqrt(float(sq[0]))

    def clip_grad_norm(self, max_norm, norm=None):
        """Clip the averaged gradient to max_norm (no-op for max_norm <= 0); returns the norm.
        ``norm``: the global norm when computed elsewhere (``grad_norm(exclude, also)`` for a
        pipeline stage, parallel/step.py)."""
        norm = self.grad_norm() if norm is None else norm
        if max_norm and max_norm > 0:
            targets = list(self.flat.grad.values()) if self.stage == 0 else list(self.grad_shards.values())
            clip_grad_norm_(targets, max_norm, norm=norm)
        return norm

    def step(self, lr=None):
        """AdamW on the owned shard; stages 1-2 all-gather the shards into the parameters."""
        for dt, opt in self.optim.items():
            if self.offload is None:
                opt.step(lr)
            else:                                       # on the host, then back to the device shard
                self.offload.step(dt, lr)
            if self.stage in (1, 2):
                self._gather_params(dt)
        if self.layers is not None:
            self.layers.free_root()

    def _gather_into(self, shard, full):
        with self.timed_wait():
            self.comm.all_gather(shard, out=full)             # in place: shard is full's own block

    def _gather_params(self, dt):
        """Stages 1-2: the full parameter buffer from every rank's shard (wire: decoded codes)."""
        shard = self.param_shards[dt] if self.offload is None else self.offload.device[dt]
        with self.timed_wait():
            self.wire.all_gather(shard, self.flat.data[dt])

    def zero_grad(self):
        if self.stage <= 1:
            self.flat.zero_grad()
        for g in self.grad_shards.values():
            g.fill(0)
        for p in self.flat.params:
            if self.stage >= 2:
                p.grad = None

    # -- state ----------------------------------------------------------------------------
    def shard_state(self):
        """{'params': {dt: owned 1-D slice}, 'optim': {dt: {'m', 'v', 'step'}}}: views, this
        rank's shard_range of the padded buffers (see contract: parallel/checkpoint/sharded.py)."""
        params, optim = {}, {}
        for dt, opt in self.optim.items():
            lo, hi = self.ranges[dt]
            params[dt] = self.param_shards[dt]
            m, v = opt.exp_avg, opt.exp_avg_sq
            if self.stage == 0:
                m, v = m[lo:hi], v[lo:hi]
            optim[dt] = {"m": m, "v": v, "step": opt.step_count}
        return {"params": params, "optim": optim}

    def load_shard_state(self, state):
        """Copy a shard_state (this rank's range at the current N) in place, then restore the
        replicated copies (stages 0-2 gather parameters; stage 0 also m and v)."""
        for dt, opt in self.optim.items():
            lo, hi = self.ranges[dt]
            src, o = state["params"][dt], state["optim"][dt]
            for what, a in (("params", src), ("m", o["m"]), ("v", o["v"])):
                if tuple(a.shape) != (hi - lo,):
                    raise ValueError(f"load_shard_state: {dt} {what} has shape {tuple(a.shape)}, "
                                     f"this rank's shard is ({hi - lo},)")
            copy_into(self.param_shards[dt], src)
            if self.stage == 0:
                copy_into(opt.exp_avg[lo:hi], o["m"])
                copy_into(opt.exp_avg_sq[lo:hi], o["v"])
                for arr in (self.flat.data[dt], opt.exp_avg, opt.exp_avg_sq):
                    self._gather_into(arr[lo:hi], arr)
            else:
                copy_into(opt.exp_avg, o["m"])
                copy_into(opt.exp_avg_sq, o["v"])
                if self.offload is not None:            # the loaded host master -> the device shard
                    self.offload.upload(dt)
                if self.stage < 3:
                    self._gather_params(dt)
            opt.step_count = int(o["step"])
        if self.layers is not None:                     # the shards changed: nothing gathered stays resident
            self.layers.free_root()

    def full_state(self):
        """Every rank: {'params': {dt: full padded array}, 'optim': {dt: {'m', 'v', 'step'}}},
        gathered from the shards (a collective; for consolidated checkpoints and tests)."""
        out, state = {"params": {}, "optim": {}}, self.shard_state()
        for dt, o in state["optim"].items():
            gather = (lambda a: self.comm.all_gather(np.ascontiguousarray(to_numpy(a))))   # (N S,) host
            out["params"][dt] = gather(state["params"][dt])
            out["optim"][dt] = {"m": gather(o["m"]), "v": gather(o["v"]), "step": o["step"]}
        return out

    def named_full_params(self, full=None):
        """{name: full array} of every parameter (gathered from the shards when full is None)."""
        full = self.full_state() if full is None else full
        return {name: full["params"][dt][off:off + n].reshape(shape)
                for name, (dt, off, n, shape) in self.flat.index.items()}

    def model_state_bytes(self):
        """Bytes of parameters, gradients and optimizer moments this rank holds between steps
        (placeholders count 0; with offload, host and device together): the quantity of the
        ZeRO formulas."""
        seen, total = set(), 0
        arrays = list(self.param_shards.values()) + list(self.grad_shards.values())
        arrays += list(self.flat.data.values()) + list(self.flat.grad.values())
        for opt in self.optim.values():
            arrays += [opt.exp_avg, opt.exp_avg_sq]
        for a in arrays:
            base = a
            while getattr(base, "base", None) is not None:
                base = base.base
            if id(base) in seen or a.strides == (0,) * a.ndim:
                continue
            seen.add(id(base))
            total += base.nbytes
        return total
