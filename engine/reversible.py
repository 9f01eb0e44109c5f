"""Reversible residual layers: activation memory that does not grow with depth.

RevNet (Gomez et al. 2017, "The Reversible Residual Network", arXiv 1707.04585, eq. 1-3)
and the Reformer (Kitaev et al. 2020, arXiv 2001.04451, section 3), where F is attention and
G the feed-forward layer. A pair of streams (x1, x2) goes through each layer as

    y1 = x1 + F(x2),        y2 = x2 + G(y1)             forward
    x2 = y2 - G(y1),        x1 = y1 - F(x2)             inverse (eq. 3)

so a layer's input is a function of its output and nothing but the stack's final output
needs keeping. ``reversible(pair, layers)`` is one graph node (``ReversibleStack``) for the
whole stack: its forward runs every layer unrecorded and keeps only the output pair; its
backward walks the layers from the last one, and for each

    recompute G(y1) recorded, backward with dy2       -> G's parameter grads, dy1 += dG^T dy2
    x2 = y2 - G(y1)
    recompute F(x2) recorded, backward with dy1       -> F's parameter grads, dx2 = dy2 + dF^T dy1
    x1 = y1 - F(x2),  dx1 = dy1

Cost: one more forward of every layer per step (Reformer: "the cost of one extra forward").
Memory: the output pair (B, T, 2d), the running gradient pair, and one layer's graph at a time:
independent of the number of layers (bench/terraformer.py measures it). The reconstruction
x = f^{-1}(y) rounds (about eps |F| per layer), so the gradients differ from stored-activation
autograd by rounding only; tests/test_reversible.py bounds both in float64.

The pair travels as one tensor (B, T, 2d) whose last axis holds [x1 | x2] (RevNet splits the
channels in two halves; the Reformer's copy of the embedding into both streams is the caller's
concatenation), so any code that passes one tensor per layer (ZeRO-3's units) carries it.
``layers``: Modules with methods ``f`` and ``g``, each from a (B, T, d) Tensor to one, whose
parameters are the layer's (any two sub-modules: dense or sparse attention, dense or sparse FFN). Randomness: ``rng`` (the model's
counter-based generator, engine/random.py) has its cursor saved at forward and restored for
the recomputation, so dropout and noise redraw the same numbers without being stored.

The parameter gradients are accumulated by the layer-level backward calls, in the order
backward meets them (last layer first), and each leaf's grad hooks fire there: DDP buckets
(parallel/data/buckets.py) start as usual. ``manager`` (optional) is told which layer is
about to compute and which is done, ``enter(i, step)`` / ``leave(i)`` (step +1 in forward,
-1 in backward: the next one to prefetch); ZeRO-3 (parallel/data/fsdp.py) gathers and frees a
layer's parameter shards there, so reversibility and per-layer gathering share one
recomputation.
"""
from .autograd import Function, Tensor, no_grad
from .backend import get_array_module


class ReversibleError(ValueError):
    """A stream pair that cannot be split (one line)."""


def check_pair(channels):
    """ReversibleError (one line) unless ``channels`` split into two equal streams."""
    if channels % 2:
        raise ReversibleError(f"a reversible pair splits its {channels} channels into two equal streams: "
                              f"{channels} is odd")


def split_pair(a):
    """[x1 | x2] (..., 2d) array -> (x1, x2) contiguous copies (..., d)."""
    C = a.shape[-1]
    check_pair(C)
    xp = get_array_module(a)
    return xp.ascontiguousarray(a[..., :C // 2]), xp.ascontiguousarray(a[..., C // 2:])


def _join(a, b):
    return get_array_module(a).concatenate([a, b], axis=-1)   # (..., d) x 2 -> (..., 2d)


class _NoManager:
    def enter(self, i, step):
        pass

    def leave(self, i):
        pass


class ReversibleStack(Function):
    """One graph node for a stack of reversible layers: pair (B, T, 2d) -> pair (B, T, 2d).
    Inputs: the pair and the layers' parameters (so the node is recorded whenever any of them
    requires grad); the parameters' gradients are accumulated inside backward, not returned."""

    def forward(self, pair, *params, layers=(), rng=None, manager=None):
        self.layers, self.rng, self.manager = list(layers), rng, manager or _NoManager()
        self.cursor = rng.state() if rng is not None else None
        x1, x2 = split_pair(pair)
        with no_grad():
            for i, layer in enumerate(self.layers):
                self.manager.enter(i, +1)
                x1 = x1 + layer.f(Tensor(x2)).data                     # y1 = x1 + F(x2)
                x2 = x2 + layer.g(Tensor(x1)).data                     # y2 = x2 + G(y1)
                self.manager.leave(i)
        self.y = (x1, x2)                                              # the only activation kept
        return _join(x1, x2)

    def backward(self, grad):
        dy1, dy2 = split_pair(grad)
        y1, y2 = self.y
        later = self.rng.state() if self.rng is not None else None
        if self.rng is not None:
            self.rng.restore(self.cursor)                              # the forward's dropout masks
        try:
            for i in reversed(range(len(self.layers))):
                layer = self.layers[i]
                self.manager.enter(i, -1)
                y1, y2, dy1, dy2 = invert_layer(layer, y1, y2, dy1, dy2)
                self.manager.leave(i)
        finally:
            if self.rng is not None:
                self.rng.restore(later)
        self.y = None
        return (_join(dy1, dy2),) + (None,) * (len(self.parents) - 1)


def invert_layer(layer, y1, y2, dy1=None, dy2=None):
    """One layer backwards: its input pair (x1, x2) from its output (y1, y2) and, given the
    output gradients, the input gradients (dx1, dx2) (the parameters' gradients accumulate
    into their ``.grad``). Without gradients, nothing is recorded: (x1, x2, None, None)."""
    if dy1 is None:
        with no_grad():
            x2 = y2 - layer.g(Tensor(y1)).data
            return y1 - layer.f(Tensor(x2)).data, x2, None, None
    t1 = Tensor(y1, requires_grad=True)
    gy = layer.g(t1)                                                   # G(y1), recorded
    gy.backward(dy2)
    x2 = y2 - gy.data
    dy1 = dy1 + t1.grad if t1.grad is not None else dy1                # dL/dy1 in total
    del gy, t1
    t2 = Tensor(x2, requires_grad=True)
    fx = layer.f(t2)                                                   # F(x2), recorded
    fx.backward(dy1)
    x1 = y1 - fx.data
    dx2 = dy2 + t2.grad if t2.grad is not None else dy2
    return x1, x2, dy1, dx2


def reversible(pair, layers, rng=None, manager=None):
    """The reversible stack on a Tensor pair (B, T, 2d) -> (B, T, 2d) (see the module docstring)."""
    check_pair(pair.shape[-1])
    params = [p for layer in layers for p in layer.parameters()]
    return ReversibleStack.apply(pair, *params, layers=layers, rng=rng, manager=manager)


def invert(pair, layers):
    """The stack's input pair from its output pair (arrays (B, T, 2d)): eq. 3, last layer first."""
    y1, y2 = split_pair(pair)
    for layer in reversed(list(layers)):
        y1, y2, _, _ = invert_layer(layer, y1, y2)
    return _join(y1, y2)


def stored(pair, layers):
    """The same two-stream network by ordinary autograd, every activation stored: the reference
    the reversible stack's gradients are tested against (and the memory baseline)."""
    from . import ops
    check_pair(pair.shape[-1])
    d = pair.shape[-1] // 2
    x1, x2 = ops.split(pair, [d, d], axis=-1)
    for layer in layers:
        x1 = x1 + layer.f(x2)
        x2 = x2 + layer.g(x1)
    return ops.concat([x1, x2], axis=-1)
