"""Data parallelism: gradient buckets reduced during backward, so communication overlaps it.

PyTorch DDP (Li et al. 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training", VLDB) and ZeRO's bucketed reduce-scatter (Rajbhandari et al. 2019, arXiv 1910.02054):

    flat grad (one dtype)   [ wte | wpe | h.0 ........ | h.1 ........ | ln_f | pad ]
    buckets (reverse order)   <--- b3 ---> <--- b2 ---> <---- b1 ---> <--- b0 --->
    backward produces         last ..................................... first

Buckets are contiguous ranges of a flat buffer (engine/flat.py), cut in reverse layout order
(backward meets the last layers first) at about ``bucket_bytes``. Every parameter's leaf
grad hook (``Tensor.register_grad_hook``, engine/autograd.py) counts down its bucket; the
moment a bucket's last gradient is complete its collective starts, non-blocking, and
backward goes on computing the earlier layers while it travels. ``finish()`` waits for
them all, in launch order. Every rank builds the same graph, so hooks fire, and
collectives start, in the same order everywhere.

Three modes (the ZeRO stage picks one, parallel/data/zero.py):

    "all_reduce"      DDP, stage 0. Grads accumulate in the full flat buffer; a bucket is
                      all-reduced (avg) in place. Cost per step: 2 (N-1)/N * 4P bytes sent.
    "scatter"         stage 1. Same full buffer; a bucket is reduce-scattered (avg) in place
                      with uneven counts = its overlap with each rank's shard, so this rank's
                      reduced elements land exactly at their own place in the buffer. (N-1)/N * 4P.
    "scatter_copy"    stages 2 and 3: no full gradient buffer. A parameter's gradient arrives
                      as a fresh array (``p.grad`` is None before backward), the hook copies it
                      into the bucket's buffer (allocated at its first gradient) and drops it;
                      once complete the bucket is reduce-scattered and this rank's part is
                      added into its gradient shard; the bucket buffer is then freed.

Completion: a bucket whose collective is done is completed (its shard part taken) at once,
from the next hook that finds it done, in launch order, so its buffer is freed and its
result handed on while backward still runs; ``finish()`` completes the rest. ``sink``
(parallel/data/offload.py, ZeRO-Offload) receives every completed bucket's part of this
rank's shard, (dtype, offset in the shard, device array), in place of the "scatter_copy"
addition into ``shards``: that is where the gradients leave for the host, bucket by bucket.

Shard geometry: a buffer of padded length N*S splits into rank shards [k S, (k+1) S). A
bucket [lo, hi) sends count_k = |[lo, hi) & [k S, (k+1) S)| elements to rank k; these
blocks are consecutive in k, which is exactly the Communicator's uneven-block layout.
Averaging: op "avg" over the gradient communicator (sum, then one division by N).
Compressed (``wire``, parallel/data/wire.py: ZeRO++'s qgZ, or bf16): the reduce-scatter of
modes "scatter" / "scatter_copy" becomes an all-to-all of encoded blocks reduced in float32.
"""
from contextlib import contextmanager

from engine.backend import get_array_module
from engine.flat import dtype_name

MODES = ("all_reduce", "scatter", "scatter_copy")


def overlap_counts(lo, hi, shard, world):
    """Elements of [lo, hi) in each rank's shard [k*shard, (k+1)*shard)."""
    return [max(0, min(hi, (k + 1) * shard) - max(lo, k * shard)) for k in range(world)]


class Bucket:
    """A contiguous range [lo, hi) of the dtype ``dt`` flat buffer and its parameters."""
    __slots__ = ("dt", "lo", "hi", "params", "pending", "buf", "handle", "counts")

    def __init__(self, dt, lo, hi, params, counts):
        self.dt, self.lo, self.hi, self.params, self.counts = dt, lo, hi, params, counts
        self.pending, self.buf, self.handle = len(params), None, None

    def __repr__(self):
        return f"Bucket({self.dt} [{self.lo}, {self.hi}), {len(self.params)} params)"


class GradBuckets:
    """Bucketed gradient reduction driven by leaf grad hooks.

    flat: the FlatParameters (same layout on every rank); comm: the gradient Communicator;
    shards: {dt: 1-D gradient shard} for mode "scatter_copy" (this rank's [r S, (r+1) S)).
    ``enable(False)``: hooks do nothing until ``enable()`` (backward passes that only
    accumulate, stages 0-1: ZeroEngine.no_sync); ``hooks_paused()``: hooks ignored inside (a
    nested recompute backward, parallel/data/fsdp.py). sink(dt, offset, part): see the docstring
    (modes "scatter" and "scatter_copy")."""

    def __init__(self, flat, comm, mode="all_reduce", bucket_bytes=1 << 20, shards=None, wire=None, sink=None):
        if mode not in MODES:
            raise ValueError(f"GradBuckets: mode must be one of {MODES}, got {mode!r}")
        if mode == "scatter_copy" and shards is None and sink is None:
            raise ValueError("GradBuckets: mode 'scatter_copy' needs the gradient shards or a sink")
        if mode == "all_reduce" and sink is not None:
            raise ValueError("GradBuckets: a sink takes shard parts, which mode 'all_reduce' does not produce")
        self.flat, self.comm, self.mode, self.shards, self.sink = flat, comm, mode, shards, sink
        self.wire = wire                            # parallel/data/wire.py: compressed reduce-scatter
        self._enabled, self._paused = True, False
        self.hook_launches = 0                      # buckets started from a hook (not by finish)
        self.buckets, self._of = [], {}
        self._names = {id(p): n for n, p in zip(flat.names, flat.params)}
        self.launched = []                          # buckets launched this backward, in launch order
        self._completed = 0                         # how many of them are completed
        N = comm.size
        for dt in flat.dtypes:
            padded = len(flat.data[dt])
            shard = padded // N
            params = [(flat.index[n][1], flat.index[n][2], p) for n, p in zip(flat.names, flat.params)
                      if flat.index[n][0] == dt]
            limit = max(1, int(bucket_bytes) // flat.data[dt].dtype.itemsize)
            hi, group = padded, []                  # the first bucket also holds the padding tail
            for off, n, p in reversed(params):
                group.append(p)
                if hi - off >= limit or off == 0:
                    self._add(Bucket(dt, off, hi, group, overlap_counts(off, hi, shard, N)))
                    hi, group = off, []
        for p in flat.params:
            p.register_grad_hook(self._on_grad)

    def _add(self, b):
        self.buckets.append(b)
        for p in b.params:
            self._of[id(p)] = b

    # -- switches ---------------------------------------------------------------------------
    @property
    def enabled(self):
        return self._enabled

    def enable(self, on=True):
        """on: each bucket is reduced as soon as backward fills it; off: gradients only accumulate."""
        self._enabled = bool(on)

    @contextmanager
    def hooks_paused(self):
        """Hooks ignored inside: a nested backward whose gradients the outer one reports."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    # -- during backward ------------------------------------------------------------------
    def _on_grad(self, p):
        if self._paused or not self._enabled:
            return
        b = self._of[id(p)]
        if self.mode == "scatter_copy":            # move the fresh gradient into the bucket
            dt, off, n, _ = self.flat.index[self._names[id(p)]]
            if b.buf is None:
                b.buf = get_array_module(p.grad).zeros(b.hi - b.lo, dtype=p.grad.dtype)
            b.buf[off - b.lo:off - b.lo + n] = p.grad.reshape(-1)
            p.grad = None
        b.pending -= 1
        if b.pending == 0:
            self._launch(b)
            self.hook_launches += 1                # overlap: started while backward goes on
        self._complete_done()                      # move the collectives in flight along

    def _complete_done(self):
        """Complete, in launch order, the buckets in flight whose collective is done."""
        while self._completed < len(self.launched) and self.launched[self._completed].handle.test():
            self._complete(self.launched[self._completed])

    def _launch(self, b):
        if b.handle is not None:
            raise RuntimeError(f"{b} reduced twice in one backward (a parameter's hook fired twice)")
        if self.mode == "all_reduce":
            b.handle = self.comm.all_reduce(self.flat.grad[b.dt][b.lo:b.hi], op="avg", async_op=True)
        else:
            x = self.flat.grad[b.dt][b.lo:b.hi] if self.mode == "scatter" else b.buf
            if self.wire is None:
                b.handle = self.comm.reduce_scatter(x, op="avg", counts=b.counts, async_op=True)
            else:                                  # "scatter": the result must land in the own block
                r, start = self.comm.rank, sum(b.counts[:self.comm.rank])
                own = x[start:start + b.counts[r]] if self.mode == "scatter" else None
                b.handle = self.wire.reduce_scatter(x, b.counts, b, own=own, async_op=True)
        self.launched.append(b)

    # -- after backward -------------------------------------------------------------------
    def finish(self):
        """Start the buckets whose parameters got no gradient (unused in this graph: their
        gradient is zero), wait for every bucket in launch order, reset for the next backward."""
        if not self._enabled:
            return
        for b in self.buckets:
            if b.handle is None:
                if self.mode == "scatter_copy" and b.buf is None:
                    like = self.flat.data[b.dt]
                    b.buf = get_array_module(like).zeros(b.hi - b.lo, dtype=like.dtype)
                self._launch(b)
        while self._completed < len(self.launched):
            self._complete(self.launched[self._completed])
        for b in self.launched:
            b.handle, b.pending = None, len(b.params)
        self.launched, self._completed = [], 0

    def _complete(self, b):
        """Wait for b's collective and hand on this rank's part of it (to the shard or the sink)."""
        result = b.handle.wait()
        self._completed += 1
        if self.mode == "all_reduce":
            return
        r, S = self.comm.rank, len(self.flat.data[b.dt]) // self.comm.size
        start = max(b.lo, r * S) - r * S                 # where the part lies in this rank's shard
        if self.mode == "scatter":                       # reduced in place: the part is the buffer's
            lo = max(b.lo, r * S)
            result = self.flat.grad[b.dt][lo:lo + b.counts[r]]
        if b.counts[r]:
            if self.sink is not None:
                self.sink(b.dt, start, result)
            elif self.mode == "scatter_copy":
                self.shards[b.dt][start:start + b.counts[r]] += result
        b.buf = None

    def describe(self):
        """One line per dtype: the bucket count and sizes."""
        out = []
        for dt in self.flat.dtypes:
            sizes = [b.hi - b.lo for b in self.buckets if b.dt == dtype_name(dt)]
            out.append(f"{dt}: {len(sizes)} buckets of {min(sizes)}..{max(sizes)} elements")
        return "; ".join(out)
