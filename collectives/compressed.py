"""Compressed collectives: an all-gather of encoded blocks, and a reduce-scatter run as an
all-to-all of encoded blocks reduced in float32 (optionally in two hops), with error feedback.

Source: ZeRO++ (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication for
Giant Model Training", arXiv 2306.10209): qwZ, section 3.1 (blockwise-quantized weight
all-gather) and qgZ, section 3.3 (the gradient reduce-scatter replaced by an all-to-all of
quantized blocks, dequantized and reduced in full precision, hierarchically: inside a node,
then across nodes). Error feedback: 1-bit Adam (Tang et al. 2021, arXiv 2102.02888,
section 3: each end keeps its compression error and adds it to the next message; Seide et
al. 2014 and Karimireddy et al. 2019, "Error Feedback Fixes SignSGD", for why it converges).
Codecs (int8, int4 blockwise, bf16): collectives/codecs.py.

Why an all-to-all, not a ring. A ring reduce-scatter adds partial sums on the way, so a
quantized ring would re-quantize at every hop and its error would grow with N. Here every
block is encoded once by its sender and decoded once by its owner:

    rank r:  x_r = [ b_0 | b_1 | ... | b_{N-1} ]      (b_j: counts[j] elements for rank j)
             send encode(b_j) to rank j                  (one all-to-all, pairwise: alltoall.py)
    owner j: y_j = sum_{r = 0..N-1} decode(encode(b_j of x_r))   in float32, rank order; avg: / N

Two hops (hops = two_hop_groups(comm, g), N = g M: M nodes of g consecutive ranks, rank
r = m g + l). Hop 1, inside the node (size g): chunk l' = the blocks of every node's local
rank l', [ b_{0 g + l'} | b_{1 g + l'} | ... ], goes to local rank l'; decoded and summed it is
the node's partial of those M blocks. Hop 2, across nodes (the M ranks of local rank l):
block m' g + l of the partial, encoded again, goes to node m'. Every block is encoded twice,
but only n/g elements per rank cross node boundaries (ZeRO++'s 4x fewer cross-node bytes for
int4 against float32, at g = 8 with 0.5 bytes per element).

Error feedback (``feedback``, an ErrorFeedback per buffer reduced): the input of each
encoding is  x + e  with e the residual its previous call left, and  e <- (x + e) - decode(
encode(x + e)). Summed over T calls the encoded inputs telescope to  sum_t x_t - e_T, so the
error accumulated over any number of steps stays that of ONE quantization (|e| <= scale/2
per element), where without feedback it adds up (a constant bias grows linearly in T).
Hop 2's encoding keeps its own residual (the "server" end of 1-bit Adam). Memory: one
float32 residual the size of the input per buffer (hop 2: 1/g of it more).

Cost, alpha-beta-gamma (collectives/cost.py): p ranks, n elements, w(k) the codec's wire bytes
for k elements (codecs.py), kappa seconds per element to encode plus decode:

    all_gather       (p-1) alpha + (p-1)/p w(n) beta + kappa n              (n: the gathered size)
    reduce_scatter   (p-1) alpha + (p-1)/p w(n) beta + kappa n + n/p p g4    (g4: a float32 add)
      two hops       (g-1) alpha + (g-1)/g w(n) beta_node + (M-1) alpha + (M-1)/M w(n/g) beta_net
                     + kappa n (1 + 1/g)
against float32 ring reduce-scatter (p-1) alpha + (p-1)/p 4n (beta + gamma). Bytes sent by all
ranks together: all-gather (p-1) sum_k w(c_k); reduce-scatter p sum_{j != r} w(c_j) = (p-1)
sum_j w(c_j) (every rank encodes the same counts); two hops M (g-1) sum_l w(c1_l) + (M-1) sum_j
w(c_j), with c1_l = sum_m c_{m g + l}. Memory: the encoded send and receive buffers (about
2 w(n) bytes), one float32 block to accumulate in.
"""
import numpy as np

from engine.backend import get_array_module

from .buffers import balanced, offsets


class Pending:
    """A compressed collective in flight: the Communicator's handle, then the decoding (and a
    second hop), run by ``wait()``, which returns the result; ``test()`` moves the handle along."""

    def __init__(self, handle, finish):
        self._handle, self._finish, self._result, self.done = handle, finish, None, False

    def test(self):
        return self._handle.test()

    def wait(self):
        if not self.done:
            self._handle.wait()
            self._result, self.done = self._finish(), True
        return self._result


class ErrorFeedback:
    """The residuals of one buffer's encodings, by hop, kept between calls (see the docstring)."""

    def __init__(self):
        self.residuals = {}

    def add_to(self, hop, x):
        """x + this hop's residual (a new array; the residual starts at zero)."""
        e = self.residuals.get(hop)
        if e is None:
            e = self.residuals[hop] = get_array_module(x).zeros(x.size, dtype=x.dtype)
        return x + e

    def residual(self, hop):
        return self.residuals[hop]


class TwoHop:
    """The groups of a two-hop reduce: node (the g ranks m g .. m g + g - 1, ranked by l) and
    cross (the M ranks l, g + l, 2 g + l, ..., ranked by m). Built by two_hop_groups."""

    def __init__(self, node, cross):
        self.node, self.cross = node, cross


def two_hop_groups(comm, g):
    """TwoHop over comm's ranks in nodes of g consecutive ranks (a collective; g divides comm.size)."""
    if comm.size % g:
        raise ValueError(f"two_hop_groups: {comm.size} ranks do not split into nodes of {g}")
    r = comm.rank
    return TwoHop(comm.split(r // g, key=r % g, label=f"{comm.label} node"),
                  comm.split(r % g, key=r // g, label=f"{comm.label} cross"))


def _work_dtype(x):
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def all_gather(comm, x, out, codec, counts=None, async_op=False):
    """out = the concatenation over ranks of decode(encode(x_k)), the own block included, so
    every rank holds the same bits. counts: the elements of each rank's x (default: equal)."""
    n = comm.size
    counts = [x.size] * n if counts is None else [int(c) for c in counts]
    if sum(counts) != out.size:
        raise ValueError(f"compressed all_gather: out has {out.size} elements, the blocks {sum(counts)}")
    offs = offsets(counts)
    wire = [codec.wire_bytes(c) for c in counts]
    woffs = offsets(wire)
    buf = get_array_module(x).empty(woffs[n], dtype=np.uint8)    # (sum w(c_k),) every rank's bytes
    h = comm.all_gather(codec.encode(x), out=buf, counts=wire, async_op=True)

    def finish():
        flat = out.reshape(-1)
        for k in range(n):
            if counts[k]:
                codec.decode(buf[woffs[k]:woffs[k + 1]], flat[offs[k]:offs[k + 1]])
        return out
    p = Pending(h, finish)
    return p if async_op else p.wait()


def _encode(x, counts, codec, feedback, hop):
    """(send buffer, wire counts): chunk j of x (counts[j] elements) encoded for rank j; with
    feedback, x is the input plus the residual, and the residual becomes x - decode(encode(x))."""
    xp, offs = get_array_module(x), offsets(counts)
    parts = [codec.encode(x[offs[j]:offs[j + 1]]) for j in range(len(counts))]
    if feedback is not None:
        e = feedback.residual(hop)
        for j, part in enumerate(parts):
            seg = codec.decode(part, e[offs[j]:offs[j + 1]])
            xp.subtract(x[offs[j]:offs[j + 1]], seg, out=seg)
    return xp.concatenate(parts) if parts else xp.zeros(0, np.uint8), [p.size for p in parts]


def _exchange(comm, x, counts, mine, codec, feedback, hop, async_op):
    """All-to-all of x's encoded chunks (counts[j] elements to rank j); every rank sends this
    rank `mine` elements. Returns (handle or received bytes, the receive buffer, w(mine))."""
    send, wire = _encode(x, counts, codec, feedback, hop)
    w = codec.wire_bytes(mine)
    recv = get_array_module(x).empty(w * comm.size, dtype=np.uint8)      # (p w(mine),) by sender
    h = comm.all_to_all(send, out=recv, send_counts=wire, recv_counts=[w] * comm.size, async_op=async_op)
    return h, recv, w


def _sum(codec, recv, w, p, count, dtype, xp):
    """sum_k decode(recv[k w:(k+1) w]) over the p senders, in rank order, in dtype."""
    acc, tmp = xp.empty(count, dtype), xp.empty(count, dtype)
    codec.decode(recv[:w], acc)
    for k in range(1, p):
        acc += codec.decode(recv[k * w:(k + 1) * w], tmp)
    return acc


def reduce_scatter(comm, x, codec, counts=None, op="avg", out=None, feedback=None, hops=None, async_op=False):
    """This rank's block of the sum (op "sum") or mean ("avg") over ranks of x, each block
    sent encoded once per hop and reduced in float32 (float64 for float64 x). counts: every
    rank's block sizes (default: balanced); out: where the block goes (default: a new array of
    x's dtype); feedback: an ErrorFeedback for this buffer; hops: a TwoHop (two_hop_groups)."""
    if op not in ("sum", "avg"):
        raise ValueError(f"compressed reduce_scatter: op must be sum or avg, got {op!r}")
    p, r, xp = comm.size, comm.rank, get_array_module(x)
    counts = list(balanced(x.size, p)[0]) if counts is None else [int(c) for c in counts]
    if sum(counts) != x.size or len(counts) != p:
        raise ValueError(f"compressed reduce_scatter: {len(counts)} counts summing to {sum(counts)} for "
                         f"{x.size} elements on {p} ranks")
    flat, dtype = x.reshape(-1), _work_dtype(x)
    if hops is not None:                               # hop 1's chunks: [b_{0 g + l'} | b_{1 g + l'} | ...]
        g, M, offs = hops.node.size, hops.cross.size, offsets(counts)
        order = [m * g + l for l in range(g) for m in range(M)]
        flat = xp.concatenate([flat[offs[j]:offs[j + 1]] for j in order]).astype(dtype, copy=False)
        mine = [counts[m * g + hops.node.rank] for m in range(M)]          # hop 2's blocks, by node
        c1 = [sum(counts[m * g + l] for m in range(M)) for l in range(g)]
        send_comm, send_counts, first = hops.node, c1, sum(mine)
    else:
        send_comm, send_counts, first = comm, counts, counts[r]
    if feedback is not None:
        flat = feedback.add_to("hop 1", flat.astype(dtype, copy=False))
    h, recv, w = _exchange(send_comm, flat, send_counts, first, codec, feedback, "hop 1", True)

    def finish():
        acc = _sum(codec, recv, w, send_comm.size, first, dtype, xp)       # (first,)
        if hops is not None:                            # hop 2: block m g + l of the partial to node m
            part = acc if feedback is None else feedback.add_to("hop 2", acc)
            _, recv2, w2 = _exchange(hops.cross, part, mine, counts[r], codec, feedback, "hop 2", False)
            acc = _sum(codec, recv2, w2, hops.cross.size, counts[r], dtype, xp)   # (counts[r],)
        if op == "avg":
            acc /= p
        if out is None:
            return acc.astype(x.dtype, copy=False)
        out.reshape(-1)[...] = acc
        return out
    pend = Pending(h, finish)
    return pend if async_op else pend.wait()
