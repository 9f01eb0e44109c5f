"""Sparse feed-forward layer of "Sparse is Enough in Scaling Transformers" (Jaszczur et al.,
NeurIPS 2021, arXiv 2111.12763, section 3.1; the authors' Trax code: SparseFF in
trax/layers/research/sparsity.py, whose defaults are kept: N = 32, d_lowrank 64,
temperature 0.1, hard-mask probability 0.3).

The d_ff hidden units are cut into d_ff/N blocks of N consecutive units; in each block one
unit is active. A low-rank controller picks it:

    logits = (x C1^T) C2^T + cb                    (n, d_ff) -> (n, d_ff/N, N)    C1 (r, d), C2 (d_ff, r)
    p      = softmax(logits) within each block
    mask   = one_hot(sel) + p - stop_grad(p)       hard (straight-through), or mask = p (soft)
    y      = relu((x W1^T) * mask) W2 + b2         W1 (d_ff, d), W2 (d_ff, d): unit j is row j of both

Training: sel = argmax(logits + temperature * g), g Gumbel noise; each forward call tosses a
coin and uses the hard mask with probability ``hard_prob``, else the soft mask (Trax's
quant_prob; Jang et al. 2017 for the Gumbel-softmax, Bengio et al. 2013 for straight-through).
Training computes the dense product x W1^T and masks it, as Trax does. Either mask has the
same backward: d mask / d p = I, so dlogits = p * (dp - sum_block(dp * p)).

Evaluation and decoding: sel = argmax(logits), the hard mask. With fewer rows than N (decoding
one token), only the chosen units are read (``gather_forward``): rows sel + N * block of W1 and
W2 are contiguous d-vectors, d_ff/N of them, so a token reads d_ff/N rows of each instead of
d_ff; the dense FFN is never computed. On the CPU the blocks are done in fixed chunks on
engine/threads.py's pool, so the gathers use the threads they are given. With many rows (a
validation batch) the masked dense product is cheaper and gives the same numbers.

Randomness (the coin and the Gumbel noise) comes from the model's counter-based generator
(engine/random.py, the one dropout uses): the coin is one number per (step, accumulation
pass, layer), the same for every row, rank and micro-batch, and the noise of unit j of token
t of global row b is the draw at (layer, "ffn_gumbel", b, t, j). So any split of the batch or
the tokens (dp, micro-batches, sp) draws the noise one process draws, and a recomputation
draws it again without anything saved.

Init: W2 as the dense MLP's c_proj (normal 0.02, scaled by GPT by 1/sqrt(2 n_layer)); W1
normal(0, 0.02 sqrt(N)): with one unit of N active, the output's variance at init is then the
dense MLP's (d_ff/N units, each with N times the variance). On bench/sparse_quality.py (600
steps) this gave val loss 2.276 against 2.320 with W1 at 0.02 and 2.294 with Trax's Glorot
W1, W2 (dense: 2.272). The controller is Glorot-uniform as Trax (a 0.02 controller would
start as a flat softmax with vanishing gradients); biases 0. Choices that differ from the
dense MLP, as in the paper's code: ReLU and no first bias (relu(h * mask) = relu(h) * mask
needs a positively homogeneous activation for the soft mask to scale units).
"""
import math

import numpy as np

from engine import ops
from engine.autograd import Function, Tensor, is_grad_enabled
from engine.backend import get_array_module, to_device
from engine.nn import Module, Parameter, _normal
from engine.random import SITES
from engine.threads import for_chunks

GATHER_BLOCKS = 64                       # blocks per gather chunk (one pool task) when decoding
SPREAD_BESIDE_BLAS = math.inf            # beside a multi-threaded BLAS: never on the pool (gather_forward)


def _glorot(rng, shape, dtype="float32"):
    limit = math.sqrt(6.0 / (shape[0] + shape[1]))
    return to_device(rng.uniform(-limit, limit, size=shape).astype(dtype))


def _softmax_blocks(logits):
    """Softmax over the last axis, (n, nb, N)."""
    xp = get_array_module(logits)
    p = logits - logits.max(axis=-1, keepdims=True)
    xp.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    return p


def _one_hot(sel, N, dtype):
    """sel (n, nb) ints -> (n, nb, N) one-hot."""
    xp = get_array_module(sel)
    return (sel[..., None] == xp.arange(N)).astype(dtype)


class SparseFFNFunction(Function):
    """The whole layer as one graph node (controller, mask, both matmuls), forward and backward.

    Inputs x (..., d), w1 (d_ff, d), w2 (d_ff, d), b2 (d,) or None, c1 (r, d), c2 (d_ff, r),
    cb (d_ff,) or None. Options: N (units per block), hard (one-hot mask, else soft),
    noise (n, d_ff/N, N) scaled Gumbel noise added to the logits for the choice, or None."""

    def forward(self, x, w1, w2, b2, c1, c2, cb, N=32, hard=True, noise=None):
        xp = get_array_module(x)
        d, d_ff = x.shape[-1], w1.shape[0]
        self.x_shape, self.N = x.shape, N
        x2 = x.reshape(-1, d)                                          # (n, d)
        low = x2 @ c1.T                                                # (n, r)
        logits = low @ c2.T                                            # (n, d_ff)
        if cb is not None:
            logits += cb
        logits = logits.reshape(-1, d_ff // N, N)                      # (n, nb, N)
        p = _softmax_blocks(logits)
        if hard:
            sel = (logits if noise is None else logits + noise).argmax(axis=-1)   # (n, nb)
            mask = _one_hot(sel, N, x.dtype)                           # forward value of onehot + p - sg(p)
        else:
            mask = p
        h = (x2 @ w1.T).reshape(p.shape)                               # (n, nb, N)
        hm = h * mask
        a = xp.maximum(hm, 0.0).reshape(-1, d_ff)                      # (n, d_ff) relu
        y = a @ w2                                                     # (n, d)
        if b2 is not None:
            y += b2
        if is_grad_enabled() and any(self.needs_input_grad):
            self.saved = (x2, low, p, mask, h, a, w1, w2, c1, c2)
        return y.reshape(self.x_shape)

    def backward(self, g):
        xp = get_array_module(g)
        x2, low, p, mask, h, a, w1, w2, c1, c2 = self.saved
        need = self.needs_input_grad
        n, d = x2.shape
        g2 = g.reshape(-1, d)                                          # (n, d)
        ones = xp.ones(n, dtype=g.dtype)
        dw2 = a.T @ g2 if need[2] else None                            # (d_ff, d)
        db2 = ones @ g2 if need[3] else None
        dhm = (g2 @ w2.T).reshape(h.shape)                             # (n, nb, N)
        xp.multiply(dhm, (a > 0).reshape(h.shape), out=dhm)            # relu'
        dh = (dhm * mask).reshape(n, -1)                               # (n, d_ff)
        dp = xp.multiply(dhm, h, out=dhm)                              # d mask / d p = I (straight-through)
        dp -= xp.einsum("nbk,nbk->nb", dp, p)[..., None]               # softmax backward within blocks:
        dlogits = xp.multiply(dp, p, out=dp).reshape(n, -1)            # p * (dp - sum(dp * p)), (n, d_ff)
        dw1 = dh.T @ x2 if need[1] else None                           # (d_ff, d)
        dcb = ones @ dlogits if need[6] else None
        dc2 = dlogits.T @ low if need[5] else None                     # (d_ff, r)
        dlow = dlogits @ c2                                            # (n, r)
        dc1 = dlow.T @ x2 if need[4] else None                         # (r, d)
        dx = None
        if need[0]:
            dx = dh @ w1
            dx += dlow @ c1
            dx = dx.reshape(self.x_shape)
        return dx, dw1, dw2, db2, dc1, dc2, dcb


def gather_forward(x, w1, w2, b2, c1, c2, cb, N):
    """Evaluation without the dense FFN: each row reads only its chosen units.
    x (..., d) array -> (..., d). Reads the controller and d_ff/N rows of W1 and of W2 per row.

    On the CPU the blocks are cut into chunks of GATHER_BLOCKS blocks, run on engine/threads.py's
    pool: each chunk computes its slice of the controller logits, picks and gathers its units
    and returns its partial y; the partials are summed in chunk order. The chunks are the same
    at any thread count, so the result is too (bitwise); under CuPy it is one chunk. Beside a
    BLAS with threads of its own the chunks run on this thread (SPREAD_BESIDE_BLAS): the pool's
    tasks lost to OpenBLAS's spinning workers. Paper shape, 2 threads, three launches each, in
    alternation: sparse FFN 1.85x / 1.87x / 1.87x over dense inline against 1.50x / 1.71x / 1.73x
    pooled, both sparse layers 2.44x / 2.38x / 2.38x against 1.63x / 2.25x / 2.18x. GATHER_BLOCKS
    64 (the paper shape's 64 blocks in one chunk) against 32, three launches each, in alternation:
    sparse FFN 1.94x / 1.97x / 2.00x against 1.93x / 1.94x / 1.96x at 1 thread and 1.87x / 1.89x /
    1.93x against 1.83x / 1.85x / 1.85x at 2; each chunk pays a gather and a matmul call of its own."""
    xp = get_array_module(x)
    d, nb = x.shape[-1], w1.shape[0] // N
    x2 = x.reshape(-1, d)                                              # (n, d)
    low = x2 @ c1.T                                                    # (n, r): the controller's first half
    parts = [None] * -(-nb // GATHER_BLOCKS)

    def chunk(a, b):                                                   # blocks [a, b), units [a N, b N)
        logits = low @ c2[a * N:b * N].T                               # (n, (b - a) N)
        if cb is not None:
            logits += cb[a * N:b * N]
        rows = chosen_units(logits, N) + a * N                         # (n, b - a)
        parts[a // GATHER_BLOCKS] = units_forward(x2, w1[rows], w2[rows], None)
    for_chunks(nb, chunk, xp, chunk=GATHER_BLOCKS, beside_blas_min=SPREAD_BESIDE_BLAS)
    y = parts[0]
    for part in parts[1:]:
        if part is not None:                                           # (CuPy: one chunk only)
            y += part
    if b2 is not None:
        y += b2
    return y.reshape(x.shape)


def chosen_units(logits, N):
    """Controller logits (n, d_ff) -> the unit each row picks in each block, (n, d_ff/N):
    unit index = block * N + argmax within the block."""
    xp = get_array_module(logits)
    n, d_ff = logits.shape
    return logits.reshape(n, d_ff // N, N).argmax(axis=-1) + xp.arange(0, d_ff, N)   # (n, nb)


def units_forward(x2, w1r, w2r, b2, s1=None, s2=None):
    """y = relu(W1[rows] x) W2[rows] + b2 from the gathered rows w1r, w2r (n, nb, d) of x2 (n, d).
    s1, s2 (n, nb): the rows' scales when w1r, w2r are int8 codes (models/quantized.py), else None."""
    xp = get_array_module(x2)
    h = xp.matmul(w1r, x2[:, :, None])[..., 0]                         # (n, nb, d) @ (n, d, 1) -> (n, nb)
    if s1 is not None:
        h *= s1
    xp.maximum(h, 0.0, out=h)
    if s2 is not None:
        h *= s2                                                        # W2's row scale, moved onto h
    y = xp.matmul(h[:, None, :], w2r)[:, 0]                            # (n, 1, nb) @ (n, nb, d) -> (n, d)
    if b2 is not None:
        y += b2
    return y


def gumbel_noise(u, dtype):
    """Gumbel(0, 1) noise -log(-log u) of uniforms u (any shape), as ``dtype``."""
    xp = get_array_module(u)
    u = xp.clip(u, 1e-6, 1.0 - 1e-6)                                   # as Trax: no log(0)
    return (-xp.log(-xp.log(u))).astype(dtype)


class SparseFFN(Module):
    """Drop-in for the GPT MLP: x (B, T, d) -> (B, T, d). ``noise``: the model's counter-based
    generator (engine/random.py CounterRNG), ``layer`` this block's index (part of its keys)."""

    def __init__(self, d_model, d_ff, N=32, d_lowrank=64, temperature=0.1, hard_prob=0.3,
                 bias=True, rng=None, noise=None, layer=0, dropout=0.0, dtype="float32"):
        if d_ff % N:
            raise ValueError(f"d_ff ({d_ff}) must be divisible by the FFN sparsity N ({N})")
        rng = np.random.default_rng(0) if rng is None else rng
        self.N, self.temperature, self.hard_prob, self.dropout = N, temperature, hard_prob, dropout
        self.w1 = Parameter(_normal(rng, (d_ff, d_model), 0.02 * math.sqrt(N), dtype))  # (d_ff, d): unit rows
        self.w2 = Parameter(_normal(rng, (d_ff, d_model), 0.02, dtype))              # (d_ff, d): unit rows
        self.b2 = Parameter(to_device(np.zeros(d_model, dtype)), decay=False) if bias else None
        self.c1 = Parameter(_glorot(rng, (d_lowrank, d_model), dtype))               # (r, d) controller down
        self.c2 = Parameter(_glorot(rng, (d_ff, d_lowrank), dtype))                  # (d_ff, r) controller up
        self.cb = Parameter(to_device(np.zeros(d_ff, dtype)), decay=False) if bias else None
        self.noise, self.layer = noise, layer

    def _params(self):
        return self.w1, self.w2, self.b2, self.c1, self.c2, self.cb

    def decode_read_elements(self):
        """Weights one decoded token reads (gather_forward): the controller, b2, and d_ff/N rows
        of W1 and of W2, against 2 d_ff d for the dense product."""
        nb, d = self.w1.shape[0] // self.N, self.w1.shape[1]
        return sum(p.size for p in (self.b2, self.c1, self.c2, self.cb) if p is not None) + 2 * nb * d

    def forward(self, x):
        n = math.prod(x.shape[:-1])                                   # rows (tokens)
        if not self.training:
            if n < self.N and not (is_grad_enabled() and x.requires_grad):
                data = [None if p is None else p.data for p in self._params()]
                return Tensor(gather_forward(x.data, *data, N=self.N))
            return SparseFFNFunction.apply(x, *self._params(), N=self.N, hard=True)
        hard, noise = draw_noise(self.noise, self.layer, self.hard_prob, self.temperature, x, self.w1.shape[0], self.N)
        y = SparseFFNFunction.apply(x, *self._params(), N=self.N, hard=hard, noise=noise)
        return ffn_dropout(y, self.dropout, self.noise, self.layer)


def draw_noise(rng, layer, hard_prob, temperature, x, d_ff, N, units=None):
    """(hard, noise) of one training call: the coin (one per step, pass and layer) and the
    scaled Gumbel noise (n, nb, N) of units ``units`` (a slice of the d_ff; all by default, a
    tensor-parallel rank its own blocks) for x's rows and tokens (engine/random.py)."""
    hard, noise = rng.scalar(layer, SITES["ffn_coin"]) < hard_prob, None
    if hard and temperature > 0:
        B, T = x.shape[0], (x.shape[1] if x.ndim == 3 else 1)
        u = rng.uniform(layer, SITES["ffn_gumbel"], (B, T, d_ff), like=x.data)      # (B, T, d_ff)
        if units is not None:
            u = u[..., units]
        noise = gumbel_noise(u, x.dtype).reshape(B * T, -1, N)                     # (n, nb, N)
        noise *= temperature
    return hard, noise


def ffn_dropout(y, p, rng, layer):
    """Dropout on the FFN's output y (B, T, d), its masks at (layer, "ffn_dropout")."""
    if p == 0:
        return y
    return ops.dropout(y, p, u=rng.uniform(layer, SITES["ffn_dropout"], y.shape, dtype=y.dtype, like=y.data))
