"""ZeRO-3's slot pool: where a gathered layer's parameters live, reused round-robin.

A recorded forward keeps references to the arrays its ops saved (a Linear keeps its weight),
so a gathered layer whose buffer were fresh per gather would be pinned until its backward:
L layers of full parameters, not "16P/N + a layer". The pool gives every layer a fixed
place instead, slot(i) = i mod K (K = 2 by default, sized for the largest layer per dtype,
each layer's flat segments laid out one after another in it):

    forward,  layer i:   gather i -> slot(i) | prefetch i+1 -> slot(i+1) | compute | release slot(i)
    backward, layer i:   gather i -> slot(i) AGAIN | prefetch i-1 -> slot(i-1) | backward | release

The ops' saved references are views of slot(i); a later layer's gather overwrites it, and the
second gather of layer i puts the same values back (the same shards, the same codes) just
before those references are read. Order: forward 0..L-1, backward L-1..0, so when layer i's
backward starts (its output's gradient is complete) every later layer's backward is done,
and when it ends (its input's gradient is complete) none of its ops is left; with K >= 2 the
prefetch of i-1 lands in the slot of i+1 (done) and never in slot(i) (computing). Memory:
K x the largest layer, whatever the depth, during the step: the buffers are allocated at the
step's first gather and dropped with the root after the update (``drop``), so between steps a
rank holds exactly 16P/N.

A released slot keeps its layer's values until another layer claims it, and the shards do not
change within a step: so a claim by the layer still *resident* there needs no gather. With
K = 2 that is the last two layers of the forward, whose backward follows at once: ZeRO-3
gathers 2L - 2 layers per step instead of 2L (``stats`` counts both kinds). Resident values
are exactly a fresh gather's (the same shards, the same codes); ``drop`` after the update
forgets them, and the debug mode below, which poisons every released slot, disables the reuse.

Each slot has a state: ``free`` (its contents may be overwritten), ``gathering`` and ``live``
(a layer's parameters are there for a computation that has started); claiming a slot that is
not free for another layer is a RuntimeError naming both layers, so a schedule that would
overwrite a computing layer fails loudly. What the state cannot see, a saved reference read
while its slot is free (a backward that skipped its gather), the debug mode ``poison`` makes
visible: a released slot is filled with NaN, so the loss or the gradients become NaN
(ENGINE_POOL_POISON=1; tests/mpi_workers/zero_equiv.py runs every stage with it and shows it
catches such a read).
"""
import os

from engine.backend import get_array_module

FREE, GATHERING, LIVE = "free", "gathering", "live"


def poison_default():
    """ENGINE_POOL_POISON=1 turns the debug mode on for every pool built afterwards."""
    return os.environ.get("ENGINE_POOL_POISON", "0") not in ("", "0")


class SlotPool:
    """K slots, each {dt: 1-D buffer} of ``sizes[dt]`` elements (the largest layer's).

    like: {dt: an array of that dtype} (its array module and dtype make the buffers)."""

    def __init__(self, sizes, like, slots=2, poison=None):
        if slots < 1:
            raise ValueError(f"a ZeRO-3 pool needs at least one slot, got {slots}")
        self.poison = poison_default() if poison is None else bool(poison)
        self.sizes = dict(sizes)
        self.make = {dt: (get_array_module(like[dt]), like[dt].dtype) for dt in sizes}
        self.slots = [{"bufs": None, "holder": None, "state": FREE, "resident": None} for _ in range(slots)]
        self.stats = {"gathered": 0, "reused": 0}         # claims that gathered / found their values there

    def __len__(self):
        return len(self.slots)

    def slot_of(self, i):
        return i % len(self.slots)

    def claim(self, i, name):
        """Slot(i)'s buffers {dt: 1-D array} for layer i, and True if they hold layer i's values
        already (resident: no gather needed; the slot is live at once), False if layer i must be
        gathered into them; RuntimeError if another layer's computation still holds the slot."""
        s = self.slots[self.slot_of(i)]
        if s["state"] != FREE and s["holder"] != i:
            raise RuntimeError(f"ZeRO-3 pool: {name} needs slot {self.slot_of(i)}, still {s['state']} for layer "
                               f"{s['holder']} (a schedule with too few slots: {len(self.slots)})")
        ready = s["resident"] == i and s["bufs"] is not None
        s["holder"], s["state"], s["resident"] = i, (LIVE if ready else GATHERING), (i if ready else None)
        if s["bufs"] is None:                             # the step's first use of this slot
            s["bufs"] = {dt: xp.empty(self.sizes[dt], dtype=d) for dt, (xp, d) in self.make.items()}
            self._poison(s)
        self.stats["reused" if ready else "gathered"] += 1
        return s["bufs"], ready

    def mark_live(self, i):
        """Layer i's gather into its slot is complete: the slot holds (and computes with) its values."""
        s = self.slots[self.slot_of(i)]
        s["state"], s["resident"] = LIVE, i

    def release(self, i):
        """Layer i is done with its slot for now: it may be overwritten; until then its values stay
        resident (debug: poisoned instead, and forgotten)."""
        s = self.slots[self.slot_of(i)]
        if s["holder"] == i and s["state"] != FREE:
            s["state"] = FREE
            if self.poison:
                self._poison(s)
                s["resident"] = None

    def drop(self):
        """The buffers go, and what was resident in them (the step is over, the shards are about to
        change or have; every slot must be free); the next claim makes them again."""
        for i, s in enumerate(self.slots):
            if s["state"] != FREE:
                raise RuntimeError(f"ZeRO-3 pool: slot {i} dropped while {s['state']} for layer {s['holder']}")
            s["bufs"], s["holder"], s["resident"] = None, None, None

    def _poison(self, s):
        if self.poison and s["bufs"] is not None:
            for b in s["bufs"].values():
                b.fill(float("nan"))

    def nbytes(self):
        """Bytes of the K slots while allocated (during a step)."""
        return len(self.slots) * sum(n * d.itemsize for n, (_, d) in zip(self.sizes.values(), self.make.values()))
