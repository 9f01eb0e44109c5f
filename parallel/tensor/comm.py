"""The two communication Functions of Megatron-LM's tensor parallelism (Shoeybi et al. 2019,
section 3, the operators f and g): conjugate pairs, each the other's backward.

    copy_to_tp (f)      forward: identity           backward: all-reduce (sum) over tp
                        before a column-parallel layer: every rank uses the whole input, and
                        the input's gradient is the sum of every rank's part
    reduce_from_tp (g)  forward: all-reduce (sum)   backward: identity
                        after a row-parallel layer: the output is the sum of every rank's
                        partial product; its gradient reaches every rank whole

Cost per call: one all-reduce of the activation, (B, T, C) elements, in one direction only.
The collective is the Communicator's (collectives/), so every rank gets the same bits.
"""
from engine.autograd import Function


class CopyToTP(Function):
    def forward(self, x, comm=None):
        self.comm = comm
        return x

    def backward(self, g):
        g = g.copy()
        self.comm.all_reduce(g)                     # sum of every rank's part of d loss / dx
        return (g,)


class ReduceFromTP(Function):
    def forward(self, x, comm=None):
        y = x.copy()
        comm.all_reduce(y)                          # sum of the partial products
        return y

    def backward(self, g):
        return (g,)


def copy_to_tp(x, comm):
    """Identity forward, all-reduce backward (a no-op when tp = 1)."""
    return x if comm.size == 1 else CopyToTP.apply(x, comm=comm)


def reduce_from_tp(x, comm):
    """All-reduce forward, identity backward (a no-op when tp = 1)."""
    return x if comm.size == 1 else ReduceFromTP.apply(x, comm=comm)
