"""Basic differentiable ops: elementwise arithmetic with broadcasting, matmul, shape ops,
reductions and a few unary functions, each a ``Function`` with its backward beside it.

The rules are the chain rule and NumPy's broadcasting: the gradient of a broadcast input is
the output gradient summed over the broadcast axes (``unbroadcast``). Python scalars are
constants that keep the tensor's dtype (NumPy 2 treats them as "weak", NEP 50); NumPy
scalars such as ``np.float64(2)`` would promote float32 to float64, so they are turned into
Python scalars first. Gradients handed to ``backward`` are never modified in place: one
array may be the gradient of several inputs (``a + a``) or a read-only broadcast view.
"""
import builtins

import numpy as np

from ..autograd import Function, Tensor, unbroadcast
from ..backend import get_array_module, scatter_add


def _const(x):
    """A NumPy scalar becomes a Python scalar, so float32 stays float32 (NEP 50)."""
    return x.item() if isinstance(x, np.generic) else x


def _shape(a):
    return getattr(a, "shape", ())


def _grads(fn, ga, gb):
    """(dL/da, dL/db), each summed back over the axes it was broadcast along; only the wanted
    ones are computed (``ga``, ``gb`` are thunks)."""
    na, nb = fn.needs_input_grad
    return (unbroadcast(ga(), fn.sa) if na else None, unbroadcast(gb(), fn.sb) if nb else None)


# -- elementwise arithmetic -----------------------------------------------------------------
class Add(Function):
    def forward(self, a, b):
        self.sa, self.sb = _shape(a), _shape(b)
        return a + b

    def backward(self, g):
        return _grads(self, lambda: g, lambda: g)


class Sub(Function):
    def forward(self, a, b):
        self.sa, self.sb = _shape(a), _shape(b)
        return a - b

    def backward(self, g):
        return _grads(self, lambda: g, lambda: -g)


class Mul(Function):
    def forward(self, a, b):
        self.a, self.b, self.sa, self.sb = a, b, _shape(a), _shape(b)
        return a * b

    def backward(self, g):
        return _grads(self, lambda: g * self.b, lambda: g * self.a)


class Div(Function):
    def forward(self, a, b):
        self.a, self.b, self.sa, self.sb = a, b, _shape(a), _shape(b)
        return a / b

    def backward(self, g):   # d(a/b)/db = -a / b^2
        return _grads(self, lambda: g / self.b, lambda: -g * self.a / (self.b * self.b))


class Neg(Function):
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


class Pow(Function):
    """x ** p for a constant scalar p: d/dx = p x^(p-1)."""
    def forward(self, x, p):
        self.x, self.p = x, p
        return x * x if p == 2 else x ** p

    def backward(self, g):
        p = self.p
        return (g * (2 * self.x) if p == 2 else g * (p * self.x ** (p - 1)),)


def add(a, b): return Add.apply(a, _const(b))
def sub(a, b): return Sub.apply(a, _const(b))
def mul(a, b): return Mul.apply(a, _const(b))
def div(a, b): return Div.apply(a, _const(b))
def neg(a): return Neg.apply(a)
def pow(x, p): return Pow.apply(x, p=_const(p))  # noqa: A001  (mirrors the builtin on purpose)


# -- matmul -----------------------------------------------------------------------------------
class MatMul(Function):
    """Batched, broadcasting a @ b. dA = dC B^T, dB = A^T dC, each summed over broadcast batch
    axes; 1-D operands are promoted as NumPy does (a row vector on the left, a column on the right)."""
    def forward(self, a, b):
        self.a, self.b = a, b
        return a @ b

    def backward(self, g):
        a, b = self.a, self.b
        a2 = a[None, :] if a.ndim == 1 else a                  # (..., n, k)
        b2 = b[:, None] if b.ndim == 1 else b                  # (..., k, m)
        g2 = g[..., None] if b.ndim == 1 else g
        g2 = g2[..., None, :] if a.ndim == 1 else g2           # (..., n, m)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_input_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:   # shared weight: one 2-D matmul over all rows
                k, m = b2.shape
                gb = a2.reshape(-1, k).T @ g2.reshape(-1, m)   # (k, N) @ (N, m)
            else:
                gb = unbroadcast(a2.swapaxes(-1, -2) @ g2, b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb


def matmul(a, b): return MatMul.apply(a, b)


# -- unary functions --------------------------------------------------------------------------
class Exp(Function):
    def forward(self, x):
        self.out = get_array_module(x).exp(x)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    def forward(self, x):
        self.x = x
        return get_array_module(x).log(x)

    def backward(self, g):
        return (g / self.x,)


class Tanh(Function):
    def forward(self, x):
        self.out = get_array_module(x).tanh(x)
        return self.out

    def backward(self, g):   # d tanh = 1 - tanh^2
        return (g * (1.0 - self.out * self.out),)


def exp(x): return Exp.apply(x)
def log(x): return Log.apply(x)
def tanh(x): return Tanh.apply(x)


# -- shape ops --------------------------------------------------------------------------------
class Reshape(Function):
    def forward(self, x, shape):
        self.in_shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return (g.reshape(self.in_shape),)


class Transpose(Function):
    def forward(self, x, axes):
        self.axes = tuple(range(x.ndim))[::-1] if axes is None else tuple(a % x.ndim for a in axes)
        return x.transpose(self.axes)

    def backward(self, g):
        return (g.transpose(tuple(int(a) for a in np.argsort(self.axes))),)


class GetItem(Function):
    """x[index]; the backward writes the gradient into zeros, accumulating repeated integer
    indices (scatter-add) and assigning otherwise."""
    def forward(self, x, index):
        self.shape, self.index = x.shape, index
        return x[index]

    def backward(self, g):
        xp = get_array_module(g)
        gx = xp.zeros(self.shape, dtype=g.dtype)
        idx = self.index if isinstance(self.index, tuple) else (self.index,)
        if builtins.any(hasattr(i, "dtype") and i.dtype.kind in "iu" for i in idx):
            scatter_add(gx, self.index, g)
        else:
            gx[self.index] = g
        return (gx,)


class Concat(Function):
    def forward(self, *arrays, axis=0):
        self.axis = axis
        self.bounds = np.cumsum([a.shape[axis] for a in arrays])[:-1]
        return get_array_module(*arrays).concatenate(arrays, axis=axis)

    def backward(self, g):
        xp = get_array_module(g)
        return tuple(xp.split(g, self.bounds.tolist(), axis=self.axis))   # views of g


def reshape(x, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape.apply(x, shape=tuple(shape))


def transpose(x, *axes):
    axes = axes[0] if len(axes) == 1 and (axes[0] is None or isinstance(axes[0], (tuple, list))) else axes
    return Transpose.apply(x, axes=axes if axes else None)


def swapaxes(x, a, b):
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return Transpose.apply(x, axes=tuple(axes))


def _unwrap_index(index, xp):
    """Tensors become arrays; lists and host arrays become arrays of the tensor's module."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, (list, np.ndarray)):
        return xp.asarray(index)
    if isinstance(index, tuple):
        return tuple(_unwrap_index(i, xp) for i in index)
    return index


def getitem(x, index):
    return GetItem.apply(x, index=_unwrap_index(index, get_array_module(x.data)))


def concat(tensors, axis=0):
    return Concat.apply(*tensors, axis=axis)


def split(x, sizes_or_n, axis=0):
    """Split along ``axis`` into ``n`` equal parts or parts of the given sizes (list of Tensors)."""
    total = x.shape[axis]
    if isinstance(sizes_or_n, int):
        if total % sizes_or_n:
            raise ValueError(f"split: axis of size {total} does not divide into {sizes_or_n} parts")
        sizes = [total // sizes_or_n] * sizes_or_n
    else:
        sizes = list(sizes_or_n)
        if builtins.sum(sizes) != total:
            raise ValueError(f"split: sizes {sizes} do not add up to {total}")
    axis = axis % x.ndim
    out, start = [], 0
    for n in sizes:
        index = (slice(None),) * axis + (slice(start, start + n),)
        out.append(GetItem.apply(x, index=index))
        start += n
    return out


# -- reductions -------------------------------------------------------------------------------
def _expand(g, shape, axis, keepdims):
    """The reduced gradient, re-expanded to ``shape`` (a broadcast view, no copy)."""
    if axis is not None and not keepdims:
        axes = (axis,) if isinstance(axis, int) else axis
        g = get_array_module(g).expand_dims(g, tuple(a % len(shape) for a in axes))
    return get_array_module(g).broadcast_to(g, shape)


class Sum(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        return get_array_module(x).asarray(x.sum(axis=axis, keepdims=keepdims))   # 0-d array, not a scalar

    def backward(self, g):
        return (_expand(g, self.shape, self.axis, self.keepdims),)


class Mean(Function):
    def forward(self, x, axis=None, keepdims=False):
        self.shape, self.axis, self.keepdims = x.shape, axis, keepdims
        out = get_array_module(x).asarray(x.mean(axis=axis, keepdims=keepdims))
        self.n = x.size // builtins.max(out.size, 1) if x.size else 1
        return out

    def backward(self, g):
        return (_expand(g * (1.0 / self.n), self.shape, self.axis, self.keepdims),)


def sum(x, axis=None, keepdims=False):  # noqa: A001
    return Sum.apply(x, axis=tuple(axis) if isinstance(axis, list) else axis, keepdims=keepdims)


def mean(x, axis=None, keepdims=False):
    return Mean.apply(x, axis=tuple(axis) if isinstance(axis, list) else axis, keepdims=keepdims)


# -- Tensor operators and methods -------------------------------------------------------------
T = Tensor
T.__add__, T.__sub__, T.__mul__, T.__truediv__, T.__neg__, T.__pow__ = add, sub, mul, div, neg, pow
T.__radd__ = lambda self, o: Add.apply(_const(o), self)
T.__rsub__ = lambda self, o: Sub.apply(_const(o), self)
T.__rmul__ = lambda self, o: Mul.apply(_const(o), self)
T.__rtruediv__ = lambda self, o: Div.apply(_const(o), self)
T.__matmul__, T.__rmatmul__ = matmul, lambda self, o: MatMul.apply(o, self)
T.__getitem__, T.reshape, T.transpose, T.swapaxes = getitem, reshape, transpose, swapaxes
T.sum, T.mean, T.exp, T.log, T.tanh = sum, mean, exp, log, tanh
del T
