"""DeepSpeed-Ulysses (Jacobs et al. 2023, "DeepSpeed Ulysses: System Optimizations for
Enabling Training of Extreme Long Sequence Transformer Models", arXiv 2309.14509).

Attention heads are independent, so instead of moving K/V around a ring, one all-to-all
trades the sequence sharding for a head sharding, every rank runs ordinary attention on
the whole sequence for its group of heads, and a second all-to-all trades back:

    q, k, v (B, H, T/N, D) on each rank       sequence-sharded
        all-to-all (head group j -> rank j)
    q, k, v (B, H_r, T, D)                    head-sharded, whole sequence
        O, LSE = attention(q, k, v)           engine/ops/attention.py, causal on positions 0..T-1
    o (B, H_r, T, D)
        all-to-all (token chunk i -> rank i)
    o (B, H, T/N, D)                          sequence-sharded again

Backward is the same two exchanges in reverse order: dO travels seq -> head sharded,
the kernel's backward gives dQ, dK, dV for the head group, and one all-to-all carries the
three back to sequence sharding.

Uneven heads: H need not divide by N. Head groups are balanced (H // N heads, one more on
the first H % N ranks) and the all-to-alls use uneven counts, so any H works (with H < N
some ranks hold no head and only relay). Cost: 4 all-to-alls of BHTD/N elements per rank
per layer forward (q, k, v packed into one message, then o) and 4 backward; each rank
sends (N-1)/N of its data, independent of N in bandwidth terms (Jacobs et al. section 3.2).
Memory per rank: the head group's full-sequence q, k, v, o (B, H/N, T, D) plus the
kernel's tile, so it too shrinks as 1/N.

The gathered tokens arrive in rank order; for a layout other than contiguous they are
permuted into position order before the causal kernel and back afterwards.
"""
import numpy as np

from engine.autograd import Function
from engine.backend import get_array_module
from engine.ops.attention import attention_backward, attention_forward

from .split import positions


def head_counts(H, N):
    """Heads per rank: balanced, the first H % N ranks one more."""
    return [H // N + (1 if j < H % N else 0) for j in range(N)]


def _order(T, N, layout):
    """Permutation taking rank-ordered gathered tokens to position order (None: identity)."""
    gathered = np.concatenate([positions(T, j, N, layout) for j in range(N)])
    if (gathered == np.arange(T)).all():
        return None, None
    perm = np.argsort(gathered)
    return perm, np.argsort(perm)


class UlyssesAttention(Function):
    """Attention over a sequence sharded on `comm`: q, k, v (B, H, T/N, D) -> (B, H, T/N, D)."""

    def forward(self, q, k, v, comm=None, causal=True, layout="contiguous", scale=None, block_size=256):
        B, H, Tl, D = q.shape
        N, r = comm.size, comm.rank
        self.comm, self.causal, self.block_size = comm, causal, block_size
        self.scale = D ** -0.5 if scale is None else float(scale)
        self.hc = head_counts(H, N)
        self.perm, self.inv = _order(N * Tl, N, layout)
        qkv = self._seq_to_heads((q, k, v))                   # (3, B, h, T, D)
        self.q, self.k, self.v = qkv[0], qkv[1], qkv[2]
        if self.hc[r]:
            self.o, self.lse = attention_forward(self.q, self.k, self.v, causal=causal, scale=self.scale,
                                                 block_size=block_size)   # (B, h, T, D), (B, h, T)
        else:
            self.o, self.lse = qkv[0].copy(), None
        return self._heads_to_seq(self.o[None], H)[0]        # (B, H, T/N, D)

    def backward(self, g):
        H = g.shape[1]
        do = self._seq_to_heads((g,))[0]                      # (B, h, T, D)
        if self.hc[self.comm.rank]:
            grads = attention_backward(self.q, self.k, self.v, self.o, self.lse, do, causal=self.causal,
                                       scale=self.scale, block_size=self.block_size)
        else:
            grads = (do,) * 3                                 # empty: no head here
        d = get_array_module(g).stack(grads)                  # (3, B, h, T, D)
        self.q = self.k = self.v = self.o = self.lse = None
        dq, dk, dv = self._heads_to_seq(d, H)
        return dq, dk, dv

    # -- the two all-to-alls ------------------------------------------------------------------
    def _seq_to_heads(self, arrays):
        """m arrays (B, H, T/N, D) -> (m, B, h, T, D): my head group over the whole sequence."""
        xp = get_array_module(arrays[0])
        m, (B, H, Tl, D), N, r = len(arrays), arrays[0].shape, self.comm.size, self.comm.rank
        h = self.hc[r]
        send = xp.empty((H, m, B, Tl, D), arrays[0].dtype)  # head-major: group j is one block
        for i, a in enumerate(arrays):
            send[:, i] = a.transpose(1, 0, 2, 3)              # (H, B, T/N, D)
        unit = m * B * Tl * D
        recv = xp.empty((N, h, m, B, Tl, D), send.dtype)      # from rank i: its tokens, my heads
        self.comm.all_to_all(send, out=recv, send_counts=[c * unit for c in self.hc],
                             recv_counts=[h * unit] * N)
        full = recv.transpose(2, 3, 1, 0, 4, 5).reshape(m, B, h, N * Tl, D)   # (m, B, h, T, D)
        if self.perm is not None:
            full = full[:, :, :, xp.asarray(self.perm)]       # rank order -> position order
        return xp.ascontiguousarray(full)

    def _heads_to_seq(self, x, H):
        """(m, B, h, T, D) of my head group -> (m, B, H, T/N, D): all heads, my tokens."""
        xp = get_array_module(x)
        m, B, h, T, D = x.shape
        N = self.comm.size
        Tl = T // N
        if self.inv is not None:
            x = x[:, :, :, xp.asarray(self.inv)]              # position order -> rank order
        send = xp.ascontiguousarray(x.reshape(m, B, h, N, Tl, D).transpose(3, 2, 0, 1, 4, 5))  # (N, h, m, B, Tl, D)
        unit = m * B * Tl * D
        recv = xp.empty((H, m, B, Tl, D), x.dtype)            # from rank j: its heads, my tokens
        self.comm.all_to_all(send, out=recv, send_counts=[h * unit] * N,
                             recv_counts=[c * unit for c in self.hc])
        return recv.transpose(1, 2, 0, 3, 4)                  # (m, B, H, T/N, D)


def ulysses_attention(q, k, v, comm, causal=True, layout="contiguous", scale=None, block_size=256):
    """Differentiable Ulysses attention on Tensors q, k, v (B, H, T/N, D) sharded over comm."""
    return UlyssesAttention.apply(q, k, v, comm=comm, causal=causal, layout=layout, scale=scale,
                                  block_size=block_size)
