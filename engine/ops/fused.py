"""Fused ops with hand-written backward: linear, layer_norm, gelu, cross_entropy, embedding,
dropout. Each is one ``Function`` whose forward saves just what its backward needs, so a
layer costs one graph node instead of the dozen its elementwise pieces would.

Conventions: the work stays in the input dtype (no silent float64: constants are Python
floats, which NumPy 2 treats as weak, NEP 50); fresh arrays are updated in place; the
incoming gradient is never written to. Each Function's backward runs once (the graph is
freed after it), so backward may consume what forward saved.
"""
import math

import numpy as np

from ..autograd import Function, Tensor, is_grad_enabled
from ..backend import get_array_module, scatter_add
from ..threads import for_chunks


# -- linear ---------------------------------------------------------------------------------
class Linear(Function):
    """y = x W^T + b with W (out, in) as PyTorch. All leading axes of x are folded into one, so
    forward and each gradient is a single 2-D GEMM: dx = dy W, dW = dy^T x, db = 1^T dy.
    (Sums over rows are BLAS matrix-vector products with a ones vector: NumPy's axis
    reductions are several times slower on these shapes.)"""
    def forward(self, x, weight, bias=None):
        self.x_shape, self.weight = x.shape, weight
        self.x2 = x.reshape(-1, x.shape[-1])                          # (N, in)
        y = self.x2 @ weight.T                                        # (N, out)
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])              # (..., out)

    def backward(self, g):
        g2 = g.reshape(-1, g.shape[-1])                               # (N, out)
        need = self.needs_input_grad
        dx = (g2 @ self.weight).reshape(self.x_shape) if need[0] else None
        dw = g2.T @ self.x2 if need[1] else None                      # (out, in)
        if len(need) == 2:
            return dx, dw
        xp = get_array_module(g)
        return dx, dw, (xp.ones(g2.shape[0], dtype=g2.dtype) @ g2 if need[2] else None)


def linear(x, weight, bias=None):
    return Linear.apply(x, weight) if bias is None else Linear.apply(x, weight, bias)


# -- layer norm -----------------------------------------------------------------------------
_MEAN_WEIGHTS = {}


def _mean_weights(xp, C, dtype):
    """The (C,) vector of 1/C whose product with rows is their mean: built once per (C, dtype) on
    the host, read-only (a decoded token's 49 layer norms each paid a fresh np.full); fresh on a
    device, where the array would belong to whichever device built it."""
    if xp is not np:
        return xp.full(C, 1.0 / C, dtype=dtype)
    key = (C, np.dtype(dtype))
    avg = _MEAN_WEIGHTS.get(key)
    if avg is None:
        avg = _MEAN_WEIGHTS[key] = np.full(C, 1.0 / C, dtype=dtype)
        avg.setflags(write=False)
    return avg


class LayerNorm(Function):
    """Ba, Kiros & Hinton 2016 over the last axis: xhat = (x - mean) / sqrt(var + eps),
    y = xhat * w + b (biased variance, as PyTorch). Backward (as in llm.c layernorm_backward):
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), with dxhat = dy * w, so
    mean(dxhat) = (dy @ w) / C and mean(dxhat * xhat) = ((dy * xhat) @ w) / C."""
    def forward(self, x, weight, bias=None, eps=1e-5):
        xp = get_array_module(x)
        C = x.shape[-1]
        x2 = x.reshape(-1, C)                                         # (N, C)
        avg = _mean_weights(xp, C, x.dtype)                            # (C,) 1/C: means as GEMVs
        xhat = x2 - (x2 @ avg)[:, None]                               # centred first: stable variance
        var = xp.square(xhat) @ avg                                   # (N,)
        var += eps
        rstd = xp.sqrt(var, out=var)
        xp.divide(1.0, rstd, out=rstd)                                # (N,) 1 / sqrt(var + eps)
        xhat *= rstd[:, None]
        self.xhat, self.rstd, self.weight, self.shape = xhat, rstd, weight, x.shape
        y = xhat * weight
        if bias is not None:
            y += bias
        return y.reshape(x.shape)

    def backward(self, g):
        xp = get_array_module(g)
        xhat, rstd, w = self.xhat, self.rstd, self.weight
        N, C = xhat.shape
        need = self.needs_input_grad + (False,)
        g2 = g.reshape(-1, C)                                         # (N, C)
        gx = g2 * xhat                                                # dy * xhat
        ones = xp.ones(N, dtype=g.dtype)
        dw = ones @ gx if need[1] else None
        db = ones @ g2 if need[2] else None
        dx = None
        if need[0]:
            m1 = (g2 @ w) * (1.0 / C)                                 # (N,) mean(dxhat)
            m2 = (gx @ w) * (1.0 / C)                                 # (N,) mean(dxhat * xhat)
            dx = g2 * w                                               # dxhat
            dx -= m1[:, None]
            xp.multiply(xhat, m2[:, None], out=gx)                    # reuse gx as scratch
            dx -= gx
            dx *= rstd[:, None]
            dx = dx.reshape(self.shape)
        return (dx, dw, db)[:len(self.needs_input_grad)]


def layer_norm(x, weight, bias, eps=1e-5):
    return LayerNorm.apply(x, weight, bias, eps=eps) if bias is not None else LayerNorm.apply(x, weight, eps=eps)


# -- GELU -----------------------------------------------------------------------------------
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


class GELU(Function):
    """Hendrycks & Gimpel 2016, tanh approximation as in GPT-2:
        y = 0.5 x (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3).
    Computed as y = x / (1 + e^(-2u)) (0.5 (1 + tanh u) = sigmoid(2u)), one exp instead of a
    slower tanh; then dy/dx = s + x s (1 - s) 2u'(x) = s (1 + (1 - s) x (2c + 6ca x^2)), s = sigmoid(2u).
    For very negative x, e^(-2u) overflows to inf and y = x / inf = -0, dy/dx = 0, as the tanh
    form rounds (PyTorch gives -0 too); the overflow warning is silenced rather than -2u clamped,
    since NumPy's minimum costs as much as the exp. When a gradient will be wanted, forward
    computes the local derivative dy/dx from the x^2 and 1 + e^(-2u) it already has and keeps it
    in place of x: backward is one multiply, dx = g dy/dx, where recomputing s from x cost a
    second exp and a dozen more passes (GELU forward plus backward at (12, 64, 512) float32,
    one thread: 1.27 ms against 2.1 ms). The layer still holds one (B, T, 4C) array
    (Korthikanti et al. 2022 count GeLU's input alone): x itself is not kept. Both passes run
    chunk by chunk (engine/threads.py): each chain of in-place ufuncs stays in cache, and the
    chunks spread over the elementwise threads; bitwise the same at any thread count."""
    def forward(self, x):
        xp = get_array_module(x)
        x = xp.ascontiguousarray(x)
        out = xp.empty_like(x)
        keep = is_grad_enabled() and self.needs_input_grad[0]
        self.dydx = dydx = xp.empty_like(x) if keep else None
        xf, of = x.reshape(-1), out.reshape(-1)                       # (N,) views
        df = dydx.reshape(-1) if keep else None

        def part(a, b):
            xs = xf[a:b]
            e = xp.empty_like(xs) if keep else of[a:b]                # keep: 1 + e^(-2u) is used again
            t = xp.multiply(xs, xs, out=xp.empty_like(xs) if keep else e)   # x^2
            xp.multiply(t, -2.0 * _GELU_C * _GELU_A, out=e)
            e -= 2.0 * _GELU_C
            e *= xs                                                   # -2u
            with np.errstate(over="ignore"):                          # x < -10 (float32): e^(-2u) = inf, y = -0
                xp.exp(e, out=e)
            e += 1.0
            xp.divide(xs, e, out=of[a:b])                             # x sigmoid(2u) = x / (1 + e^(-2u))
            if keep:
                s, d = xp.divide(1.0, e, out=e), df[a:b]              # s = sigmoid(2u)
                xp.multiply(t, 6.0 * _GELU_C * _GELU_A, out=d)
                d += 2.0 * _GELU_C
                d *= xs                                               # x (2c + 6ca x^2)
                d *= xp.subtract(1.0, s, out=t)                       # * (1 - s)
                d += 1.0
                d *= s                                                # dy/dx
        for_chunks(xf.size, part, xp)
        return out

    def backward(self, g):
        if not self.needs_input_grad[0]:                              # a B/W split's W pass asks nothing of it
            return (None,)
        xp = get_array_module(g)
        d, self.dydx = self.dydx, None                                # consumed: x's gradient is asked once
        df, gf = d.reshape(-1), xp.ascontiguousarray(g).reshape(-1)   # (N,) views

        def part(a, b):
            df[a:b] *= gf[a:b]                                        # dx = g dy/dx, in the kept buffer
        for_chunks(df.size, part, xp)
        return (d,)


def gelu(x):
    return GELU.apply(x)


# -- softmax cross-entropy ------------------------------------------------------------------
class CrossEntropy(Function):
    """loss_i = logsumexp(z_i) - z_{i, y_i}, max-shifted for stability; mean over rows whose
    target is not ``ignore_index``. Fused: the forward pass also leaves the gradient
    d loss / dz = (softmax(z) - onehot(y)) / n_valid in the softmax's own buffer, so backward
    only scales it by the upstream gradient. With no target left, 'mean' gives 0 (PyTorch: nan)."""
    def forward(self, logits, targets=None, ignore_index=-1, reduction="mean"):
        xp = get_array_module(logits)
        V = logits.shape[-1]
        self.shape, self.reduction = logits.shape, reduction
        z = logits.reshape(-1, V)                                     # (N, V)
        t = xp.asarray(targets)
        t_shape, t = t.shape, t.reshape(-1)                           # (N,)
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"cross_entropy: {t.shape[0]} targets for {z.shape[0]} rows of logits")
        rows = xp.arange(z.shape[0])
        valid = t != ignore_index
        t = xp.where(valid, t, 0)                                     # any in-range column for ignored rows
        m = z.max(axis=1, keepdims=True)                              # (N, 1)
        p = z - m
        zt = p[rows, t]                                               # (N,) shifted target logit
        xp.exp(p, out=p)
        s = p @ xp.ones(V, dtype=p.dtype)                             # (N,) row sums (BLAS)
        loss = xp.log(s)
        loss -= zt
        w = valid.astype(logits.dtype)                                # (N,) 1 kept, 0 ignored
        if reduction == "mean":                                       # n_valid = 0 gives loss 0, not nan
            w *= (1.0 / xp.maximum(valid.sum(), 1)).astype(logits.dtype)
        loss *= w
        out = loss.reshape(t_shape) if reduction == "none" else xp.asarray(loss.sum())
        if is_grad_enabled() and self.needs_input_grad[0]:
            p *= (w / s)[:, None]                                     # softmax * w
            p[rows, t] -= w                                           # - onehot * w
            self.d = p
        return out

    def backward(self, g):
        d = self.d
        d *= g.reshape(-1, 1) if self.reduction == "none" else g
        return (d.reshape(self.shape),)


def cross_entropy(logits, targets, ignore_index=-1, reduction="mean"):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    targets = targets.data if isinstance(targets, Tensor) else targets
    return CrossEntropy.apply(logits, targets=targets, ignore_index=ignore_index, reduction=reduction)


# -- embedding ------------------------------------------------------------------------------
class Embedding(Function):
    """out = W[idx]. Backward scatter-adds each output row's gradient into row idx of dW, on the
    flattened (V*C,) view with flat indices idx*C + c, NumPy's 1-D ufunc.at fast path. Measured
    on the nanoGPT CPU shapes (768 tokens, V 65, C 128): 0.21 ms, against 1.5 ms for np.add.at on
    rows, 0.96 ms for a bincount per column, 0.26-0.35 ms for a sort + np.add.reduceat."""
    def forward(self, weight, idx=None):
        self.idx, self.wshape = idx, weight.shape
        return get_array_module(weight).take(weight, idx, axis=0)     # idx.shape + (C,)

    def backward(self, g):
        xp = get_array_module(g)
        V, C = self.wshape
        dw = xp.zeros((V, C), dtype=g.dtype)
        idx = self.idx.reshape(-1, 1).astype(xp.intp, copy=False)    # (N, 1); uint16 tokens would overflow
        flat = (idx * C + xp.arange(C)).reshape(-1)                   # (N*C,) flat indices into dW
        scatter_add(dw.reshape(-1), flat, g.reshape(-1))
        return (dw,)


def embedding(idx, weight):
    idx = idx.data if isinstance(idx, Tensor) else idx
    return Embedding.apply(weight, idx=get_array_module(weight.data).asarray(idx))


# -- dropout --------------------------------------------------------------------------------
class Dropout(Function):
    """Inverted dropout (Srivastava et al. 2014): keep with probability 1 - p and scale by
    1 / (1 - p), so evaluation is the identity. The scaled mask serves forward and backward.
    The uniforms come from ``u`` (an array of x's shape, e.g. engine/random.py's counter-based
    draws) or are drawn from ``rng`` (a NumPy / CuPy Generator or RandomState)."""
    def forward(self, x, p=0.0, rng=None, u=None):
        xp = get_array_module(x)
        if u is None:
            dtype = x.dtype if x.dtype.itemsize >= 4 else xp.float32
            if hasattr(rng, "random_sample"):                         # a RandomState (CuPy's takes a dtype)
                u = rng.random_sample(x.shape, dtype=dtype) if xp is not np else rng.random_sample(x.shape)
            else:                                                     # a NumPy / CuPy Generator
                u = rng.random(x.shape, dtype=dtype)
        elif u.shape != x.shape:
            raise ValueError(f"dropout: uniforms of shape {u.shape} for an input of shape {x.shape}")
        mask = (u >= p).astype(x.dtype)
        mask *= 1.0 / (1.0 - p) if p < 1 else 0.0
        self.mask = mask
        return x * mask

    def backward(self, g):
        return (g * self.mask,)


def dropout(x, p, rng=None, training=True, u=None):
    """Dropout of x with probability p: uniforms ``u`` (x's shape) if given, else drawn from rng."""
    if p == 0 or not training:
        return x
    return Dropout.apply(x, p=p, rng=rng, u=u)
