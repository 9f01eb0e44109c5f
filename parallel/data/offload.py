"""ZeRO-Offload: the optimizer state and step on the host, parameters and gradients on the
device (Ren et al. 2021, "ZeRO-Offload: Democratizing Billion-Scale Model Training",
arXiv 2101.06840), over ZeRO stage 1 or 2 (parallel/data/zero.py).

    device                                          host (pinned)
    params (full)  <--- H2D, chunk by chunk ------  master shard  <-- AdamW (m, v: this rank's)
    grad buckets --- reduce-scatter ---> own part --- D2H, bucket by bucket ---> grad shard

One step of rank r of N (S = P/N elements of the ZeRO group's shard):

    backward   each bucket is reduce-scattered as backward fills it (parallel/data/buckets.py);
               the moment its collective is done, its part of r's shard is copied to the host
               (``receive``, the buckets' sink) while backward goes on
    finish     the copies waited for (``arrived``); stage 2 adds the pass's parts into the
               host gradient shard (gradient accumulation), stage 1 copied them there directly
    norm, clip on the host shard (its sum of squares all-reduced, as without offload)
    update     AdamW on the host master shard, chunk by chunk (engine/optim.py); each updated
               chunk is copied into the device's parameter shard while the next one is updated
               (``step``); then the usual all-gather of stages 1-2 fills the full parameters

The update is elementwise and the host runs the same AdamW on the same values, so a run with
offload equals one without (tested within 1e-10 in float64, tests/test_offload.py).

Copies: on CuPy they run on one non-blocking side stream (``cuda.Stream(non_blocking=True)``)
with pinned host buffers, ``part.get(out=pinned, stream=side, blocking=False)`` (CuPy >= 13)
and ``shard.set(pinned, stream=side)``; the side stream first waits for an event recorded on
the current stream (the work that produced the part, or that last read the parameters), and
is synchronized before the host reads the gradients and before the all-gather reads the
parameters; each part is kept alive until then (CuPy's pool would reuse freed memory at once).
So the copies overlap backward's kernels and the host update, not the reads that need them.
Under engine/device_double.py copies happen at once and are counted (h2d_bytes, d2h_bytes).

Memory per rank, k bytes per element (float32: 4), P parameters (padded), N ranks, S = P/N,
the decay mask 1 byte per element. Ren et al. (section 4.1, mixed precision, M parameters):
the GPU keeps the fp16 parameters (2M) and only transient fp16 gradients, the CPU the fp32
master parameters, momentum and variance and the gradients (16M / N over N ranks). Here every
buffer has the parameters' dtype:

    device  stage 1   params kP + grads kP (the full buffer stage 1 accumulates in)  = 2kP
            stage 2   params kP (+ the buckets in flight, each ~bucket_bytes)         = kP
    host    master kS + grads kS + m, v 2kS + mask S      (+ stage 2's inbox kS)     = (4k + 1) S
    traffic per step: kS device-to-host (gradients), kS host-to-device (parameters)

Transient: the reduced parts stay alive until ``arrived`` (their copies may still be running),
so at the end of a stage-2 backward up to kS bytes of them are on the device at once (freeing
each part when an event after its copy is reached would bound that by the parts in flight).
"""
from engine import backend
from engine.backend import get_array_module
from engine.optim import AdamW

MODES = ("none", "optimizer")


class HostOptimizer:
    """The host half of ZeRO-Offload for one ZeroEngine, per dtype: a pinned master copy of the
    rank's parameter shard, a pinned gradient shard, their AdamW (NumPy m, v); one side stream.

    device  {dt: the device's 1-D parameter shard} (what the all-gather reads; a view of the
            full buffer in stages 1-2); masks {dt: its decay mask}; accumulate: stage 2 (the
            gradient parts of several backward passes are summed on the host); adamw: AdamW's
            hyper-parameters (engine/optim.py)."""

    def __init__(self, device, masks, accumulate, **adamw):
        first = next(iter(device.values()))
        if not backend.is_gpu_array(first):
            raise ValueError("ZeRO-Offload: the parameters are host arrays; offload moves the optimizer off a "
                             "device (--device gpu)")
        self.cp = get_array_module(first)
        self.stream = self.cp.cuda.Stream(non_blocking=True)
        self.device, self.accumulate = dict(device), accumulate
        self.optim, self.grads, self.inbox = {}, {}, {}
        for dt, d in device.items():
            master = backend.empty_pinned(d.shape, d.dtype)
            backend.copy_into(master, d)                            # (S,) device -> host
            grads = self._pinned_zeros(d)
            self.grads[dt] = grads
            self.inbox[dt] = self._pinned_zeros(d) if accumulate else grads    # where parts land
            self.optim[dt] = AdamW(master, grads, backend.to_numpy(masks[dt]), **adamw)
        self._in_flight = []                                        # parts whose copy may not be done
        self.received = 0                                           # parts received since the last arrived()

    @staticmethod
    def _pinned_zeros(like):
        a = backend.empty_pinned(like.shape, like.dtype)
        a.fill(0)
        return a

    def _after_current_stream(self):
        """The side stream waits for what the current stream has queued so far."""
        self.stream.wait_event(self.cp.cuda.get_current_stream().record())

    # -- gradients: device -> host ----------------------------------------------------------
    def receive(self, dt, offset, part):
        """GradBuckets' sink: this rank's reduced part of one bucket, elements [offset, offset +
        part.size) of its shard, is copied to the host as soon as its collective is done."""
        self._after_current_stream()
        part.get(out=self.inbox[dt][offset:offset + part.size], stream=self.stream, blocking=False)
        self._in_flight.append(part)
        self.received += 1

    def arrived(self):
        """After a backward's last bucket: wait for the copies; stage 2 adds the pass into the
        host gradient shard (every element of the inbox was written: the buckets cover it)."""
        self.stream.synchronize()
        self._in_flight, self.received = [], 0
        if self.accumulate:
            for dt, g in self.grads.items():
                g += self.inbox[dt]

    # -- parameters: host -> device ---------------------------------------------------------
    def step(self, dt, lr=None):
        """AdamW on the host master shard; each updated chunk goes to the device shard on the
        side stream while the next one is updated; returns once the device shard is whole."""
        opt, dev = self.optim[dt], self.device[dt]
        self._after_current_stream()                               # backward is done reading dev

        def upload(a, b):
            dev[a:b].set(opt.params[a:b], stream=self.stream)
        opt.step(lr, on_chunk=upload)
        self.stream.synchronize()

    def upload(self, dt):
        """The whole master shard to the device shard (after a checkpoint is loaded into it)."""
        backend.copy_into(self.device[dt], self.optim[dt].params)

    def host_bytes(self):
        """Bytes this rank keeps on the host: master, gradients, inbox, m, v, decay mask."""
        total = 0
        for dt, opt in self.optim.items():
            arrays = {id(a): a for a in (opt.params, opt.grads, self.inbox[dt], opt.exp_avg, opt.exp_avg_sq,
                                         opt.decay_mask) if a is not None}
            total += sum(a.nbytes for a in arrays.values())
        return total
