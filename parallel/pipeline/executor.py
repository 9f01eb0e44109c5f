"""Pipeline parallelism: one executor that runs any schedule's action list (parallel/pipeline/schedules.py).

The batch of B sequences is cut into m micro-batches of B/m; each pp rank holds a stage
(parallel/pipeline/stage.py) and executes its list of actions in order:

    recv_f   irecv the activation (B/m, T, C) from the previous stage      tag (i, chunk, fwd)
    F        forward of micro-batch i through local chunk c; the input is a leaf that
             requires grad, so backward ends with its gradient; the last stage's loss is
             scaled by 1/m (the mean over the batch, as one process computes it)
    send_f   isend the output activation to the next stage
    recv_b   irecv d loss / d output from the next stage                     tag (i, chunk, bwd)
    B        backward from the output with that gradient; for zb-h1 only the input
             gradient (engine/autograd.py ``backward(deferred=...)``), the weight part waits
    W        the deferred weight gradients (engine/autograd.py ``run_deferred``)
    send_b   isend d loss / d input to the previous stage

Sends are non-blocking and waited at the end of the step; a receive is posted where the
list says and waited by the compute that needs it (time spent there is the trace's "comm
wait"). Tags are ((i v + chunk) 2 + direction) of the receiving chunk, so messages match by
meaning, never by arrival order. After the last action: wait the sends, all-reduce wte's
gradient between the first and last rank (tied embeddings), broadcast the loss from the last
rank. Gradients are left ACCUMULATED in the stage's parameters (``p.grad``, e.g. views of a
flat buffer), meaning the gradient of the mean loss over the batch, exactly as
``loss.backward()`` on one process: data parallelism (average over dp) and the optimizer
compose outside (parallel/step.py: how train.py does it). ``eval_loss`` runs
the micro-batches forward only, for validation.

Sequence parallelism (``seq``: a parallel/sequence/model.py SequenceParallel over this stage's sp
group, whose sharded attention, ring (Liu et al. 2023) or Ulysses (Jacobs et al. 2023), is
installed in the blocks the stage shares): every micro-batch is sharded along its tokens
before the step, so a stage sees (B/m, T/sp) token ids with their global positions (virtual
stage 0), sends activations (B/m, T/sp, C), and the last stage's loss is the rank's share
(sum of local CE / the micro-batch's target count, times the share's loss_scale), scaled by
1/m like the mean. The pp peers are the ranks with the same (dp, sp) coordinates
(collectives/mesh.py pp_comm), so each sp slice runs its own pipeline and the stages' ring
or all-to-all messages stay inside the stage: every sp rank of a stage runs the same action
list, so their attention collectives meet in the same order (attention has no weight, so
zb-h1's B, not its W, runs them). The reported loss is the shares summed over sp on the last
stage (SequenceParallel.global_loss).

Memory per rank: (activations of one micro-batch) x (the schedule's bound:
schedules.activation_bound: m for GPipe, p - r for 1F1B, at most p for ZB-H1).
"""
import functools
import math
import time

import numpy as np

from engine import backend
from engine.autograd import Tensor, run_deferred
from engine.optim import clip_grad_norm_, grad_norm_sq

from .stage import PipelineConfigError, check_config
from .schedules import build
from ..trace import Tracer, write_chrome_trace

FWD, BWD = 0, 1
SPLIT = object()                        # PipelineEngine(tie_comm=SPLIT): make the tied pair here


class PipelineEngine:
    """Runs ``schedule`` over the pp ranks of ``comm`` (a Communicator, or a Mesh: its pp_comm).

    model_cfg      the GPTConfig (for the checks and the activation shape)
    stage          this rank's PipelineStage (built with the same pp and virtual_stages)
    schedule       'gpipe' | '1f1b' | 'interleaved' | 'zb-h1'
    micro_batches  m; virtual_stages v (interleaved only)
    seq            None, or the SequenceParallel of this stage's sp group (tokens sharded)
    tie_comm       the first and last stage's pair for the tied wte gradient (Mesh.pp_ends(),
                   None on the stages between); left out, it is split from comm here (a
                   PipelineEngine used on its own)
    Bad layouts raise PipelineConfigError, identically on every rank, before any message."""

    def __init__(self, comm, model_cfg, stage, schedule="1f1b", micro_batches=1, virtual_stages=1, seq=None,
                 tie_comm=SPLIT):
        comm = getattr(comm, "pp_comm", comm)
        check_config(model_cfg.n_layer, comm.size, schedule, micro_batches, virtual_stages)
        if stage.pp != comm.size or stage.rank != comm.rank or stage.v != virtual_stages:
            raise PipelineConfigError(f"pipeline: the stage was built for rank {stage.rank} of pp={stage.pp} "
                                      f"with v={stage.v}, the engine runs rank {comm.rank} of {comm.size} "
                                      f"with v={virtual_stages}")
        self.comm, self.cfg, self.stage = comm, model_cfg, stage
        self.schedule, self.m, self.v, self.seq = schedule, micro_batches, virtual_stages, seq
        self.p, self.rank = comm.size, comm.rank
        self.actions = build(schedule, self.p, self.m, self.v)[self.rank]
        self.split = any(a.kind == "W" for a in self.actions)
        self.last_stage = self.p * self.v - 1
        if tie_comm is SPLIT:
            tie_comm = comm.split(0 if stage.tied else None, label="pp tied wte") if self.p > 1 else None
        self.tie_comm = tie_comm if stage.tied else None
        self.tracer = None              # a parallel.trace.Tracer records every action when set
        self.on_compute = None          # callable(action) after each F/B/W (benchmarks sample memory)
        self.peak_held = 0              # most (micro-batch, chunk) activations alive at once, last step

    # -- one step ---------------------------------------------------------------------------
    def step_grads(self, x, y, scale=1.0, sync_tied=True, rows=None):
        """Forward and backward of the batch x, y (B, T) token ids (this data-parallel
        replica's rows) through the pipeline. Accumulates scale * d(mean loss)/d(param) into
        the stage's parameters; returns the mean loss (a float, on every pp rank).
        scale: 1/k when k calls accumulate one optimizer step (train.py --grad-accum), with
        sync_tied=False on all but the last, so the tied wte gradients are summed once.
        rows: the global batch rows (B,) of x (default 0..B-1), where the layers' counter-based
        noise is drawn (engine/random.py): micro-batch i draws at its own rows."""
        self._begin(x, y, rows)
        self._scale = scale
        self._recv, self._stash, self._wait_w, self._grad_in, self._sends = {}, {}, {}, {}, []
        held = 0
        self.peak_held = 0
        for a in self.actions:
            t0 = self._ready = time.perf_counter()
            getattr(self, "_" + a.kind)(a)
            t0 = self._ready                                             # compute starts after its wait
            if a.kind in ("F", "B", "W"):
                held = len(self._stash) + len(self._wait_w)
                self.peak_held = max(self.peak_held, held)
                if self.tracer is not None:
                    self.tracer.add(a.kind, a.mb, a.chunk, t0, time.perf_counter())
                if self.on_compute is not None:
                    self.on_compute(a)
        t0 = time.perf_counter()
        for h in self._sends:
            h.wait()
        self._sends = []
        if sync_tied:
            self._sync_tied()
        loss = self._share_loss()
        if self.tracer is not None:
            self.tracer.add("sync", 0, 0, t0, time.perf_counter())
        return loss

    def _begin(self, x, y, rows=None):
        """Cut x, y (B, T) into the m micro-batches (B/m, T) (checked: B divisible by m); under
        sequence parallelism shard each along its tokens (SequenceParallel.shard_batch):
        (B/m, T/sp) ids and targets, (T/sp,) global positions, and the loss share function
        that divides by the micro-batch's whole target count."""
        B, T = x.shape
        check_config(self.cfg.n_layer, self.p, self.schedule, self.m, self.v, batch_size=B)
        b = B // self.m
        rows = np.arange(B) if rows is None else np.asarray(rows)
        self._rows = [rows[i * b:(i + 1) * b] for i in range(self.m)]    # (B/m,) global rows each
        self._x = [x[i * b:(i + 1) * b] for i in range(self.m)]          # (B/m, T) each
        self._y = [y[i * b:(i + 1) * b] for i in range(self.m)]
        self._pos, self._loss_fn, self._noise_pos = [None] * self.m, [None] * self.m, [None] * self.m
        if self.seq is not None:
            shards = [self.seq.shard_batch(xi, yi) for xi, yi in zip(self._x, self._y)]
            self._x, self._y = [s.idx for s in shards], [s.targets for s in shards]   # (B/m, T/sp) each
            self._pos = [backend.to_device(s.pos) for s in shards]                  # (T/sp,) each
            self._noise_pos = [s.pos for s in shards]
            self._loss_fn = [functools.partial(self.seq.loss, s=s) for s in shards]
            T //= self.seq.comm.size
        self._shape = (b, T, self.cfg.n_embd)                            # activation (B/m, T[/sp], C)
        self._dtype = self.stage.parameters()[0].data.dtype
        self._loss = 0.0

    def _forward(self, c, i, inp):
        """Local chunk c on micro-batch i: the positions (first stage) and the targets or loss
        share (last stage) are micro-batch i's."""
        targets = backend.to_device(self._y[i]) if self.stage.virtual_stage(c) == self.last_stage else None
        with self.stage.noise.located(self._rows[i], self._noise_pos[i]):   # noise drawn at global (row, token)
            return self.stage.forward_chunk(c, inp, targets, pos=self._pos[i], loss_fn=self._loss_fn[i])

    def _share_loss(self):
        """The last stage's mean loss (under sp: its shares summed over the sp group), broadcast
        to every pp rank."""
        value = self._loss
        if self.seq is not None and self.rank == self.p - 1:
            value = self.seq.global_loss(value)                          # sum over sp / loss_scale
        loss = np.array([value], dtype=np.float64)
        if self.p > 1:
            self.comm.broadcast(loss, root=self.p - 1)
        return float(loss[0])

    # -- forward only (evaluation) ----------------------------------------------------------------
    def eval_loss(self, x, y):
        """Mean loss of x, y (B, T) through the stages, forward only (call under no_grad):
        each rank runs (micro-batch i, chunk c) in the order i, then c, posting the receive of
        its input and isending its output. Every dependency of (i, c) on virtual stage
        s = c p + r, (i, s - 1), comes earlier in its own rank's order, so no rank waits
        forever; the pipeline fills as in GPipe's forward phase. Returns the loss on every
        pp rank; no gradient or stash is kept."""
        self._begin(x, y)
        sends = []
        for i in range(self.m):
            for c in range(self.v):
                s = self.stage.virtual_stage(c)
                if s == 0:
                    inp = backend.to_device(self._x[i])                  # (B/m, T[/sp]) token ids
                else:
                    buf = backend.xp().empty(self._shape, dtype=self._dtype)
                    self.comm.irecv(buf, (s - 1) % self.p, self._tag(i, c, FWD)).wait()
                    inp = Tensor(buf)                                    # (B/m, T[/sp], C)
                out = self._forward(c, i, inp)
                if s == self.last_stage:
                    self._loss += out.item() / self.m
                else:
                    nxt = s + 1
                    sends.append(self.comm.isend(out.data, nxt % self.p, self._tag(i, nxt // self.p, FWD)))
        for h in sends:
            h.wait()
        return self._share_loss()

    # -- the actions ---------------------------------------------------------------------------
    def _tag(self, mb, chunk, direction):
        return (mb * self.v + chunk) * 2 + direction

    def _peer_chunk(self, a, step):
        return (a.chunk * self.p + self.rank + step) // self.p           # chunk of virtual stage s +- 1

    def _post(self, key, peer, tag):
        buf = backend.xp().empty(self._shape, dtype=self._dtype)
        self._recv[key] = (self.comm.irecv(buf, peer, tag), buf)

    def _take(self, key):
        h, buf = self._recv.pop(key)
        t0 = time.perf_counter()
        h.wait()
        self._ready = time.perf_counter()
        if self.tracer is not None:
            self.tracer.add("wait", key[1], key[2], t0, self._ready)
        return buf

    def _recv_f(self, a):
        self._post((FWD, a.mb, a.chunk), a.peer, self._tag(a.mb, a.chunk, FWD))

    def _recv_b(self, a):
        self._post((BWD, a.mb, a.chunk), a.peer, self._tag(a.mb, a.chunk, BWD))

    def _F(self, a):
        s = self.stage.virtual_stage(a.chunk)
        if s == 0:
            inp, x_in = backend.to_device(self._x[a.mb]), None           # (B/m, T[/sp]) token ids
        else:
            x_in = inp = Tensor(self._take((FWD, a.mb, a.chunk)), requires_grad=True)   # (B/m, T[/sp], C) leaf
        out = self._forward(a.chunk, a.mb, inp)
        if s == self.last_stage:
            self._loss += out.item() / self.m
            out = out * (self._scale / self.m)                           # the batch mean, as one process
        self._stash[(a.mb, a.chunk)] = (x_in, out)

    def _send_f(self, a):
        out = self._stash[(a.mb, a.chunk)][1]
        self._sends.append(self.comm.isend(out.data, a.peer, self._tag(a.mb, self._peer_chunk(a, 1), FWD)))

    def _B(self, a):
        x_in, out = self._stash.pop((a.mb, a.chunk))
        s = self.stage.virtual_stage(a.chunk)
        g = None if s == self.last_stage else self._take((BWD, a.mb, a.chunk))   # (B/m, T, C)
        if self.split:                                                   # zero bubble: B now, W later
            deferred = []
            out.backward(g, deferred=deferred, inputs=() if x_in is None else (x_in,))
            self._wait_w[(a.mb, a.chunk)] = deferred
        else:
            out.backward(g)
        if x_in is not None:
            self._grad_in[(a.mb, a.chunk)] = x_in.grad                   # d loss / d input

    def _W(self, a):
        run_deferred(self._wait_w.pop((a.mb, a.chunk)))

    def _send_b(self, a):
        g = self._grad_in.pop((a.mb, a.chunk))
        self._sends.append(self.comm.isend(g, a.peer, self._tag(a.mb, self._peer_chunk(a, -1), BWD)))

    def _sync_tied(self):
        """Tied embeddings: the first and last stage each hold wte; sum their gradients."""
        if self.tie_comm is None:
            return
        wte = self.stage.transformer.wte.weight
        if wte.grad is None:
            wte.grad = backend.xp().zeros_like(wte.data)
        self.tie_comm.all_reduce(wte.grad)

    # -- gradient norm over the whole model ---------------------------------------------------
    def unique_grads(self):
        """The stage's gradient arrays, wte's counted on the first stage only (the last stage's
        copy is the same gradient after the tied all-reduce)."""
        skip = self.stage.transformer.wte.weight if self.stage.tied and not self.stage.is_first else None
        return [p.grad for p in self.stage.parameters() if p is not skip and p.grad is not None]

    def grad_norm(self):
        """Global L2 norm of the model's gradient: each stage's share summed over pp."""
        sq = np.array([grad_norm_sq(self.unique_grads())], dtype=np.float64)
        if self.p > 1:
            self.comm.all_reduce(sq)
        return math.sqrt(float(sq[0]))

    def clip_grad_norm(self, max_norm):
        """Clip the whole model's gradient to max_norm (<= 0: no-op); returns the norm. Both
        copies of wte are scaled alike, so they stay equal."""
        norm = self.grad_norm()
        if max_norm and max_norm > 0:
            clip_grad_norm_([p.grad for p in self.stage.parameters() if p.grad is not None], max_norm, norm=norm)
        return norm

    # -- tracing ----------------------------------------------------------------------------------
    def start_trace(self, comm=None):
        """Record every action from now on (comm: align the ranks' clocks with a barrier)."""
        self.tracer = Tracer().start(comm if comm is not None else self.comm)
        return self.tracer

    def write_trace(self, path, comm=None, labels=None):
        """Chrome trace of what was recorded since start_trace, gathered over comm (default the
        pp ranks; pass the world communicator for one row per world rank). A collective."""
        comm = comm if comm is not None else self.comm
        tracer = self.tracer if self.tracer is not None else Tracer()
        return write_chrome_trace(path, tracer, comm, labels)
