"""The sparse loss layer of the Terraformer (Jaszczur et al. 2021, "Sparse is Enough in Scaling
Transformers", arXiv 2111.12763, section 5; Trax: ``loss_sparsity`` with the 'mult' type,
MultiplicativeSparseDense in trax/layers/research/sparsity.py): the output projection
d -> V as the multiplicative layer of the sparse QKV (models/sparse_qkv.py ``Multiplicative``)
with S = loss sparsity modules of M = ceil(V / S) logits each:

    logits[s M + m] = sum_i x_i D[i, s] E[i, m] + b[s M + m]       x (n, d) -> (n, S M), first V kept

i.e. the dense output matrix W[v, i] = D[i, s] E[i, m] (v = s M + m) of rank-one-per-module
structure, never formed. Weights d S + d M + V instead of d V (S = 4 at the paper's shape,
V 32000, d 1024: 8.2M instead of 32.8M). The sparse QKV's convolution over modules has no
meaning for a vocabulary and is left out. Not tied to the input embedding (a (V, d) table has
no such factors; the Trax Terraformer's output layer is its own as well).

Cost per token: S d (the gates) + d V / S (one GEMM of the S gated copies with E) multiply-adds,
against d V dense; decoding reads D, E and b once per token: d S + d V / S + V numbers instead
of d V, which is what makes the last layer cheaper to decode (bench/terraformer.py). Memory in
training: the S gated copies of x (n, S, d), kept for backward.

Init: D normal(0, 0.5) and E Glorot uniform, as the sparse QKV (Trax's init), b = 0.
"""
import math

import numpy as np

from engine import ops
from engine.backend import to_device
from engine.nn import Module, Parameter, _normal

from .sparse_qkv import Multiplicative, _uniform


class SparseLoss(Module):
    """x (B, T, d) -> logits (B, T, V) by the multiplicative layer with S modules; ``dense()``
    gives the (V, d) matrix it equals (for tests)."""

    def __init__(self, d_model, vocab_size, S, rng=None, dtype="float32"):
        if S < 1:
            raise ValueError(f"loss sparsity S ({S}) must be >= 1")
        rng = np.random.default_rng(0) if rng is None else rng
        self.S, self.V, self.M = S, vocab_size, -(-vocab_size // S)                # M = ceil(V / S)
        self.D = Parameter(_normal(rng, (S, d_model), 0.5, dtype))                    # (S, d): D[i, s] at [s, i]
        self.E = Parameter(_uniform(rng, (d_model, self.M), math.sqrt(6 / (d_model + self.M)), dtype))   # (d, M)
        self.b = Parameter(to_device(np.zeros(S * self.M, dtype)), decay=False)       # (S M,)

    def forward(self, x):
        z = Multiplicative.apply(x, self.D, self.E, self.b)                           # (B, T, S, M)
        z = ops.reshape(z, x.shape[:-1] + (self.S * self.M,))                         # (B, T, S M)
        if self.S * self.M == self.V:
            return z
        return ops.getitem(z, (Ellipsis, slice(0, self.V)))                           # (B, T, V): padding dropped

    def dense(self):
        """The (V, d) output matrix the layer computes with, W[s M + m, i] = D[s, i] E[i, m]."""
        W = self.D.data[:, None, :] * self.E.data.T[None, :, :]                       # (S, M, d)
        return W.reshape(self.S * self.M, -1)[:self.V]

    def macs_per_token(self):
        """Multiply-adds per token: S d gates + d S M for the GEMM."""
        d = self.E.shape[0]
        return self.S * d + d * self.S * self.M
