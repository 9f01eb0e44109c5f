"""Tensor and Function: reverse-mode automatic differentiation in one screen.

A ``Tensor`` wraps an array (NumPy or CuPy) and, when it was computed by an op while
gradients are recorded, remembers the ``Function`` that made it. Each op is a subclass of
``Function`` with ``forward`` (arrays in, one array out; it saves what backward needs on
``self``) and ``backward`` (the output's gradient in, one gradient per tensor input out)
written side by side, as in micrograd and tinygrad.

``Tensor.backward(grad=None)`` walks the graph in reverse topological order. ``grad`` is
the upstream gradient: a pipeline stage passes the gradient it received from the next
stage; a scalar loss needs none. Leaves (parameters, or a pipeline stage's received
activation) accumulate into ``.grad`` in place, so a gradient that is a view into a flat
buffer (engine/flat.py) lands in that buffer. When a leaf's gradient is complete for this
backward, its hooks run: that is the signal DDP uses to start a bucket's all-reduce while
backward goes on. The graph is freed as it is walked.

Zero-bubble pipelines (Qi et al. 2023, arXiv 2401.10241) split backward in two:
``backward(grad, deferred=[], inputs=(x,))`` computes only the gradients that flow to
activations and to the leaves in ``inputs`` (part B: what the previous stage waits for);
every node that has another leaf (a weight) as input is appended to ``deferred`` with its
output gradient, and ``run_deferred(deferred)`` later calls its backward again asking for
the weight gradients alone (part W). Each such Function's backward must therefore be
callable twice (linear, layer_norm and embedding are).
"""
import contextlib

from .backend import get_array_module

_GRAD_ENABLED = True


@contextlib.contextmanager
def no_grad():
    """Record no graph inside this block (evaluation, decoding, optimizer updates)."""
    global _GRAD_ENABLED
    prev, _GRAD_ENABLED = _GRAD_ENABLED, False
    try:
        yield
    finally:
        _GRAD_ENABLED = prev


def is_grad_enabled():
    return _GRAD_ENABLED


class _Node:
    """What the graph keeps of a computed tensor: the Function that produced it, never its
    data. An intermediate array therefore lives only while a Function saved it for backward
    or the caller still holds the Tensor (a graph of Tensors would pin every op's output
    until backward: the residual adds, the dropout outputs, the projections dropout reads)."""
    __slots__ = ("_fn", "requires_grad")

    def __init__(self, fn):
        self._fn, self.requires_grad = fn, True


class Tensor:
    __array_priority__ = 200  # array * tensor -> Tensor.__rmul__ (above cupy.ndarray's 100, so CuPy defers too)

    def __init__(self, data, requires_grad=False, name=None):
        self.data = data
        self.requires_grad = requires_grad
        self.grad = None
        self.name = name
        self._node = None        # computed tensors: its graph node (the Function), while the graph lives
        self._hooks = []         # called as hook(tensor) once this leaf's grad is complete

    @property
    def _fn(self):
        """The Function that produced this tensor, while the graph lives (None: a leaf)."""
        return None if self._node is None else self._node._fn

    # -- array-like attributes --------------------------------------------------------
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    is_leaf = property(lambda self: self._fn is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        name = f" {self.name}" if self.name else ""
        return f"Tensor{name}(shape={self.shape}, dtype={self.dtype}, requires_grad={self.requires_grad})"

    def numpy(self):
        from .backend import to_numpy
        return to_numpy(self.data)

    def item(self):
        return self.data.item()

    def detach(self):
        return Tensor(self.data)

    def register_grad_hook(self, hook):
        """Call ``hook(self)`` when backward has finished accumulating this leaf's gradient."""
        self._hooks.append(hook)

    def zero_grad(self):
        if self.grad is not None:
            self.grad[...] = 0

    # -- reverse mode -----------------------------------------------------------------
    def backward(self, grad=None, deferred=None, inputs=()):
        """Accumulate d(self)/d(leaf) * grad into every leaf's ``.grad``.

        ``grad`` defaults to 1 for a one-element tensor; any other tensor needs the
        upstream gradient (same shape as ``self``). ``deferred`` (a list): leaves other
        than ``inputs`` get nothing now; their work is appended for ``run_deferred``."""
        if grad is None:
            if self.size != 1:
                raise ValueError(f"backward() without a gradient needs a one-element tensor, got shape {self.shape}")
            grad = get_array_module(self.data).ones_like(self.data)
        elif isinstance(grad, Tensor):
            grad = grad.data
        if grad.shape != self.shape:
            raise ValueError(f"upstream gradient shape {grad.shape} != tensor shape {self.shape}")

        root = self if self._fn is None else self._node
        order = _topological_order(root)
        grads = {id(root): grad}
        keep = {id(t) for t in inputs}
        for node in reversed(order):          # every consumer before what it consumed
            g = grads.pop(id(node), None)
            fn = node._fn
            if fn is None:                    # a leaf: every contribution has arrived
                if g is not None and node.requires_grad:
                    if node.grad is None:
                        node.grad = g.copy()
                    else:
                        node.grad += g
                    for hook in node._hooks:
                        hook(node)
                continue
            node._fn = None                   # free the graph as we go
            if g is None:
                continue
            if deferred is not None:          # B of a B/W split: weight leaves wait for W
                in_grads = _input_part(fn, g, keep, deferred)
            else:
                in_grads = fn.backward(g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            for parent, pg in zip(fn.parents, in_grads):
                if pg is None or not parent.requires_grad:
                    continue
                key = id(parent)
                # out of place: a Function may hand the same array to two inputs
                grads[key] = pg if key not in grads else grads[key] + pg


def _input_part(fn, g, keep, deferred):
    """fn.backward(g) without the gradients of leaves outside ``keep``; a node that has such
    a leaf is recorded in ``deferred`` as (fn, g, mask of those leaves) for run_deferred."""
    mask = tuple(p.requires_grad and p._fn is None and id(p) not in keep for p in fn.parents)
    if not any(mask):
        return fn.backward(g)
    deferred.append((fn, g, mask))
    need = tuple(n and not w for n, w in zip(fn.needs_input_grad, mask))
    if not any(need):
        return (None,) * len(mask)
    fn.needs_input_grad = need
    return fn.backward(g)


def run_deferred(deferred):
    """Part W of a split backward: each recorded node's weight gradients, accumulated into
    the leaves' ``.grad``; then each leaf's hooks run once. Empties ``deferred``."""
    done = {}
    for fn, g, mask in deferred:
        fn.needs_input_grad = mask
        in_grads = fn.backward(g)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        for leaf, pg, w in zip(fn.parents, in_grads, mask):
            if not w or pg is None:
                continue
            if leaf.grad is None:
                leaf.grad = pg.copy()
            else:
                leaf.grad += pg
            done[id(leaf)] = leaf
    deferred.clear()
    for leaf in done.values():
        for hook in leaf._hooks:
            hook(leaf)


def _topological_order(root):
    """Iterative depth-first post-order: each tensor after every tensor it was computed from."""
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node._fn is not None:
            for p in reversed(node._fn.parents):
                if p.requires_grad and id(p) not in seen:
                    stack.append((p, False))
    return order


class Function:
    """One differentiable op. Subclasses define ``forward(*arrays, **options) -> array``
    and ``backward(grad) -> tuple`` (one gradient or None per tensor input).

    ``self.needs_input_grad[i]`` tells backward which input gradients are wanted, so it
    can skip work (the first layer's input gradient, for instance)."""

    parents = ()
    needs_input_grad = ()

    def forward(self, *arrays, **options):
        raise NotImplementedError

    def backward(self, grad):
        raise NotImplementedError

    has_aux = False             # forward returns (array, extra): extra is not differentiated

    @classmethod
    def apply(cls, *inputs, **options):
        return cls.apply_aux(*inputs, **options)[0] if cls.has_aux else cls._apply(inputs, options)[0]

    @classmethod
    def apply_aux(cls, *inputs, **options):
        """(output Tensor, extra) for a Function whose forward returns (array, extra), e.g.
        attention and its log-sum-exp."""
        if not cls.has_aux:
            raise TypeError(f"{cls.__name__}.forward returns one array; use apply")
        return cls._apply(inputs, options)

    @classmethod
    def _apply(cls, inputs, options):
        tensors = tuple(t if isinstance(t, Tensor) else Tensor(t) for t in inputs)
        fn = cls()
        fn.needs_input_grad = tuple(t.requires_grad for t in tensors)
        result = fn.forward(*(t.data for t in tensors), **options)
        data, extra = result if cls.has_aux else (result, None)
        out = Tensor(data)
        if _GRAD_ENABLED and any(fn.needs_input_grad):
            fn.parents = tuple(t._node if t._fn is not None else t for t in tensors)   # leaves themselves
            out.requires_grad = True
            out._node = _Node(fn)
        return out, extra


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad
