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
and one backward per pair. ``from_linear`` cuts a dense engine.nn.Linear (every rank built
the same one from the seed), so the tp layers hold exactly the dense layer's numbers.
"""
import numpy as np

from engine import ops
from engine.backend import get_array_module
from engine.nn import Module, Parameter

from .comm import copy_to_tp, reduce_from_tp


def _take(p, index, axis):
    """A Parameter holding p's slice along axis (a copy), with p's weight-decay flag."""
    xp = get_array_module(p.data)
    return Parameter(xp.ascontiguousarray(xp.take(p.data, xp.asarray(index), axis=axis)), decay=p.decay)


class ColumnParallelLinear(Module):
    """Rows ``rows`` of a Linear's W and b on this rank; ``comm`` the tp Communicator."""

    def __init__(self, weight, bias, comm, rows):
        self.weight, self.bias, self.comm, self.rows = weight, bias, comm, np.asarray(rows)

    @classmethod
    def from_linear(cls, linear, rows, comm):
        return cls(_take(linear.weight, rows, 0), None if linear.bias is None else _take(linear.bias, rows, 0),
                   comm, rows)

    def forward(self, x):
        return ops.linear(copy_to_tp(x, self.comm), self.weight, self.bias)   # (B, T, in) -> (B, T, out/tp)


class RowParallelLinear(Module):
    """Columns ``cols`` of a Linear's W on this rank, b whole; ``comm`` the tp Communicator."""

    def __init__(self, weight, bias, comm, cols):
        self.weight, self.bias, self.comm, self.cols = weight, bias, comm, np.asarray(cols)

    @classmethod
    def from_linear(cls, linear, cols, comm):
        return cls(_take(linear.weight, cols, 1), linear.bias, comm, cols)

    def forward(self, x):
        y = reduce_from_tp(ops.linear(x, self.weight), self.comm)            # (B, T, in/tp) -> (B, T, out)
        return y if self.bias is None else y + self.bias
