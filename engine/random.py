"""Counter-based random numbers: every draw is a pure function of where it is used.

A per-rank stream (NumPy's Generator) hands out numbers in call order, so a layout that
splits the batch, the tokens or the layers over ranks draws other numbers than one process
does. A counter-based generator (Salmon et al. 2011, "Parallel random numbers: as easy as
1, 2, 3", the idea behind Philox and JAX's PRNG) instead computes each number from a key:

    u(seed, step, micro, layer, site, row, token, feature) = mix(... ) / 2^53   in [0, 1)

    seed     the run's seed              step    the optimizer step
    micro    the gradient-accumulation pass within the step
    layer    the block (-1: the embedding)   site   which draw in the layer (SITES)
    row      the sequence's row in the GLOBAL batch of this pass
    token    the token's global position in its sequence
    feature  the index along the remaining axes (the channel)

so any split of rows (dp, micro-batches), of tokens (sp, contiguous or zigzag) and of layers
(pp, interleaved chunks) draws exactly the numbers one process draws, and a recomputation
(ZeRO-3's, a reversible layer's) redraws them without saving anything. The generator holds
no state beyond its cursor (step, micro, rows, positions), which the caller sets: resume is
bitwise with nothing saved.

The mixing function is SplitMix64's finalizer (Steele, Lea and Flood 2014, "Fast splittable
pseudorandom number generators"; the constants are Stafford's "Mix13"), applied as SplitMix64
applies it to a counter: z = mix(base + (i + 1) * golden). Per draw: the (row, token) bases
are mixed once (B T values), then one mix per element, vectorised (NumPy or CuPy uint64
arithmetic wraps modulo 2^64).

    noise = CounterRNG(seed)
    noise.set_step(step, micro)                   # once per forward pass (train.py's step)
    with noise.located(rows, pos):                # this rank's global rows (B,) and positions (T,)
        u = noise.uniform(layer=3, site=SITES["attn"], shape=(B, T, C))   # (B, T, C) in [0, 1)
    coin = noise.scalar(layer=3, site=SITES["ffn_coin"])   # one number per (step, micro, layer)
    rot = noise.shared_normal(layer=3, site=SITES["lsh"], shape=(2, 16, 4))   # the same on every rank
"""
from contextlib import contextmanager

import numpy as np

from .backend import get_array_module, to_device

GOLDEN = 0x9E3779B97F4A7C15          # 2^64 / golden ratio: SplitMix64's increment
M1, M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
MASK = (1 << 64) - 1

SITES = {"embed": 0, "attn": 1, "mlp": 2, "ffn_coin": 3, "ffn_gumbel": 4, "ffn_dropout": 5, "lsh": 6}


def mix_int(z):
    """SplitMix64's finalizer on a Python int (mod 2^64)."""
    z &= MASK
    z = ((z ^ (z >> 30)) * M1) & MASK
    z = ((z ^ (z >> 27)) * M2) & MASK
    return z ^ (z >> 31)


def mix(z):
    """The same finalizer on a uint64 array (NumPy or CuPy), elementwise; returns a new array."""
    xp = get_array_module(z)
    z = z ^ (z >> xp.uint64(30))
    z *= xp.uint64(M1)
    z ^= z >> xp.uint64(27)
    z *= xp.uint64(M2)
    z ^= z >> xp.uint64(31)
    return z


def key_of(*parts):
    """One 64-bit key from a sequence of integers (each chained through the mixer)."""
    k = 0
    for p in parts:
        k = mix_int(k + GOLDEN + (int(p) & MASK))
    return k


class Cursor:
    """Where the next draws are: optimizer step, accumulation pass, global rows and positions
    of the local batch (None: 0..B-1 and 0..T-1, one process's own)."""
    __slots__ = ("step", "micro", "rows", "pos")

    def __init__(self, step=0, micro=0, rows=None, pos=None):
        self.step, self.micro, self.rows, self.pos = step, micro, rows, pos

    def copy(self):
        return Cursor(self.step, self.micro, self.rows, self.pos)


class CounterRNG:
    """Counter-based uniforms keyed by (seed, step, micro, layer, site, row, token, feature)."""

    def __init__(self, seed):
        self.seed = int(seed) & MASK
        self.cursor = Cursor()

    # -- the cursor ---------------------------------------------------------------------------
    def set_step(self, step, micro=0):
        """The optimizer step and the accumulation pass that the following draws belong to."""
        self.cursor.step, self.cursor.micro = int(step), int(micro)

    @contextmanager
    def located(self, rows=None, pos=None):
        """Draws inside are for the global rows (B,) and token positions (T,) or (B, T) given;
        one left out (None) stays as the enclosing block set it (a step sets the rows, the
        sequence-parallel forward inside it the positions)."""
        saved = self.cursor.copy()
        if rows is not None:
            self.cursor.rows = np.asarray(rows, dtype=np.int64)
        if pos is not None:
            self.cursor.pos = np.asarray(pos, dtype=np.int64)
        try:
            yield self
        finally:
            self.cursor = saved

    def state(self):
        """The cursor (to redraw the same numbers later: a recomputation)."""
        return self.cursor.copy()

    def restore(self, cursor):
        self.cursor = cursor.copy()

    # -- draws --------------------------------------------------------------------------------
    def _key(self, layer, site):
        c = self.cursor
        return key_of(self.seed, c.step, c.micro, layer, site)

    def scalar(self, layer, site):
        """One uniform in [0, 1) per (step, micro, layer, site): the same on every rank."""
        return (self._key(layer, site) >> 11) * 2.0 ** -53

    def shared_normal(self, layer, site, shape, step=None):
        """Standard normals (float64, host) keyed by (seed, step, micro, layer, site, index) only:
        the same for every row, token and rank (LSH attention's random rotations). ``step``
        given: that step and pass 0 instead of the cursor's (a fixed draw, e.g. for evaluation).
        Box-Muller on pairs of uniforms."""
        c = self.cursor
        key = key_of(self.seed, c.step, c.micro, layer, site) if step is None else key_of(self.seed, step, 0,
                                                                                            layer, site)
        n = int(np.prod(shape, dtype=np.int64))
        with np.errstate(over="ignore"):
            z = mix(np.uint64(key) + (np.arange(1, 2 * n + 1, dtype=np.uint64) * np.uint64(GOLDEN)))
        u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53                    # (2n,) in (0, 1)
        r = np.sqrt(-2.0 * np.log(u[:n]))
        return (r * np.cos(2 * np.pi * u[n:])).reshape(tuple(shape))

    def uniform(self, layer, site, shape, dtype=np.float64, like=None):
        """Uniforms (B, T, *features) in [0, 1) for the cursor's rows and positions; float32
        gets 24 random bits, float64 53. ``like``: an array whose module (NumPy/CuPy) to use."""
        B, T = int(shape[0]), int(shape[1])
        F = int(np.prod(shape[2:], dtype=np.int64)) if len(shape) > 2 else 1
        c = self.cursor
        rows = np.arange(B, dtype=np.int64) if c.rows is None else c.rows
        pos = np.arange(T, dtype=np.int64) if c.pos is None else c.pos
        if rows.shape != (B,):
            raise ValueError(f"CounterRNG: the cursor holds {rows.shape[0]} rows, the draw has {B}")
        if pos.shape not in ((T,), (B, T)):
            raise ValueError(f"CounterRNG: the cursor's positions have shape {pos.shape}, the draw (B, T) = "
                             f"({B}, {T})")
        key = np.uint64(self._key(layer, site))
        with np.errstate(over="ignore"):
            r = mix(key + (rows.astype(np.uint64) + np.uint64(1)) * np.uint64(GOLDEN))          # (B,)
            base = mix(r[:, None] + (np.broadcast_to(pos, (B, T)).astype(np.uint64) + np.uint64(1))
                       * np.uint64(M1))                                                         # (B, T)
        xp = get_array_module(like) if like is not None else np
        base = to_device(base) if xp is not np else base
        feat = (xp.arange(1, F + 1, dtype=xp.uint64) * xp.uint64(GOLDEN))                     # (F,)
        z = mix(base[:, :, None] + feat)                                                        # (B, T, F)
        if np.dtype(dtype).itemsize >= 8:
            u = (z >> xp.uint64(11)).astype(xp.float64) * (2.0 ** -53)
        else:
            u = (z >> xp.uint64(40)).astype(np.dtype(dtype)) * np.dtype(dtype).type(2.0 ** -24)
        return u.reshape(tuple(shape))
