"""Flat parameter buffers: every parameter is a view into one contiguous array per dtype.

As PyTorch FSDP's FlatParameter (Zhao et al. 2023) and DeepSpeed's flattened ZeRO groups:

    params  wte | wpe | h.0.ln_1.weight | h.0.ln_1.bias | ... | ln_f.bias | pad
    data    [==================== one 1-D array per dtype ====================]
    grad    [==================== same layout, zeros =========================]
    decay   [ T | F   | F               | F             | ... | F         | F  ]

``p.data`` and ``p.grad`` are rebound to reshaped slices of these buffers, so autograd's
in-place accumulation (``leaf.grad += g``) lands in the grad buffer, an optimizer that
updates ``data`` in place updates every parameter, and a DDP bucket, a ZeRO shard or a
checkpoint shard is a slice of a buffer, never a copy. Layout order is the order of
``named_params`` (``Module.named_parameters()``: registration order).

``world`` and ``align`` pad each buffer to ``padded_size(numel, world, align)`` so it
splits into ``world`` equal shards (``shard_range``), as ZeRO's reduce-scatter and
all-gather need; the padding is zero in data and grad and never decayed.
Memory: (itemsize * 2 + 1) bytes per element (data, grad, decay mask).
"""
import numpy as np

from .backend import get_array_module, to_numpy


def placeholder(shape, dtype, xp=np):
    """A read-only array of ``shape`` backed by one element: the parameter (or buffer) is not
    held on this rank right now (ZeRO-3 between gathers, another pipeline stage's layers).
    Shapes stay truthful, writes fail loudly."""
    return xp.broadcast_to(xp.zeros((), dtype=dtype), shape)


def padded_size(numel, world=1, align=1):
    """The smallest multiple of world * align that holds numel elements."""
    if world < 1 or align < 1 or numel < 0:
        raise ValueError(f"padded_size: need numel >= 0, world >= 1, align >= 1 (got {numel}, {world}, {align})")
    unit = world * align
    return -(-numel // unit) * unit


def shard_range(numel, rank, world, align=1):
    """(start, stop) of rank's shard of a buffer padded to padded_size(numel, world, align).

    All shards have the same length (a multiple of align); indices >= numel are padding,
    so the real elements of the shard are [start, min(stop, numel))."""
    if not 0 <= rank < world:
        raise ValueError(f"shard_range: rank {rank} not in [0, {world})")
    shard = padded_size(numel, world, align) // world
    return rank * shard, (rank + 1) * shard


def dtype_name(dtype):
    """'float32', 'bfloat16', ...: the key of the per-dtype dicts."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


class _ByDtype(dict):
    """A dict keyed by dtype name that also accepts np.dtype / type keys."""

    def __getitem__(self, key):
        return super().__getitem__(dtype_name(key))

    def __contains__(self, key):
        return super().__contains__(dtype_name(key))

    def get(self, key, default=None):
        return super().get(dtype_name(key), default)


class FlatParameters:
    """Pack (name, Parameter) pairs into per-dtype flat data and grad buffers.

    Attributes (dicts keyed by dtype name, np.dtype keys accepted too):
      data[dt], grad[dt]   1-D buffers (padded length)
      numel[dt]            elements really used (the rest is padding)
      decay_mask[dt]       1-D bool, True where Parameter.decay
      index[name]          (dtype name, offset, numel, shape)
      params               the Parameters, in layout order; names likewise
    """

    def __init__(self, named_params, world=1, align=1):
        named_params = list(named_params)
        seen, self.names, self.params = set(), [], []
        for name, p in named_params:
            if id(p) in seen:                         # a shared parameter is stored once
                continue
            seen.add(id(p))
            self.names.append(name)
            self.params.append(p)
        self.world, self.align = world, align
        self.index = {}
        self.numel, self.data, self.grad, self.decay_mask = _ByDtype(), _ByDtype(), _ByDtype(), _ByDtype()
        for name, p in zip(self.names, self.params):       # offsets, in order, per dtype
            dt = dtype_name(p.data.dtype)
            off = self.numel.get(dt, 0)
            self.index[name] = (dt, off, int(p.data.size), tuple(p.data.shape))
            self.numel[dt] = off + int(p.data.size)
        xps = {}
        for p in self.params:
            xps.setdefault(dtype_name(p.data.dtype), get_array_module(p.data))
        for dt, n in self.numel.items():
            xp, size = xps[dt], padded_size(n, world, align)
            self.data[dt] = xp.zeros(size, dtype=self.params[self._first(dt)].data.dtype)
            self.grad[dt] = xp.zeros_like(self.data[dt])
            self.decay_mask[dt] = xp.zeros(size, dtype=bool)
        for name, p in zip(self.names, self.params):       # copy in, then rebind to views
            dt, off, n, shape = self.index[name]
            self.data[dt][off:off + n] = p.data.reshape(-1)
            if p.grad is not None:
                self.grad[dt][off:off + n] = p.grad.reshape(-1)
            self.decay_mask[dt][off:off + n] = bool(getattr(p, "decay", True))
            p.data = self.data[dt][off:off + n].reshape(shape)
            p.grad = self.grad[dt][off:off + n].reshape(shape)

    def _first(self, dt):
        return next(i for i, p in enumerate(self.params) if dtype_name(p.data.dtype) == dt)

    @property
    def dtypes(self):
        return list(self.data.keys())

    def view(self, name):
        """The data view of one parameter, from the buffer."""
        dt, off, n, shape = self.index[name]
        return self.data[dt][off:off + n].reshape(shape)

    def grad_view(self, name):
        dt, off, n, shape = self.index[name]
        return self.grad[dt][off:off + n].reshape(shape)

    def named_views(self):
        """(name, data view, grad view) for every parameter, in layout order."""
        return [(name, self.view(name), self.grad_view(name)) for name in self.names]

    def zero_grad(self):
        for g in self.grad.values():
            g.fill(0)

    def check_views(self):
        """Raise if some parameter's data or grad no longer lives in the buffers (someone
        rebound ``p.data`` or ``p.grad``); an update would then silently miss it."""
        for name, p in zip(self.names, self.params):
            dt, off, n, _ = self.index[name]
            for what, arr, buf in (("data", p.data, self.data[dt]), ("grad", p.grad, self.grad[dt])):
                if arr is None or n and not _same_memory(arr, buf, off, n):
                    raise RuntimeError(f"flat buffer: {name}.{what} is no longer a view of the {dt} buffer")

    def __repr__(self):
        parts = ", ".join(f"{dt}: {n} (+{len(self.data[dt]) - n} pad)" for dt, n in self.numel.items())
        return f"FlatParameters({len(self.names)} tensors; {parts})"


def _same_memory(arr, buf, off, n):
    """Whether arr is exactly buf[off:off+n] in memory (NumPy and CuPy)."""
    def ptr(a):
        return a.__array_interface__["data"][0] if hasattr(a, "__array_interface__") else a.data.ptr
    return arr.size == n and ptr(arr) == ptr(buf) + off * buf.itemsize


def copy_into(dst, src):
    """dst[...] = src in place, across host and device and dtypes (cast on the host first)."""
    xp = get_array_module(dst)
    if get_array_module(src) is not xp:
        src = to_numpy(src)
        if src.dtype != dst.dtype:
            src = src.astype(dst.dtype)
        src = xp.asarray(src)
    dst[...] = src
