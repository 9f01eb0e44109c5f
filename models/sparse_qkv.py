"""Sparse QKV layer of "Sparse is Enough in Scaling Transformers" (Jaszczur et al., NeurIPS
2021, arXiv 2111.12763, section 3.2; the authors' Trax code: MultiplicativeConvCausalAttention,
FactoredDense and LocallyConvDense in trax/layers/research/sparsity.py). It replaces the dense
c_attn (d -> 3d, 3 d^2 weights) with S modules of size M = d / S:

  multiplicative dense, shared by q, k and v (d S + d M weights):
      z[s, m] = sum_i x_i D[i, s] E[i, m] + b[s, m]            x (n, d) -> z (n, S, M)
  then, per q, k, v, a 2-D convolution over (length, modules) with M channels in and out,
  weights shared over positions and modules; causal over length (2 zero rows in front),
  zero-padded over modules:
      q[t, s] = sum_{a=0..2} sum_{b=-1..1} z[t - 2 + a, s + b] Wq[a, b + 1] + bq     kernel 3 x 3
      k: the same with Wk (3 x 3);  v: Wv with kernel 3 x 1 (length x modules)
  the output (n, 3, S, M) is laid out as c_attn's (n, 3d), so attention is unchanged.

V's kernel: the issue says "1 for V"; Trax's V convolution is kernel_size=1 over modules but
length_kernel_size=3 over length like q and k, and that is what is built here (3 x 1). The
attention output projection c_proj stays dense (Trax's default output_layer_type='none'
drops it; we keep GPT's, so only the q, k, v computation changes).

Decoding: the length convolution at position t reads z at t-2, t-1, t, so the KV cache
(models/generate.py) keeps the last two positions' z (``conv_state``, (B, 2, S, M)); a new
token's q, k, v are then exactly what the full forward computes at its position. Sequence
parallelism (a rank holding a slice of the positions) would need those two rows from the
previous rank and is not supported.

Init as Trax: D normal(0, 0.5), E Glorot uniform, the convolutions Glorot uniform with
fan_in = fan_out = taps * M, biases 0.
"""
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from engine.autograd import Function
from engine.backend import get_array_module, to_device
from engine.nn import Module, Parameter, _normal

KT = 3                                                                 # kernel length over positions


def _uniform(rng, shape, limit, dtype):
    return to_device(rng.uniform(-limit, limit, size=shape).astype(dtype))


class Multiplicative(Function):
    """z[n, s, m] = sum_i x[n, i] D[i, s] E[i, m] + b[s, m]: gate x once per module (n, S, d),
    then one GEMM with E. D is stored transposed, (S, d), so each module's gates are contiguous.
    Backward: dxs = dz E^T; dE = xs^T dz; dx[i] = sum_s dxs[s, i] D[i, s];
    dD[i, s] = sum_n dxs[n, s, i] x[n, i]."""

    def forward(self, x, D, E, b=None):
        d, S, M = x.shape[-1], D.shape[0], E.shape[1]              # D (S, d)
        self.x_shape = x.shape
        x2 = x.reshape(-1, d)                                          # (n, d)
        xs = x2[:, None, :] * D                                        # (n, S, d) gated copies
        z = (xs.reshape(-1, d) @ E).reshape(-1, S, M)                  # (n*S, d) @ (d, M) -> (n, S, M)
        if b is not None:
            z += b.reshape(S, M)
        self.x2, self.xs, self.D, self.E = x2, xs, D, E
        return z.reshape(*x.shape[:-1], S, M)                          # (..., S, M)

    def backward(self, g):
        xp = get_array_module(g)
        x2, xs, D, E = self.x2, self.xs, self.D, self.E
        n, S, d = xs.shape
        need = self.needs_input_grad
        g2 = g.reshape(n * S, -1)                                      # (n*S, M)
        dE = xs.reshape(-1, d).T @ g2 if need[2] else None             # (d, M)
        db = (xp.ones(n, dtype=g.dtype) @ g.reshape(n, -1)) if len(need) > 3 and need[3] else None
        dxs = (g2 @ E.T).reshape(n, S, d)                              # (n, S, d)
        dx = xp.einsum("nsd,sd->nd", dxs, D).reshape(self.x_shape) if need[0] else None
        dD = xp.einsum("nsd,nd->sd", dxs, x2) if need[1] else None     # (S, d)
        return (dx, dD, dE, db)[:len(need)]


def _patches(zp, T, S, ks):
    """im2col: zp (B, T+2, S+ks-1, M) -> (B, T, S, KT, ks, M), the taps of each output:
    P[b, t, s, a, c] = zp[b, t + a, s + c]. On the host a read-only strided view of zp (tap
    axes a, c step like t, s), which the caller's reshape copies once; on a device the taps
    stacked. The view: at (12, 64) tokens and 16 modules of 64, 1.3 ms against the stack's 3.7 ms
    per call; for one decoded token 5 us against 12 us."""
    xp = get_array_module(zp)
    B, M = zp.shape[0], zp.shape[-1]
    if xp is np:
        sB, sT, sS, sM = zp.strides
        return as_strided(zp, (B, T, S, KT, ks, M), (sB, sT, sS, sT, sS, sM), writeable=False)
    taps = [zp[:, a:a + T, b:b + S] for a in range(KT) for b in range(ks)]
    return xp.stack(taps, axis=3).reshape(B, T, S, KT, ks, M)


class ConvQKV(Function):
    """q, k, v from z (B, T, S, M) by causal convolutions over (length, modules), packed as
    c_attn's output (B, T, 3 S M). ``context`` (B, 2, S, M): z of the two positions before
    z[:, 0] (the KV cache's conv_state); None means zeros (the sequence starts here).

    Forward is im2col: the 3 x 3 taps of every (t, s) side by side, (B T S, 9 M), times the
    stacked (9 M, M) kernel; v uses the centre module column of the same taps (3 M). Backward:
    dW = patches^T dq; dpatches = dq W^T, scattered back tap by tap into dz (col2im)."""

    def forward(self, z, wq, wk, wv, bq=None, bk=None, bv=None, context=None):
        M = z.shape[-1]
        products = [lambda P, w=w: P @ w.reshape(-1, M) for w in (wq, wk, wv)]   # (BTS, taps M) @ (taps M, M)
        out, Pqk, Pv = conv_qkv(z, products, (bq, bk, bv), context)
        self.saved = (Pqk, Pv, wq, wk, wv, z.shape)
        return out

    def backward(self, g):
        xp = get_array_module(g)
        Pqk, Pv, wq, wk, wv, (B, T, S, M) = self.saved
        need = self.needs_input_grad + (False,) * (7 - len(self.needs_input_grad))
        g5 = g.reshape(B, T, 3, S, M)
        gq, gk, gv = (xp.ascontiguousarray(g5[:, :, i]).reshape(-1, M) for i in range(3))   # (BTS, M)
        ones = xp.ones(gq.shape[0], dtype=g.dtype)
        dws = [(Pq.T @ gi).reshape(w.shape) if need[1 + i] else None
               for i, (Pq, gi, w) in enumerate(((Pqk, gq, wq), (Pqk, gk, wk), (Pv, gv, wv)))]
        dbs = [ones @ gi if need[4 + i] else None for i, gi in enumerate((gq, gk, gv))]
        dz = None
        if need[0]:
            dP = gq @ wq.reshape(-1, M).T                              # (BTS, 9M)
            dP += gk @ wk.reshape(-1, M).T
            dP = dP.reshape(B, T, S, KT, 3, M)
            dP[:, :, :, :, 1] += (gv @ wv.reshape(-1, M).T).reshape(B, T, S, KT, M)
            dzp = xp.zeros((B, T + KT - 1, S + 2, M), dtype=g.dtype)
            for a in range(KT):                                        # col2im: each tap back to its source
                for b in range(3):
                    dzp[:, a:a + T, b:b + S] += dP[:, :, :, a, b]
            dz = dzp[:, KT - 1:, 1:S + 1]                              # (B, T, S, M)
        return (dz, *dws, *dbs)[:len(self.needs_input_grad)]


def conv_qkv(z, products, biases=(None, None, None), context=None):
    """ConvQKV's forward as a function of its three products: ``products[i](P)`` is P @ W_i for
    q, k, v, with P the (B T S, 9 M) taps (3 M for v) and W_i the (taps M, M) kernel, so an int8
    kernel (models/quantized.py) plugs in. Returns (out (B, T, 3 S M), Pqk, Pv)."""
    xp = get_array_module(z)
    B, T, S, M = z.shape
    front = xp.zeros((B, KT - 1, S, M), dtype=z.dtype) if context is None else context
    zp = xp.zeros((B, T + KT - 1, S + 2, M), dtype=z.dtype)            # causal in length, zero-padded modules
    zp[:, :KT - 1, 1:S + 1] = front
    zp[:, KT - 1:, 1:S + 1] = z
    P = _patches(zp, T, S, 3)                                          # (B, T, S, 3, 3, M)
    Pqk = P.reshape(-1, KT * 3 * M)                                    # (BTS, 9M)
    Pv = P[:, :, :, :, 1].reshape(-1, KT * M)                          # (BTS, 3M) centre module column
    out = xp.empty((B, T, 3, S, M), dtype=z.dtype)
    for i, (P2, product, b) in enumerate(zip((Pqk, Pqk, Pv), products, biases)):
        y = product(P2)                                                # (BTS, M)
        if b is not None:
            y += b
        out[:, :, i] = y.reshape(B, T, S, M)
    return out.reshape(B, T, 3 * S * M), Pqk, Pv                       # (B, T, 3C) as c_attn


def advance_conv_state(kv_cache, z):
    """Decoding: the context (B, 2, S, M) before z (B, T, S, M), or None at the start, from the
    cache's ``conv_state``, which then keeps the last two positions' z."""
    xp = get_array_module(z)
    B, T, S, M = z.shape
    context = kv_cache.conv_state
    prev = xp.zeros((B, KT - 1, S, M), z.dtype) if context is None else context
    kv_cache.conv_state = xp.concatenate([prev, z], axis=1)[:, -(KT - 1):].copy()   # (B, 2, S, M)
    return context


class SparseQKV(Module):
    """Replaces c_attn: x (B, T, d) -> packed q, k, v (B, T, 3d). ``kv_cache`` (decoding):
    its ``conv_state`` supplies and keeps the last two positions' z."""

    def __init__(self, d_model, n_modules, bias=True, rng=None, dtype="float32"):
        if d_model % n_modules:
            raise ValueError(f"n_embd ({d_model}) must be divisible by the QKV module count S ({n_modules})")
        rng = np.random.default_rng(0) if rng is None else rng
        S, M = n_modules, d_model // n_modules
        self.S, self.M, self.bias = S, M, bias
        self.D = Parameter(_normal(rng, (S, d_model), 0.5, dtype))                   # (S, d): D[i, s] at [s, i]
        self.E = Parameter(_uniform(rng, (d_model, M), math.sqrt(6 / (d_model + M)), dtype))   # (d, M)
        self.b = Parameter(to_device(np.zeros(d_model, dtype)), decay=False) if bias else None
        for name, ks in (("q", 3), ("k", 3), ("v", 1)):
            limit = math.sqrt(6 / (2 * KT * ks * M))                                 # Glorot, fan = taps * M
            setattr(self, "w" + name, Parameter(_uniform(rng, (KT, ks, M, M), limit, dtype)))   # (3, ks, M, M)
        for name in "qkv":
            setattr(self, "b" + name, Parameter(to_device(np.zeros(M, dtype)), decay=False) if bias else None)

    def macs_per_token(self):
        """Multiply-adds per token (the 6N FLOP rule counts parameters, which this layer reuses):
        gating S d, the GEMM S d M = d^2, the convolutions S (9 + 9 + 3) M^2."""
        d = self.S * self.M
        return self.S * d + d * d + self.S * 21 * self.M * self.M

    def forward(self, x, kv_cache=None):
        z = Multiplicative.apply(x, self.D, self.E, *((self.b,) if self.bias else ()))   # (B, T, S, M)
        context = None if kv_cache is None else advance_conv_state(kv_cache, z.data)   # decoding, no graph
        ws = (self.wq, self.wk, self.wv) + ((self.bq, self.bk, self.bv) if self.bias else ())
        return ConvQKV.apply(z, *ws, context=context)                  # (B, T, 3d)
