"""Ring attention (Liu, Zaharia and Abbeel 2023, "Ring Attention with Blockwise Transformers
for Near-Infinite Context", arXiv 2310.01889), on the blockwise kernels of
engine/ops/attention.py.

Each of the N ranks of the sp ring holds its queries, keys and values for T/N tokens
(q, k, v: (B, H, T/N, D)). Forward, N steps; at step s rank r holds the K/V block of
rank src = (r - s) mod N:

    step s:  post  isend(KV, r+1), irecv(KV', r-1)        the next block travels ...
             O_s, LSE_s = attention(Q, KV_src) per segment  ... while this one is computed
             O, LSE = merge(O, LSE, O_s, LSE_s)            LSE = log(e^LSE + e^LSE_s),
             wait; KV <- KV'                               O = e^(LSE_old-LSE) O + e^(LSE_s-LSE) O_s

The causal mask compares global positions (the kernel's q_offset / k_offset), segment by
segment, so any layout of parallel/sequence/split.py works; pairs of segments lying
wholly in a query's future are skipped. With the zigzag layout every rank computes the
same number of visible tiles at every step (two chunk-pairs of T/2N x T/2N after step 0).

Backward (the FlashAttention-2 recomputation, Dao 2023, applied per block with the FINAL
O and LSE: P = exp(S - LSE), D = rowsum(dO * O)): K and V travel the ring again, ahead of
the compute; the gradient accumulators dK, dV of the block travel with it, one step
behind (sent after the block's contribution is added), and after N steps each
accumulator arrives back at its owner:

    step s:  post isend/irecv of KV (next block)             overlaps this step's compute
             dQ += dQ_blk;  dKV_blk = grads w.r.t. block src
             wait dKV(src) from r-1 (s > 0); dKV(src) += dKV_blk; post isend/irecv of dKV
    end:     wait: dKV(r) has come home

Cost per step: one (B, H, T/N, D) K plus V message (2 BHTD/N elements) forward, twice that
backward; compute (T/N)^2 per head and step, hidden behind the transfer once
T/N >> bandwidth / flops. Memory per rank: Q, K, V, O (B, H, T/N, D), two K/V buffers
and two dK/dV buffers, plus the kernel's (B, H, T/2N, block) tile: nothing grows with T
beyond the local chunk.
"""
from engine.autograd import Function
from engine.backend import get_array_module
from engine.ops.attention import attention_backward, attention_forward, merge_attention

from .split import local_segments

TAG_FWD, TAG_KV, TAG_DKV = 71, 72, 73


class RingShift:
    """One ring step of a buffer: send `buf` to rank+1 while receiving into `into` from
    rank-1 (non-blocking). wait() finishes both and returns `into`."""

    def __init__(self, comm, buf, into, tag):
        n, r = comm.size, comm.rank
        self.into = into
        self._recv = comm.irecv(into, (r - 1) % n, tag)
        self._send = comm.isend(buf, (r + 1) % n, tag)

    def poke(self):
        """Let MPI make progress during compute (no thread does it for us)."""
        self._recv.test()

    def wait(self):
        self._recv.wait()
        self._send.wait()
        return self.into


def block_forward(q, kv, qsegs, ksegs, causal, scale, block_size, partial, shift=None):
    """Attention of the local queries against one K/V block, merged into `partial`
    (a list per q segment of (o, lse) or None). q (B, H, Tl, D); kv (2, B, H, Tl, D)."""
    for i, (qp, ql, qo) in enumerate(qsegs):
        for (kp, kl, ko) in ksegs:
            if causal and qp + ql - 1 < kp:                 # the whole key segment is in the future
                continue
            o, lse = attention_forward(q[:, :, qo:qo + ql], kv[0, :, :, ko:ko + kl], kv[1, :, :, ko:ko + kl],
                                       causal=causal, scale=scale, q_offset=qp, k_offset=kp,
                                       block_size=block_size)      # (B, H, ql, D), (B, H, ql)
            partial[i] = (o, lse) if partial[i] is None else merge_attention(*partial[i], o, lse)
            if shift is not None:
                shift.poke()


def block_backward(q, kv, o, lse, do, qsegs, ksegs, causal, scale, block_size, dq, dkv, shift=None):
    """Add one K/V block's contribution to dq (B, H, Tl, D) and to dkv (2, B, H, Tl, D)."""
    for (qp, ql, qo) in qsegs:
        qsl = slice(qo, qo + ql)
        for (kp, kl, ko) in ksegs:
            if causal and qp + ql - 1 < kp:
                continue
            ksl = slice(ko, ko + kl)
            g = attention_backward(q[:, :, qsl], kv[0, :, :, ksl], kv[1, :, :, ksl], o[:, :, qsl],
                                   lse[:, :, qsl], do[:, :, qsl], causal=causal, scale=scale,
                                   q_offset=qp, k_offset=kp, block_size=block_size)
            dq[:, :, qsl] += g[0]                           # (B, H, ql, D)
            dkv[0, :, :, ksl] += g[1]                       # (B, H, kl, D)
            dkv[1, :, :, ksl] += g[2]
            if shift is not None:
                shift.poke()


class RingAttention(Function):
    """softmax(scale Q K^T + mask) V over a sequence sharded on `comm` (sp ring).
    q, k, v (B, H, T/N, D) local, in `layout` (parallel/sequence/split.py) -> (B, H, T/N, D)."""

    def forward(self, q, k, v, comm=None, causal=True, layout="zigzag", scale=None, block_size=256):
        xp = get_array_module(q)
        B, H, Tl, D = q.shape
        N, r = comm.size, comm.rank
        T = N * Tl
        self.scale = D ** -0.5 if scale is None else float(scale)
        self.comm, self.causal, self.block_size = comm, causal, block_size
        self.segs = [local_segments(T, j, N, layout) for j in range(N)]   # every rank's segments
        kv = xp.empty((2, B, H, Tl, D), q.dtype)            # (2, B, H, T/N, D): one message
        kv[0], kv[1] = k, v
        spare = xp.empty_like(kv) if N > 1 else None
        partial = [None] * len(self.segs[r])
        for s in range(N):
            src = (r - s) % N
            shift = RingShift(comm, kv, spare, TAG_FWD) if s < N - 1 else None
            block_forward(q, kv, self.segs[r], self.segs[src], causal, self.scale, block_size, partial, shift)
            if shift is not None:
                kv, spare = shift.wait(), kv
        o = xp.concatenate([p[0] for p in partial], axis=2) if len(partial) > 1 else partial[0][0]
        lse = xp.concatenate([p[1] for p in partial], axis=2) if len(partial) > 1 else partial[0][1]
        self.q, self.k, self.v, self.o, self.lse = q, k, v, o, lse   # o (B, H, T/N, D), lse (B, H, T/N)
        return o

    def backward(self, g):
        xp = get_array_module(g)
        q, o, lse, comm = self.q, self.o, self.lse, self.comm
        N, r = comm.size, comm.rank
        kv = xp.empty((2,) + q.shape, q.dtype)              # (2, B, H, T/N, D)
        kv[0], kv[1] = self.k, self.v
        kv_spare = xp.empty_like(kv) if N > 1 else None
        dq = xp.zeros_like(q)
        dkv, dkv_spare = xp.zeros_like(kv), (xp.empty_like(kv) if N > 1 else None)
        blk, dkv_shift = xp.empty_like(kv), None
        for s in range(N):
            src = (r - s) % N
            kv_shift = RingShift(comm, kv, kv_spare, TAG_KV) if s < N - 1 else None
            blk.fill(0)                                      # this block's dK, dV from my queries
            block_backward(q, kv, o, lse, g, self.segs[r], self.segs[src], self.causal, self.scale,
                           self.block_size, dq, blk, kv_shift or dkv_shift)
            if dkv_shift is not None:                        # the accumulator of block src, from r-1
                dkv, dkv_spare = dkv_shift.wait(), dkv
            dkv += blk
            if N > 1:
                dkv_shift = RingShift(comm, dkv, dkv_spare, TAG_DKV)
            if kv_shift is not None:
                kv, kv_spare = kv_shift.wait(), kv
        if dkv_shift is not None:
            dkv = dkv_shift.wait()                           # my own block's accumulator, home
        self.q = self.k = self.v = self.o = self.lse = None
        return dq, dkv[0], dkv[1]


def ring_attention(q, k, v, comm, causal=True, layout="zigzag", scale=None, block_size=256):
    """Differentiable ring attention on Tensors q, k, v (B, H, T/N, D) sharded over comm."""
    return RingAttention.apply(q, k, v, comm=comm, causal=causal, layout=layout, scale=scale,
                               block_size=block_size)
