"""Optimizers on flat 1-D arrays, updated in place.

They take 1-D arrays (a flat buffer from engine/flat.py, or a ZeRO shard of one), never a
list of tensors, so data parallelism, ZeRO and a single process run the same update code on
different slices: an update on two halves equals the update on the whole, bit for bit.

AdamW (Kingma & Ba 2015, Adam with bias correction; Loshchilov & Hutter 2019, decoupled
weight decay), in PyTorch's order of operations:

    p <- p * (1 - lr * wd)                      only where decay_mask
    m <- m + (1 - b1) * (g - m)                 (= b1 m + (1 - b1) g)
    v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

SGD with momentum as PyTorch (Sutskever et al. 2013; L2 weight decay added to the grad):

    d = g + wd * p;   buf <- mu * buf + (1 - dampening) * d  (buf = d on the first step)
    d = d + mu * buf if nesterov else buf;   p <- p - lr * d

The update walks the arrays in chunks (``chunk_size`` elements; the whole array on the GPU)
with one scratch chunk, so it allocates O(chunk) bytes however large the model, the
chunk's operands stay in cache between the passes, and float32 stays float32 (all
scalars are Python floats, all results written with ``out=``). State per element: m and
v for AdamW (8 bytes in float32), one buffer for SGD with momentum.
"""
import math

import numpy as np

from .backend import get_array_module
from .flat import copy_into
from .threads import chunk_threads, for_chunks

CPU_CHUNK = 1 << 16


def _check_flat(params, grads, decay_mask):
    for what, a in (("params", params), ("grads", grads), ("decay_mask", decay_mask)):
        if a is not None and a.ndim != 1:
            raise ValueError(f"optimizer: {what} must be a 1-D array, got shape {a.shape}")
    if grads is not None and grads.shape != params.shape:
        raise ValueError(f"optimizer: grads shape {grads.shape} != params shape {params.shape}")
    if grads is not None and grads.dtype != params.dtype:
        raise ValueError(f"optimizer: grads dtype {grads.dtype} != params dtype {params.dtype}")
    if decay_mask is not None and (decay_mask.shape != params.shape or decay_mask.dtype != bool):
        raise ValueError(f"optimizer: decay_mask must be a bool array of shape {params.shape}")


def _chunks(n, chunk):
    for a in range(0, n, chunk):
        yield a, min(a + chunk, n)


class _FlatOptimizer:
    _state_names = ()

    def __init__(self, params, grads, decay_mask, chunk_size):
        _check_flat(params, grads, decay_mask)
        self.params, self.grads, self.decay_mask = params, grads, decay_mask
        self.xp = get_array_module(params)
        if chunk_size is None:
            chunk_size = CPU_CHUNK if self.xp is np else max(1, params.size)
        self.chunk_size = int(chunk_size)
        self.step_count = 0

    def _decay(self, p, factor, mask, t):
        """p *= factor where mask (everywhere when mask is None)."""
        if mask is None:
            p *= factor
        elif self.xp is np:
            np.multiply(p, factor, out=p, where=mask)
        else:                                   # t = 1 + (factor - 1) * mask; p *= t
            t[...] = mask
            t *= factor - 1.0
            t += 1.0
            p *= t

    def _prepare(self, grads):
        if grads is not None:
            _check_flat(self.params, grads, None)
            self.grads = grads
        n = self.params.size
        return n, self.xp.empty(min(self.chunk_size, n), dtype=self.params.dtype)

    def state_dict(self):
        """{'step': int, <name>: live state array, ...}: slices of it are shards."""
        sd = {"step": self.step_count}
        sd.update((k, getattr(self, k)) for k in self._state_names)
        return sd

    def load_state_dict(self, sd):
        """Copy state arrays in place; one-line ValueError on a missing key or bad shape."""
        for k in ("step",) + tuple(self._state_names):
            if k not in sd:
                raise ValueError(f"optimizer state: missing key {k!r}")
        for k in self._state_names:
            dst, src = getattr(self, k), sd[k]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"optimizer state: {k!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        for k in self._state_names:
            copy_into(getattr(self, k), sd[k])
        self.step_count = int(sd["step"])


class AdamW(_FlatOptimizer):
    """AdamW over one flat array. decay_mask: 1-D bool (None: decay everywhere)."""

    _state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, grads, decay_mask=None, lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
                 weight_decay=0.1, chunk_size=None):
        super().__init__(params, grads, decay_mask, chunk_size)
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(map(float, betas)), float(eps), float(weight_decay)
        self.exp_avg = self.xp.zeros_like(params)       # m, first moment
        self.exp_avg_sq = self.xp.zeros_like(params)    # v, second moment

    def step(self, lr=None, grads=None, on_chunk=None):
        """One update; on_chunk(a, b), if given, is called as soon as params[a:b] is final (the
        host optimizer of ZeRO-Offload sends each chunk to the device while the next is updated)."""
        if lr is not None:
            self.lr = float(lr)
        n, tmp = self._prepare(grads)
        self.step_count += 1
        lr, (b1, b2), eps, wd, t = self.lr, self.betas, self.eps, self.weight_decay, self.step_count
        step_size = lr / (1.0 - b1 ** t)
        bc2_sqrt = math.sqrt(1.0 - b2 ** t)
        xp, mask = self.xp, self.decay_mask

        def update(a, b, s):
            p, g, m, v = self.params[a:b], self.grads[a:b], self.exp_avg[a:b], self.exp_avg_sq[a:b]
            if wd != 0.0 and lr != 0.0:
                self._decay(p, 1.0 - lr * wd, None if mask is None else mask[a:b], s)
            xp.subtract(g, m, out=s)                    # m += (1 - b1) (g - m)
            s *= 1.0 - b1
            m += s
            v *= b2                                     # v = b2 v + (1 - b2) g^2
            xp.multiply(g, g, out=s)
            s *= 1.0 - b2
            v += s
            xp.sqrt(v, out=s)                           # denom = sqrt(v) / sqrt(1 - b2^t) + eps
            s /= bc2_sqrt
            s += eps
            xp.divide(m, s, out=s)                      # p -= lr / (1 - b1^t) * m / denom
            s *= -step_size
            p += s
        if on_chunk is None:                            # chunks over the elementwise threads (engine/threads.py)
            shared = xp is not np or chunk_threads(n, self.chunk_size) == 1   # one thread: one scratch chunk
            for_chunks(n, lambda a, b: update(a, b, tmp[:b - a] if shared else xp.empty(b - a, dtype=tmp.dtype)),
                       xp, self.chunk_size)
            return
        for a, b in _chunks(n, self.chunk_size):        # in order: each chunk is handed on when final
            update(a, b, tmp[:b - a])
            on_chunk(a, b)


class SGD(_FlatOptimizer):
    """SGD with momentum (PyTorch semantics; weight decay is L2, added to the gradient)."""

    def __init__(self, params, grads, lr, momentum=0.0, weight_decay=0.0, decay_mask=None,
                 dampening=0.0, nesterov=False, chunk_size=None):
        super().__init__(params, grads, decay_mask, chunk_size)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov needs momentum > 0 and dampening 0")
        self.lr, self.momentum, self.weight_decay = float(lr), float(momentum), float(weight_decay)
        self.dampening, self.nesterov = float(dampening), bool(nesterov)
        self._state_names = ("momentum_buffer",) if self.momentum else ()
        self.momentum_buffer = self.xp.zeros_like(params) if self.momentum else None

    def step(self, lr=None, grads=None):
        if lr is not None:
            self.lr = float(lr)
        n, tmp = self._prepare(grads)
        first = self.step_count == 0
        self.step_count += 1
        lr, mu, wd, xp, mask = self.lr, self.momentum, self.weight_decay, self.xp, self.decay_mask
        extra = xp.empty_like(tmp) if self.nesterov else None
        for a, b in _chunks(n, self.chunk_size):
            p, g, d = self.params[a:b], self.grads[a:b], tmp[:b - a]
            if wd != 0.0:                               # d = g + wd * p (where mask)
                xp.multiply(p, wd, out=d)
                if mask is not None:
                    d *= mask[a:b]
                d += g
            else:
                d[...] = g
            if mu != 0.0:
                buf = self.momentum_buffer[a:b]
                if first:
                    buf[...] = d
                else:
                    buf *= mu
                    if self.dampening:
                        d *= 1.0 - self.dampening
                    buf += d
                if self.nesterov:                       # d = d + mu * buf
                    e = extra[:b - a]
                    xp.multiply(buf, mu, out=e)
                    d += e
                else:
                    d[...] = buf
            d *= -lr
            p += d


def cosine_lr(step, lr, warmup_steps, max_steps, min_lr):
    """nanoGPT's schedule: linear warmup to lr, cosine decay to min_lr at max_steps, then min_lr.

    lr(s) = lr (s + 1) / (warmup + 1)                                   for s < warmup
          = min_lr + (lr - min_lr) (1 + cos(pi (s - warmup) / (max - warmup))) / 2  up to max
    """
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    if step >= max_steps or max_steps <= warmup_steps:
        return min_lr
    ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def _as_list(arrays):
    return [arrays] if hasattr(arrays, "shape") else [a for a in arrays if a is not None]


def grad_norm_sq(arrays):
    """Sum of squares of every element of the arrays, as a Python float.

    Float32/64 use one dot product per array (BLAS, no temporaries); narrower floats are
    widened to float32 chunk by chunk. Sum these over ranks before the square root."""
    total = 0.0
    for a in _as_list(arrays):
        xp, flat = get_array_module(a), a.reshape(-1)
        if flat.dtype.itemsize >= 4 and flat.dtype.kind == "f":
            total += float(xp.dot(flat, flat))
        else:
            for lo, hi in _chunks(flat.size, CPU_CHUNK):
                c = flat[lo:hi].astype(np.float32)
                total += float(xp.dot(c, c))
    return total


def clip_grad_norm_(arrays, max_norm, norm=None):
    """Scale the arrays in place so their global L2 norm is at most max_norm; return the norm
    before clipping. ``norm`` may be given precomputed (e.g. all-reduced over ranks).
    As torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied if < 1."""
    arrays = _as_list(arrays)
    if norm is None:
        norm = math.sqrt(grad_norm_sq(arrays))
    norm = float(norm)
    coef = float(max_norm) / (norm + 1e-6)
    if coef < 1.0:
        for a in arrays:
            a *= coef
    return norm
