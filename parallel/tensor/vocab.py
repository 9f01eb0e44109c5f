"""The tied embedding split by vocabulary rows over tp, as Megatron-LM's VocabParallelEmbedding
and vocab-parallel cross-entropy (Shoeybi et al. 2019, section 3: "parallelize the output
embedding GEMM ... fuse the output with the cross-entropy loss").

The vocabulary V is padded to Vp, a multiple of tp x granule (Megatron's
make-vocab-size-divisible-by); rank r holds rows [r Vp/tp, (r+1) Vp/tp) of the padded table.
Padded rows are zero, never looked up, and their logits are -inf, so every loss and every
gradient is the unpadded model's exactly.

    embedding   e = reduce_from_tp(W_r[idx - lo] masked to ids in [lo, hi))     (B, T, C)
    logits      z_r = copy_to_tp(x) W_r^T                                       (B, T, Vp/tp)
    loss        m = all-reduce max_r (max_j z_r), s = all-reduce sum_r (sum_j e^(z_r - m)),
                z_t = all-reduce sum (the target's logit, held by one rank),
                loss_i = log s + m - z_t                        (the full logits never exist)
    backward    dz_r = (e^(z_r - m) / s - onehot_r(target)) * w    w: 1/n_valid (mean) or 1

Communication per loss: three all-reduces of B T numbers (max, then sum-exp and the target
logit in one), against the (B, T, V) logits a gather would move.
"""
import numpy as np

from engine import ops
from engine.autograd import Function, Tensor, is_grad_enabled
from engine.backend import get_array_module
from engine.nn import Module, Parameter

from .comm import copy_to_tp, gather_linear, reduce_from_tp, scatter_tokens


def padded_vocab(V, tp, granule=1):
    """The smallest multiple of tp * granule that holds V rows."""
    unit = tp * granule
    return -(-V // unit) * unit


class VocabParallelCrossEntropy(Function):
    """Cross-entropy of vocabulary-sharded logits z_r (..., Vp/tp) against global targets."""

    def forward(self, logits, targets=None, lo=0, vocab=None, comm=None, ignore_index=-1, reduction="mean"):
        xp = get_array_module(logits)
        Vl = logits.shape[-1]
        self.shape = logits.shape
        z = logits.reshape(-1, Vl).copy()                              # (N, Vp/tp)
        if lo + Vl > vocab:                                            # padded rows: no probability
            z[:, max(vocab - lo, 0):] = -np.inf
        t = xp.asarray(targets).reshape(-1)                            # (N,)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"cross_entropy: {t.shape[0]} targets for {z.shape[0]} rows of logits")
        valid = t != ignore_index
        mine = valid & (t >= lo) & (t < lo + Vl)                       # the target's logit lives here
        local_t = xp.where(mine, t - lo, 0)
        m = z.max(axis=1)                                              # (N,)
        comm.all_reduce(m, op="max", cache=False)
        z -= m[:, None]
        zt = xp.where(mine, z[xp.arange(z.shape[0]), local_t], 0.0)    # (N,) shifted target logit, or 0
        xp.exp(z, out=z)
        both = xp.stack([z.sum(axis=1), zt])                           # (2, N): sum-exp, target logit
        comm.all_reduce(both, cache=False)
        s, zt = both[0], both[1]
        loss = xp.log(s) - zt
        w = valid.astype(logits.dtype)
        if reduction == "mean":
            w *= (1.0 / max(int(valid.sum()), 1))
        loss *= w
        if is_grad_enabled() and self.needs_input_grad[0]:
            z *= (w / s)[:, None]                                      # softmax * w
            z[xp.arange(z.shape[0])[mine], local_t[mine]] -= w[mine]   # - onehot * w
            self.d = z
        return loss.reshape(t.shape) if reduction == "none" else xp.asarray(loss.sum())

    def backward(self, g):
        return ((self.d * g).reshape(self.shape),) if g.ndim == 0 else \
            ((self.d * g.reshape(-1, 1)).reshape(self.shape),)


class VocabParallelEmbedding(Module):
    """Rows [lo, hi) of the padded (Vp, C) table on this rank; ``vocab`` the true V."""

    def __init__(self, weight, comm, lo, vocab, tokens=False):
        self.weight, self.comm, self.lo, self.vocab, self.tokens = weight, comm, lo, vocab, tokens
        self.num_embeddings, self.embedding_dim = vocab, weight.shape[1]

    @classmethod
    def from_embedding(cls, emb, comm, granule=1, tokens=False):
        """This rank's rows of a dense Embedding (every rank built the same one); ``tokens``:
        the output is this rank's tokens of a sequence-parallel region (reduce-scattered), and
        the output layer's input arrives so (all-gathered)."""
        V, C = emb.weight.shape
        Vp = padded_vocab(V, comm.size, granule)
        n = Vp // comm.size
        lo = comm.rank * n
        xp = get_array_module(emb.weight.data)
        rows = xp.zeros((n, C), dtype=emb.weight.data.dtype)          # (Vp/tp, C), padded rows zero
        hi = min(lo + n, V)
        if hi > lo:
            rows[:hi - lo] = emb.weight.data[lo:hi]
        return cls(Parameter(rows, decay=emb.weight.decay), comm, lo, V, tokens)

    def forward(self, idx):
        idx = idx.data if isinstance(idx, Tensor) else idx
        xp = get_array_module(self.weight.data)
        idx = xp.asarray(idx)
        n = self.weight.shape[0]
        mine = (idx >= self.lo) & (idx < self.lo + n)                  # (B, T)
        e = ops.embedding(xp.where(mine, idx - self.lo, 0), self.weight)   # (B, T, C)
        e = e * mine[..., None].astype(self.weight.data.dtype)         # other ranks' ids: zero rows
        return scatter_tokens(e, self.comm) if self.tokens else reduce_from_tp(e, self.comm)   # (B, T[/tp], C)

    def logits(self, x):
        if self.tokens:                                                # (B, T/tp, C) -> (B, T, Vp/tp)
            return gather_linear(x, self.weight, None, self.comm)
        return ops.linear(copy_to_tp(x, self.comm), self.weight)      # (B, T, C) -> (B, T, Vp/tp)

    def full_logits(self, logits):
        """(..., V) logits gathered from every rank's columns (..., Vp/tp), padding dropped: for
        decoding, where one position's logits are cheap to gather (tensor-parallel sampling)."""
        xp = get_array_module(logits)
        lead, n = logits.shape[:-1], logits.shape[-1]
        got = self.comm.all_gather(xp.ascontiguousarray(logits).reshape(-1))   # (tp * prod(lead) * n,)
        got = xp.moveaxis(got.reshape((self.comm.size,) + lead + (n,)), 0, -2)  # (..., tp, n)
        return got.reshape(lead + (self.comm.size * n,))[..., :self.vocab]

    def cross_entropy(self, logits, targets, reduction="mean"):
        targets = targets.data if isinstance(targets, Tensor) else targets
        return VocabParallelCrossEntropy.apply(logits, targets=targets, lo=self.lo, vocab=self.vocab,
                                               comm=self.comm, reduction=reduction)
