"""Activation checkpointing: a layer's forward runs unrecorded and is recomputed in backward.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost" (arXiv 1604.06174); the
"full" mode of Megatron-LM (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", arXiv 2205.05198, section 4) and torchtitan. ``Recomputed`` is one
graph node per layer call, y = f(x):

    forward    y = f(x) unrecorded; keep x and the noise generator's cursor (engine/random.py)
    backward   restore the cursor, y = f(x) recorded, y.backward(dy) -> dx, parameter grads

Cost: one more forward of the layer per step (about +1/3 of the step's FLOPs for a
transformer: forward 1, backward 2). Memory: the layer's input (B, T, C) instead of every
activation inside it (Korthikanti et al. eq. 2: 34 s b h + 5 a s^2 b bytes per layer in half
precision, s tokens, b rows, h width, a heads; full recomputation keeps 2 s b h of them).

The parameters' gradients accumulate inside the nested backward, where each leaf's hooks
fire (DDP / ZeRO buckets start there, as for engine/reversible.py); the node returns None for
them. ``before(step)`` / ``after()`` are the seams a subclass uses around each run of f, in
forward (step +1) and in backward (step -1): ZeRO-3 gathers and frees the layer's
parameters there (parallel/data/fsdp.py GatheredLayer).

    y = Recomputed.apply(x, *layer.parameters(), fn=layer_forward, rng=model.noise)
"""
from .autograd import Function, Tensor, no_grad


class Recomputed(Function):
    """f(x) for one tensor x (B, T, C) -> (B, T, C): see the module docstring. Inputs: x and
    the layer's parameters (so the node is recorded whenever any of them requires grad)."""

    def forward(self, x, *params, fn=None, rng=None):
        self.fn, self.rng = fn, rng
        self.cursor = rng.state() if rng is not None else None
        self.before(+1)
        try:
            with no_grad():
                y = fn(Tensor(x))                              # (B, T, C) -> (B, T, C)
        finally:
            self.after()
        self.x = x                                             # the only activation kept
        return y.data

    def backward(self, g):
        x = Tensor(self.x, requires_grad=self.needs_input_grad[0])
        later = self.rng.state() if self.rng is not None else None
        self.before(-1)
        try:
            if self.rng is not None:
                self.rng.restore(self.cursor)                  # the same dropout masks
            self.fn(x).backward(g)
        finally:
            if self.rng is not None:
                self.rng.restore(later)
            self.after()
        self.x = None
        return (x.grad,) + (None,) * (len(self.parents) - 1)

    def before(self, step):
        """Called before each run of f: step +1 in forward, -1 in backward (the recomputation)."""

    def after(self):
        """Called after each run of f."""


def checkpointed(module, rng=None):
    """Make ``module(x)`` one Recomputed node (an instance attribute shadows its forward, as
    ZeRO-3 wraps its layers): full activation checkpointing of that layer."""
    inner = type(module).forward.__get__(module)
    params = list(module.parameters())

    def forward(x, *args, **kwargs):
        if args or kwargs:
            raise TypeError(f"{type(module).__name__}: a recomputed layer takes one tensor, got more arguments")
        return Recomputed.apply(x, *params, fn=inner, rng=rng)
    object.__setattr__(module, "forward", forward)
    return module
