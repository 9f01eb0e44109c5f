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
from engine.backend import get_array_module


class CopyToTP(Function):
    def forward(self, x, comm=None):
        self.comm = comm
        return x

    def backward(self, g):
        g = g.copy()
        self.comm.all_reduce(g, cache=False)        # sum of every rank's part of d loss / dx
        return (g,)


class ReduceFromTP(Function):
    def forward(self, x, comm=None):
        y = x.copy()
        comm.all_reduce(y, cache=False)             # sum of the partial products (a transient buffer)
        return y

    def backward(self, g):
        return (g,)


def copy_to_tp(x, comm):
    """Identity forward, all-reduce backward (a no-op when tp = 1)."""
    return x if comm.size == 1 else CopyToTP.apply(x, comm=comm)


def reduce_from_tp(x, comm):
    """All-reduce forward, identity backward (a no-op when tp = 1)."""
    return x if comm.size == 1 else ReduceFromTP.apply(x, comm=comm)


# -- sequence-parallel regions (Korthikanti et al. 2022, arXiv 2205.05198, section 4.2.2) --------
# The residual stream is split along tokens over tp: rank r holds tokens [r T/tp, (r+1) T/tp).
# The operator pairs g / g-bar of the paper replace f / g above, same bytes:
#
#     gather_linear   forward: all-gather along T   (B, T/tp, C) -> (B, T, C), then the column-
#                     parallel product; backward: reduce-scatter dx (and all-gather x again for dW)
#     scatter_tokens  forward: reduce-scatter       (B, T, C) -> (B, T/tp, C)   backward: all-gather
#
# An all-reduce is a reduce-scatter then an all-gather, so TP with these regions moves what TP
# alone moves, while LayerNorm, dropout and the residual adds work on T/tp tokens.

def _tokens_first(x):
    """(B, T, C) -> a contiguous (T, B, C) copy, so rank blocks of the flat array are token chunks."""
    return get_array_module(x).ascontiguousarray(x.transpose(1, 0, 2))


def _all_gather_tokens(x, comm):
    B, t, C = x.shape
    out = comm.all_gather(_tokens_first(x).reshape(-1))            # (tp t B C,)
    return out.reshape(comm.size * t, B, C).transpose(1, 0, 2)     # (B, T, C)


def _reduce_scatter_tokens(x, comm):
    B, T, C = x.shape
    if T % comm.size:
        raise ValueError(f"sequence-parallel regions: {T} tokens do not split over tp = {comm.size}")
    out = get_array_module(x).empty(x.size // comm.size, dtype=x.dtype)   # its own array, not a view of
    comm.reduce_scatter(_tokens_first(x).reshape(-1), out=out, cache=False)   # the (T B C,) input: (T/tp B C,)
    return out.reshape(T // comm.size, B, C).transpose(1, 0, 2)    # (B, T/tp, C)


class ScatterTokens(Function):
    def forward(self, x, comm=None):
        self.comm = comm
        return _reduce_scatter_tokens(x, comm)

    def backward(self, g):
        return (_all_gather_tokens(g, self.comm),)


class GatherLinear(Function):
    """y = all-gather_tokens(x) W^T (+ b) that keeps only x, this rank's tokens (B, T/tp, in):
    backward all-gathers x again for dW instead of storing the (B, T, in) gathered input
    (Korthikanti et al. 2022, section 4.2.2), then reduce-scatters dx. One more all-gather
    per layer in backward; the activation memory of the region stays 1/tp."""

    def forward(self, x, weight, bias=None, comm=None):
        self.comm, self.weight, self.x = comm, weight, x
        full = _all_gather_tokens(x, comm)                          # (B, T, in)
        y = full.reshape(-1, full.shape[-1]) @ weight.T             # (B T, out/tp)
        if bias is not None:
            y += bias
        return y.reshape(full.shape[0], full.shape[1], weight.shape[0])

    def backward(self, g):
        xp = get_array_module(g)
        need = self.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])                             # (B T, out/tp)
        dx = _reduce_scatter_tokens((g2 @ self.weight).reshape(g.shape[0], g.shape[1], -1), self.comm) \
            if need[0] else None                                    # (B, T/tp, in)
        dw = None
        if need[1]:
            full = _all_gather_tokens(self.x, self.comm)            # the gathered input, again
            dw = g2.T @ full.reshape(-1, full.shape[-1])
        db = xp.ones(g2.shape[0], dtype=g2.dtype) @ g2 if len(need) > 2 and need[2] else None
        return (dx, dw) if len(need) == 2 else (dx, dw, db)


def gather_linear(x, weight, bias, comm):
    """all-gather along tokens, then x W^T + b, keeping only the local tokens for backward."""
    if comm.size == 1:
        from engine import ops
        return ops.linear(x, weight, bias)
    args = (x, weight) if bias is None else (x, weight, bias)
    return GatherLinear.apply(*args, comm=comm)


def scatter_tokens(x, comm):
    """Reduce-scatter along tokens forward, all-gather backward (a no-op when tp = 1)."""
    return x if comm.size == 1 else ScatterTokens.apply(x, comm=comm)


def token_range(T, comm):
    """[lo, hi) of the tokens this rank holds in a sequence-parallel region."""
    n = T // comm.size
    return comm.rank * n, (comm.rank + 1) * n
