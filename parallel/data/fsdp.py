"""ZeRO stage 3, FSDP-style: each layer's parameters exist in full only while it computes.

Rajbhandari et al. 2019 (ZeRO-3, "P_os+g+p") and PyTorch FSDP (Zhao et al. 2023). Every
rank keeps only its shard of the flat parameter buffer. A layer (a sub-Module taking one
tensor and returning one) is one unit, gathered into a slot of a small pool (parallel/data/
pool.py: slot(i) = i mod K, K = 2, each sized for the largest layer):

    forward,  layer i:   wait all-gather(i) | start all-gather(i+1) | compute, recorded | release(i)
    backward, layer i:   all-gather(i) again, into the same slot | start all-gather(i-1) | backward | release(i)
                         -> its gradients go to the reduce-scatter buckets (parallel/data/buckets.py)

(A layer whose slot no other layer has claimed since, the forward's last K, is still there:
its second all-gather is skipped, pool.py.)

Gather of a contiguous range [lo, hi) of the flat buffer: rank k contributes its shard's
overlap with it (uneven all-gather counts, count_k = |[lo, hi) & [k S, (k+1) S)|), whose
concatenation in rank order is exactly flat[lo:hi]; parameters become views of the slot,
then placeholders again (zero-stride arrays of the right shape, zero.placeholder).

No recomputation (``recompute=False``, the default): the layer's forward is recorded as any
other, so its ops keep references to views of its slot, which later layers overwrite. Two
identity nodes bracket the layer in the graph: ``LayerExit`` on its output, whose backward
runs when the layer's backward is about to start (its output gradient is complete) and
gathers the layer into its slot again, so the saved references read the right values
(pool.py explains why the order makes this safe); ``LayerEntry`` on its input, whose backward
runs when every op of the layer is done, and releases the slot. Cost: two gathers of each
layer per step but the last K (as with recomputation) and no second forward; memory: every
activation, as stages 0-2, plus the pool.

Full recomputation (``recompute=True``; Chen et al. 2016, engine/recompute.py): the layer's
forward runs unrecorded (one node, ``GatheredLayer``, keeping only the layer's input) and its
backward re-gathers and re-runs it recorded, the counter-based generator's cursor restored so
the recomputation draws the same masks. Cost: one more forward per layer; memory: the layers'
inputs instead of all activations.

A model that runs its layers itself (the Terraformer's reversible stack, engine/reversible.py)
takes this gatherer through ``model.manage_layers(self)`` instead: its forwards are not wrapped,
and the stack calls ``enter(i, step)`` (gather layer i, prefetch i + step) and ``leave(i)``
(free it) around each layer, in forward and again in backward, where its reversible
recomputation is the recomputation above; nothing but the stack's output pair is kept.

Parameters outside every layer (for GPT: wte, tied to the output layer, wpe and ln_f)
form the root unit, gathered for the whole step as FSDP's root into its own buffer:
``gather_root()`` before the forward, ``free_root()`` after the update (the pool's buffers go
with it). Memory per rank: 16P/N between steps; during one, plus the root and the pool (K x the
largest layer). The gathers go through
the engine's Wire (parallel/data/wire.py), which may carry int8 codes (ZeRO++'s qwZ): the
second gather of a layer decodes the same codes, so it reproduces the first bit for bit.
"""

from engine.autograd import Function
from engine.backend import get_array_module
from engine.flat import placeholder
from engine.recompute import Recomputed

from .buckets import overlap_counts
from .pool import SlotPool


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


class GatheredLayer(Recomputed):
    """Full recomputation: one graph node per layer call, forward unrecorded, backward
    gathers again and recomputes (engine/recompute.py; the seams gather and free)."""

    def forward(self, x, *params, unit=None, owner=None):
        self.unit, self.owner = unit, owner
        return super().forward(x, *params, fn=unit.inner, rng=owner.noise())

    def before(self, step):
        self.owner.enter(self.unit.index, step)

    def after(self):
        self.owner.leave(self.unit.index)


class LayerEntry(Function):
    """Identity on a layer's input; its backward runs once all of the layer's ops are done
    (every one of them consumed this input): the layer's slot is released."""

    def forward(self, x, *params, unit=None, owner=None):
        self.unit, self.owner = unit, owner
        return x

    def backward(self, g):
        self.owner.leave(self.unit.index)
        return (g,) + (None,) * (len(self.parents) - 1)


class LayerExit(Function):
    """Identity on a layer's output; its backward runs before any of the layer's ops: the
    layer is gathered into its slot again (and the one before it prefetched)."""

    def forward(self, y, unit=None, owner=None):
        self.unit, self.owner = unit, owner
        return y

    def backward(self, g):
        self.owner.before_backward(self.unit)
        return g


class ShardedLayers:
    """Stage 3's gather / free / prefetch over a ZeroEngine's parameter shards.

    recompute: False, the layers' forwards recorded (their slots gathered again before their
    backward); True, full recomputation (GatheredLayer). slots: the pool's K (>= 2 is safe);
    poison: the pool's debug mode (None: ENGINE_POOL_POISON)."""

    def __init__(self, engine, layers=None, recompute=False, slots=2, poison=None):
        self.engine, self.buckets, self.recompute = engine, engine.buckets, bool(recompute)
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
        sizes = {}                                        # the largest layer, per dtype: a slot's size
        for unit in self.units:
            for dt in {d for d, _, _ in unit.segments}:
                sizes[dt] = max(sizes.get(dt, 0), sum(hi - lo for d, lo, hi in unit.segments if d == dt))
        self.pool = SlotPool(sizes, engine.param_shards, slots, poison)
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
            if self.recompute:
                return GatheredLayer.apply(x, *unit.params, unit=unit, owner=self)
            self.enter(unit.index, +1)
            try:
                y = unit.inner(LayerEntry.apply(x, *unit.params, unit=unit, owner=self))   # (B, T, C), recorded
            finally:
                self.leave(unit.index)                    # the saved references stay; the slot is free
            return LayerExit.apply(y, unit=unit, owner=self)
        return forward

    def before_backward(self, unit):
        """LayerExit's backward: layer ``unit`` into its slot again, the one before prefetched."""
        self.enter(unit.index, -1)

    # -- gather and free ------------------------------------------------------------------
    def start(self, unit):
        """Post the non-blocking all-gathers of the unit's ranges (no-op if under way or done):
        into its pool slot (a layer), or a fresh buffer (the root)."""
        if unit.gathered or unit.handles is not None:
            return
        eng = self.engine
        N, r = eng.comm.size, eng.comm.rank
        slot, ready = self.pool.claim(unit.index, unit.name) if unit is not self.root else (None, False)
        unit.handles, used = [], {}
        for dt, lo, hi in unit.segments:
            shard = eng.param_shards[dt]
            S = shard.size
            mine = shard[min(max(lo - r * S, 0), S):min(max(hi - r * S, 0), S)]   # this rank's overlap
            if slot is None:
                buf = get_array_module(shard).empty(hi - lo, dtype=shard.dtype)     # (hi - lo,) = flat[lo:hi]
            else:                                                                   # the segments one after another
                at = used.get(dt, 0)
                buf, used[dt] = slot[dt][at:at + hi - lo], at + hi - lo
            h = None if ready else eng.wire.all_gather(mine, buf, counts=overlap_counts(lo, hi, S, N),
                                                       async_op=True)        # maybe encoded; None: resident
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
                if h is not None:
                    h.wait()
                views[dt, lo] = buf
        for p, name in ((p, self._name(p)) for p in unit.params):
            dt, off, n, shape = index[name]
            lo, buf = next((lo, b) for (d, lo), b in views.items() if d == dt and lo <= off < lo + b.size)
            p.data = buf[off - lo:off - lo + n].reshape(shape)
        unit.handles, unit.gathered = None, True
        if unit is not self.root:
            self.pool.mark_live(unit.index)

    def _name(self, p):
        names = self.__dict__.get("_names")
        if names is None:
            flat = self.engine.flat
            names = self._names = {id(q): n for n, q in zip(flat.names, flat.params)}
        return names[id(p)]

    def free(self, unit):
        if unit.handles is not None:                      # a prefetch never used: finish it first
            for *_, h in unit.handles:
                if h is not None:
                    h.wait()
            unit.handles = None
            if unit is not self.root:
                self.pool.mark_live(unit.index)           # its values are in the slot: resident after release
        for p in unit.params:
            p.data = placeholder(p.shape, p.dtype, get_array_module(p.data))
        unit.gathered = False
        if unit is not self.root:
            self.pool.release(unit.index)

    def enter(self, i, step):
        """Layer i is about to compute (forward: step +1, backward: -1): gather it, prefetch i + step."""
        self.ensure(self.units[i])
        self.prefetch(i + step)

    def leave(self, i):
        self.free(self.units[i])

    def gather_root(self):
        for unit in self.units:                           # a new forward: no slot is held any more
            if unit.gathered or unit.handles is not None:
                self.free(unit)
        self.ensure(self.root)

    def free_root(self):
        """After the update: the root and the pool's buffers go (16P/N held between steps)."""
        self.free(self.root)
        for unit in self.units:
            if unit.gathered or unit.handles is not None:
                self.free(unit)
        self.pool.drop()

    def gathers_per_step(self):
        """How often one forward and backward gathers each layer: twice (forward, then before
        its backward), but once for the forward's last K, still resident in the pool's K slots
        when their backward starts (twice for all under the pool's poison)."""
        L, K = len(self.units), 0 if self.pool.poison else len(self.pool)
        return [1 if i >= L - K else 2 for i in range(L)]

    def gather_stats(self):
        """{'gathered': layer gathers posted, 'reused': claims whose layer was still resident} so far."""
        return dict(self.pool.stats)

    def pool_bytes(self):
        """Bytes of the slot pool during a step (K x the largest layer; none between steps)."""
        return self.pool.nbytes()

    def noise(self):
        """The model's counter-based generator (engine/random.py; its cursor is restored for
        the recomputation), or None."""
        return getattr(self.engine.model, "noise", None)
