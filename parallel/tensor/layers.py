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

from .comm import copy_to_tp, gather_tokens, reduce_from_tp, scatter_tokens


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
        x = gather_tokens(x, self.comm) if self.tokens else copy_to_tp(x, self.comm)   # (B, T, in)
        return ops.linear(x, self.weight, self.bias)                         # (B, T, in) -> (B, T, out/tp)


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
