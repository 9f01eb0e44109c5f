"""What ZeRO's collectives carry: float32 as computed, or compressed (ZeRO++, Wang et al. 2023,
arXiv 2306.10209), and how many bytes that puts on the wire per step.

    weights   the parameter all-gathers (stage 3's per-layer gathers, parallel/data/fsdp.py;
              stages 1-2's gather after the update): int8 blockwise (qwZ) or bf16. Every rank,
              the owner included, computes with decode(encode(shard)), so all replicas hold
              the same bits; the owner's float32 shard stays the master copy AdamW updates
              (stages 1-2 then keep it apart from the full buffer: + 4P/N bytes).
    grads     the gradient reduce-scatter (parallel/data/buckets.py): int8 / int4 blockwise
              (qgZ) or bf16, as an all-to-all of encoded blocks reduced in float32
              (collectives/compressed.py), optionally in two hops over nodes of node_size
              ranks, optionally with error feedback (one residual per bucket: + 4P bytes).

Nothing set: the Communicator's own collectives, exactly as without this module. The error
feedback residuals live in memory only: checkpoints do not hold them, so a resumed run starts
them at zero (and differs from the uninterrupted one by one step's quantization error).

Bytes per step (``step_bytes``; all ranks together, N ranks, w(k) the codec's bytes for k
elements, 4k or 8k uncompressed; exact for N a power of two, where every all-gather and
reduce-scatter algorithm delivers each foreign block once):

    all_gather      (N-1) sum_k w(c_k) per gathered range: stage 3 each layer twice (forward,
                    and again before its backward) but the forward's last K still resident in
                    the pool's K slots once (every layer twice under the pool's poison), and
                    the root once; stages 1-2 the shards (c_k = S) once
    reduce_scatter  (N-1) sum_j 4 c_j per bucket (uncompressed; c_j the bucket's overlap with
                    rank j's shard)
    all_to_all      (N-1) sum_j w(c_j) per bucket; two hops (M nodes of g):
                    M (g-1) sum_l w(c1_l) + (M-1) sum_j w(c_j), c1_l = sum_m c_{m g + l}
"""
from collectives import compressed
from collectives.codecs import Codec

from .buckets import overlap_counts


class Wire:
    """The compression of one ZeroEngine's collectives over ``comm`` (see the module docstring).
    weights, grads: None or a codecs.KINDS name; block: elements per scale; error_feedback:
    keep each bucket's residuals; node_size: two-hop gradient reduce for 1 < g < comm.size (a
    collective: the node groups are split off comm)."""

    def __init__(self, comm, weights=None, grads=None, block=256, error_feedback=False, node_size=0):
        self.comm = comm
        self.weights = Codec(weights, block) if weights else None
        self.grads = Codec(grads, block) if grads else None
        if error_feedback and self.grads is None:
            raise ValueError("Wire: error feedback needs compressed gradients")
        self.feedback = {} if error_feedback else None
        self.hops = None
        if self.grads is not None and 1 < node_size < comm.size:
            self.hops = compressed.two_hop_groups(comm, node_size)

    def describe(self):
        """'' when nothing is compressed, else one phrase."""
        parts = []
        if self.weights is not None:
            parts.append(f"weights gathered as {self.weights.kind}")
        if self.grads is not None:
            hop = f", two hops over nodes of {self.hops.node.size}" if self.hops else ""
            ef = ", error feedback" if self.feedback is not None else ""
            parts.append(f"gradients reduced as an all-to-all of {self.grads.kind}{hop}{ef}")
        block = any(c is not None and c.bits for c in (self.weights, self.grads))
        return "; ".join(parts) + (f" (blocks of {(self.grads or self.weights).block})" if block else "")

    def communicators(self):
        """The groups this Wire made (two hops), for counting bytes."""
        return [] if self.hops is None else [self.hops.node, self.hops.cross]

    def all_gather(self, mine, out, counts=None, async_op=False):
        """comm.all_gather(mine, out=out, counts=counts), encoded when weights are compressed
        (then out holds decoded values everywhere, this rank's block included)."""
        if self.weights is None:
            return self.comm.all_gather(mine, out=out, counts=counts, async_op=async_op)
        return compressed.all_gather(self.comm, mine, out, self.weights, counts=counts, async_op=async_op)

    def reduce_scatter(self, x, counts, key, own=None, async_op=False):
        """The average over comm of x, this rank's block (counts: every rank's), in place as
        comm.reduce_scatter(x, op="avg", counts=counts): the result is x's own block (a view);
        encoded when gradients are compressed (key: the buffer's error-feedback slot), then the
        result goes into ``own`` (x's own block, when the caller needs it there) or a new array."""
        if self.grads is None:
            return self.comm.reduce_scatter(x, op="avg", counts=counts, async_op=async_op)
        fb = None
        if self.feedback is not None:
            fb = self.feedback.setdefault(key, compressed.ErrorFeedback())
        return compressed.reduce_scatter(self.comm, x, self.grads, counts=counts, op="avg", out=own, feedback=fb,
                                         hops=self.hops, async_op=async_op)


def _w(codec, n, itemsize):
    return n * itemsize if codec is None else codec.wire_bytes(n)


def step_bytes(engine):
    """{kind: bytes} all ranks send in one optimizer step of ``engine`` (a ZeroEngine, stage
    1-3, one forward and backward per step): the formula of the module docstring."""
    wire, flat, N = engine.wire, engine.flat, engine.comm.size
    out = {"all_gather": 0, "reduce_scatter": 0, "all_to_all": 0}
    if N == 1:
        return out
    item = {dt: flat.data[dt].dtype.itemsize for dt in flat.dtypes}
    if engine.layers is not None:
        units = list(zip(engine.layers.units, engine.layers.gathers_per_step())) + [(engine.layers.root, 1)]
        for unit, times in units:
            for dt, lo, hi in unit.segments:
                S = engine.param_shards[dt].size
                counts = overlap_counts(lo, hi, S, N)
                out["all_gather"] += times * (N - 1) * sum(_w(wire.weights, c, item[dt]) for c in counts)
    else:
        for dt in flat.dtypes:
            S = engine.param_shards[dt].size
            out["all_gather"] += (N - 1) * N * _w(wire.weights, S, item[dt])
    for b in engine.buckets.buckets:
        if wire.grads is None:
            out["reduce_scatter"] += (N - 1) * sum(b.counts) * item[b.dt]
        elif wire.hops is None:
            out["all_to_all"] += (N - 1) * sum(wire.grads.wire_bytes(c) for c in b.counts)
        else:
            g, M = wire.hops.node.size, wire.hops.cross.size
            c1 = [sum(b.counts[m * g + l] for m in range(M)) for l in range(g)]
            out["all_to_all"] += M * (g - 1) * sum(wire.grads.wire_bytes(c) for c in c1) \
                + (M - 1) * sum(wire.grads.wire_bytes(c) for c in b.counts)
    return out
