"""Megatron-LM's parallel linear layers (Shoeybi et al. 2019, section 3, figure 3), with
W (out, in) stored as PyTorch stores it and y = x W^T + b.

ColumnParallelLinear: rank r holds the rows R_r of W and b (its output features):

    forward    y_r = copy_to_tp(x) W_r^T + b_r      (B, T, in) -> (B, T, |R_r|), no communication
    backward   dx = all-reduce_r (dy_r W_r)          dW_r = dy_r^T x, db_r = sum dy_r (local)

RowParallelLinear: rank r holds the columns K_r of W (its input features), b whole:

    forward    y = reduce_from_tp(x_r W_r^T) + b     (B, T, |K_r|) -> (B, T, out): one all-reduce
    backward   dx_r = dy W_r (local)                 dW_r = dy^T x_r, db = sum dy (the same on every rank)

A column-parallel layer followed by a row-parallel one (the MLP; QKV then the attention
projection, heads split over tp) needs no communication in between: one all-reduce forward
and one backward per pair. With ``tokens`` (sequence-parallel regions, Korthikanti et al.
2022) the column-parallel layer's input arrives split along tokens and is all-gathered
(reduce-scattered in backward), the row-parallel layer's output is reduce-scattered along
tokens (all-gathered in backward), and its bias, applied to this rank's tokens only, has its
gradient summed over tp (copy_to_tp on the parameter). ``from_linear`` cuts a dense engine.nn.Linear (every rank built
the same one from the seed), so the tp layers hold exactly the dense layer's numbers.
"""
import numpy as np

from engine import ops
from engine.backend import get_array_module
from engine.nn import Module, Parameter

from .comm import copy_to_tp, gather_linear, reduce_from_tp, scatter_tokens


def _take(p, index, axis):
    """A Parameter holding p's slice along axis (a copy), with p's weight-decay flag."""
    xp = get_array_module(p.data)
    return Parameter(xp.ascontiguousarray(xp.take(p.data, xp.asarray(index), axis=axis)), decay=p.decay)


class ColumnParallelLinear(Module):
    """Rows ``rows`` of a Linear's W and b on this rank; ``comm`` the tp Communicator."""

    def __init__(self, weight, bias, comm, rows, tokens=False):
        self.weight, self.bias, self.comm, self.rows, self.tokens = weight, bias, comm, np.asarray(rows), tokens

    @classmethod
    def from_linear(cls, linear, rows, comm, tokens=False):
        return cls(_take(linear.weight, rows, 0), None if linear.bias is None else _take(linear.bias, rows, 0),
                   comm, rows, tokens)

    def forward(self, x):
        if self.tokens:                                                      # (B, T/tp, in) -> (B, T, out/tp)
            return gather_linear(x, self.weight, self.bias, self.comm)
        return ops.linear(copy_to_tp(x, self.comm), self.weight, self.bias)  # (B, T, in) -> (B, T, out/tp)


class RowParallelLinear(Module):
    """Columns ``cols`` of a Linear's W on this rank, b whole; ``comm`` the tp Communicator."""

    def __init__(self, weight, bias, comm, cols, tokens=False):
        self.weight, self.bias, self.comm, self.cols, self.tokens = weight, bias, comm, np.asarray(cols), tokens

    @classmethod
    def from_linear(cls, linear, cols, comm, tokens=False):
        return cls(_take(linear.weight, cols, 1), linear.bias, comm, cols, tokens)

    def forward(self, x):
        y = ops.linear(x, self.weight)                                       # (B, T, in/tp) -> (B, T, out) partial
        if not self.tokens:
            y = reduce_from_tp(y, self.comm)                                 # (B, T, out)
            return y if self.bias is None else y + self.bias
        y = scatter_tokens(y, self.comm)                                     # (B, T/tp, out)
        return y if self.bias is None else y + copy_to_tp(self.bias, self.comm)


class ReplicatedLayerNorm(Module):
    """A LayerNorm inside a sequence-parallel region: this rank's tokens only, so the gradients
    of its weight and bias are summed over tp (copy_to_tp on the parameters)."""

    def __init__(self, ln, comm):
        self.weight, self.bias, self.eps, self.dim, self.comm = ln.weight, ln.bias, ln.eps, ln.dim, comm

    def forward(self, x):
        b = None if self.bias is None else copy_to_tp(self.bias, self.comm)
        return ops.layer_norm(x, copy_to_tp(self.weight, self.comm), b, self.eps)   # (B, T/tp, C)


class TokenShardedPositions(Module):
    """The position embedding inside a sequence-parallel region: the rows of this rank's tokens
    [r T/tp, (r+1) T/tp) of the positions given, their gradient summed over tp."""

    def __init__(self, emb, comm):
        self.weight, self.comm = emb.weight, comm
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim

    def forward(self, pos):
        T, n = pos.shape[-1], pos.shape[-1] // self.comm.size
        if T % self.comm.size:
            raise ValueError(f"sequence-parallel regions: {T} tokens do not split over tp = {self.comm.size}")
        local = pos[..., self.comm.rank * n:(self.comm.rank + 1) * n]       # (T/tp,) or (B, T/tp)
        return ops.embedding(local, copy_to_tp(self.weight, self.comm))


class ParallelSparseFFN(Module):
    """The sparse FFN of Jaszczur et al. 2021 (models/sparse_ffn.py) split over tp in whole
    blocks of N units: rank r holds blocks [r nb/tp, (r+1) nb/tp) of W1, W2, the controller's
    C2 and cb (the softmax picks one unit per block, so blocks never straddle ranks); the
    controller's C1 and the output bias b2 are whole on every rank.

    forward    y = reduce_from_tp(SparseFFN_r(copy_to_tp(x); C1)) + b2, the Gumbel noise of
               this rank's units, the coin the same on every rank
    backward   dx and dC1 all-reduced (copy_to_tp on x and on C1: every rank's units add to
               them); the sliced parameters' gradients local
    """

    def __init__(self, ffn, comm):
        t, r = comm.size, comm.rank
        d_ff = ffn.w1.shape[0]
        n = d_ff // t
        units = np.arange(r * n, (r + 1) * n)
        self.comm, self.units, self.d_ff = comm, units, d_ff
        self.N, self.temperature, self.hard_prob, self.dropout = ffn.N, ffn.temperature, ffn.hard_prob, ffn.dropout
        self.noise, self.layer = ffn.noise, ffn.layer
        self.w1, self.w2, self.c2 = (_take(p, units, 0) for p in (ffn.w1, ffn.w2, ffn.c2))
        self.b2, self.c1 = ffn.b2, ffn.c1
        self.cb = None if ffn.cb is None else _take(ffn.cb, units, 0)

    def forward(self, x):
        from models.sparse_ffn import SparseFFNFunction, draw_noise, ffn_dropout
        xin, c1 = copy_to_tp(x, self.comm), copy_to_tp(self.c1, self.comm)
        hard, noise = True, None
        if self.training:
            hard, noise = draw_noise(self.noise, self.layer, self.hard_prob, self.temperature, x, self.d_ff, self.N,
                                     units=slice(int(self.units[0]), int(self.units[-1]) + 1))
        y = SparseFFNFunction.apply(xin, self.w1, self.w2, None, c1, self.c2, self.cb, N=self.N, hard=hard,
                                    noise=noise)                    # (B, T, d) partial: this rank's units
        y = reduce_from_tp(y, self.comm)
        if self.b2 is not None:
            y = y + self.b2
        return ffn_dropout(y, self.dropout, self.noise, self.layer) if self.training else y
