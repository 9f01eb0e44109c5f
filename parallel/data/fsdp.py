"""ZeRO stage 3, FSDP-style: each layer's parameters exist in full only while it computes.

Rajbhandari et al. 2019 (ZeRO-3, "P_os+g+p") and PyTorch FSDP (Zhao et al. 2023). Every
rank keeps only its shard of the flat parameter buffer. A layer (a sub-Module taking one
tensor and returning one) is one unit:

    forward,  layer i:   wait all-gather(i) | start all-gather(i+1) | compute | free(i)
    backward, layer i:   wait all-gather(i) | start all-gather(i-1) | recompute, backward | free(i)
                         -> its gradients go to the reduce-scatter buckets (parallel/data/buckets.py)

Gather of a contiguous range [lo, hi) of the flat buffer: rank k contributes its shard's
overlap with it (uneven all-gather counts, count_k = |[lo, hi) & [k S, (k+1) S)|), whose
concatenation in rank order is exactly flat[lo:hi]; parameters become views of that
buffer, then placeholders again (zero-stride arrays of the right shape, zero.placeholder).

Why the backward recomputes the layer (activation checkpointing, Chen et al. 2016, which
ZeRO-3 pairs with anyway): an op keeps references to the arrays it saved for backward
(a Linear keeps its weight), so a layer whose forward is recorded would pin its gathered
parameters until backward, and "freed after forward" would be a fiction. PyTorch FSDP
shrinks the storage under those references; NumPy cannot. So the forward of a layer runs
unrecorded (one graph node, ``GatheredLayer``, that keeps only the layer's input), and its
backward re-gathers the parameters and re-runs the layer's forward with recording (the
counter-based generator's cursor restored, so the recomputation draws the same masks). Cost: one more
forward per layer per step; memory: the layers' inputs instead of all activations.

A model that runs its layers itself (the Terraformer's reversible stack, engine/reversible.py)
takes this gatherer through ``model.manage_layers(self)`` instead: its forwards are not wrapped,
and the stack calls ``enter(i, step)`` (gather layer i, prefetch i + step) and ``leave(i)``
(free it) around each layer, in forward and again in backward, where its reversible
recomputation is the recomputation above; nothing but the stack's output pair is kept.

Parameters outside every layer (for GPT: wte, tied to the output layer, wpe and ln_f)
form the root unit, gathered for the whole step as FSDP's root: ``gather_root()`` before
the forward, ``free_root()`` after the update. Memory per rank: 16P/N, plus the root, plus
at most two gathered layers (the one computing and the one prefetched). The gathers go
through the engine's Wire (parallel/data/wire.py), which may carry int8 codes (ZeRO++'s qwZ).
"""

from engine.autograd import Function, Tensor, no_grad
from engine.backend import get_array_module

from engine.flat import placeholder

from .buckets import overlap_counts


def default_layers(model):
    """The units of stage 3: ``model.blocks`` if the model has them (GPT), else its children."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if blocks is not None else model.children()


class Unit:
    """Parameters gathered together: their flat ranges, gather buffers and handles."""

    def __init__(self, name, module, params, segments):
        self.name, self.module, self.params, self.segments = name, module, params, segments
        self.handles, self.gathered, self.index = None, False, -1
        self.inner = type(module).forward.__get__(module) if module is not None else None


class GatheredLayer(Function):
    """One graph node per layer call: forward unrecorded, backward recomputes (see above)."""

    def forward(self, x, *params, unit=None, owner=None):
        self.unit, self.owner = unit, owner
        owner.ensure(unit)
        owner.prefetch(unit.index + 1)
        self.rng_state = owner.rng_state()
        with no_grad():
            y = unit.inner(Tensor(x))                          # (B, T, C) -> (B, T, C)
        owner.free(unit)
        self.x = x                                             # the only activation kept
        return y.data

    def backward(self, g):
        unit, owner = self.unit, self.owner
        owner.ensure(unit)
        owner.prefetch(unit.index - 1)
        x = Tensor(self.x, requires_grad=self.needs_input_grad[0])
        later = owner.rng_state()
        owner.set_rng_state(self.rng_state)                    # the same dropout masks
        try:
            with owner.buckets.hooks_paused():                 # the outer backward reports these grads
                unit.inner(x).backward(g)
        finally:
            owner.set_rng_state(later)
        grads = tuple(p.grad for p in unit.params)
        for p in unit.params:
            p.grad = None
        owner.free(unit)
        self.x = None
        return (x.grad,) + grads


class ShardedLayers:
    """Stage 3's gather / free / prefetch over a ZeroEngine's parameter shards."""

    def __init__(self, engine, layers=None):
        self.engine, self.buckets = engine, engine.buckets
        flat = engine.flat
        own = layers is None                              # the model's own blocks
        layers = default_layers(engine.model) if own else list(layers)
        owner, name_of = {}, {id(p): n for n, p in zip(flat.names, flat.params)}
        for i, m in enumerate(layers):
            for p in m.parameters():
                if id(p) not in name_of:
                    raise ValueError(f"stage 3: layer {i} ({type(m).__name__}) has a parameter outside the model")
                if id(p) in owner:
                    raise ValueError(f"stage 3: parameter {name_of[id(p)]} is in layers {owner[id(p)]} and {i}; "
                                     "a shared parameter must stay outside the layers (the root)")
                owner[id(p)] = i
        self.units = []
        take = getattr(engine.model, "manage_layers", None)
        managed = own and take is not None and take(self)   # the model calls enter / leave itself
        for i, m in enumerate(layers):
            params = [p for p in flat.params if owner.get(id(p)) == i]
            unit = Unit(f"layer {i}", m, params, self._segments(params, name_of))
            unit.index = len(self.units)
            self.units.append(unit)
            if not managed:
                object.__setattr__(m, "forward", self._wrap(unit))  # instance attribute: Module.__call__ finds it
        rest = [p for p in flat.params if id(p) not in owner]
        self.root = Unit("root", None, rest, self._segments(rest, name_of))
        for unit in self.units + [self.root]:
            self.free(unit)

    def _segments(self, params, name_of):
        """Maximal contiguous flat ranges (dt, lo, hi) covering the parameters."""
        spans = sorted(self.engine.flat.index[name_of[id(p)]][:3] for p in params)   # (dt, off, n)
        out = []
        for dt, off, n in spans:
            if out and out[-1][0] == dt and out[-1][2] == off:
                out[-1] = (dt, out[-1][1], off + n)
            else:
                out.append((dt, off, off + n))
        return out

    def _wrap(self, unit):
        def forward(x, *args, **kwargs):
            if args or kwargs:
                raise TypeError(f"stage 3 {unit.name}: a sharded layer takes one tensor, got more arguments")
            return GatheredLayer.apply(x, *unit.params, unit=unit, owner=self)
        return forward

    # -- gather and free ------------------------------------------------------------------
    def start(self, unit):
        """Post the non-blocking all-gathers of the unit's ranges (no-op if under way or done)."""
        if unit.gathered or unit.handles is not None:
            return
        eng = self.engine
        N, r = eng.comm.size, eng.comm.rank
        unit.handles = []
        for dt, lo, hi in unit.segments:
            shard = eng.param_shards[dt]
            S = shard.size
            mine = shard[min(max(lo - r * S, 0), S):min(max(hi - r * S, 0), S)]   # this rank's overlap
            buf = get_array_module(shard).empty(hi - lo, dtype=shard.dtype)         # (hi - lo,) = flat[lo:hi]
            h = eng.wire.all_gather(mine, buf, counts=overlap_counts(lo, hi, S, N), async_op=True)   # maybe encoded
            unit.handles.append((dt, lo, buf, h))

    def prefetch(self, i):
        if 0 <= i < len(self.units):
            self.start(self.units[i])

    def ensure(self, unit):
        """Gather the unit (or finish its prefetch) and point its parameters at the buffers."""
        if unit.gathered:
            return
        self.start(unit)
        index = self.engine.flat.index
        views = {}
        with self.engine.timed_wait():
            for dt, lo, buf, h in unit.handles:
                h.wait()
                views[dt, lo] = buf
        for p, name in ((p, self._name(p)) for p in unit.params):
            dt, off, n, shape = index[name]
            lo, buf = next((lo, b) for (d, lo), b in views.items() if d == dt and lo <= off < lo + b.size)
            p.data = buf[off - lo:off - lo + n].reshape(shape)
        unit.handles, unit.gathered = None, True

    def _name(self, p):
        names = self.__dict__.get("_names")
        if names is None:
            flat = self.engine.flat
            names = self._names = {id(q): n for n, q in zip(flat.names, flat.params)}
        return names[id(p)]

    def free(self, unit):
        if unit.handles is not None:                      # a prefetch never used: finish it first
            for *_, h in unit.handles:
                h.wait()
            unit.handles = None
        for p in unit.params:
            p.data = placeholder(p.shape, p.dtype, get_array_module(p.data))
        unit.gathered = False

    def enter(self, i, step):
        """Layer i is about to compute (a model that runs its layers itself): gather it, prefetch i + step."""
        self.ensure(self.units[i])
        self.prefetch(i + step)

    def leave(self, i):
        self.free(self.units[i])

    def gather_root(self):
        self.ensure(self.root)

    def free_root(self):
        self.free(self.root)

    # -- the noise generator's cursor, restored for the recomputation ------------------------
    def rng_state(self):
        """The model's counter-based generator's cursor (engine/random.py), or None."""
        noise = getattr(self.engine.model, "noise", None)
        return noise.state() if noise is not None else None

    def set_rng_state(self, state):
        if state is not None:
            self.engine.model.noise.restore(state)
