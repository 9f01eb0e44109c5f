"""A strict stand-in for CuPy, on NumPy, so every GPU code path runs in tests without a GPU.

Test-only: ``ENGINE_DEVICE=gpu-emulated`` (engine/backend.py) makes "the GPU" this module.
It copies CuPy at the one place a CPU-only run never exercises, the boundary between host
and device memory:

- Device arrays are their own type (``ndarray`` here, holding a private NumPy array as the
  "device memory"). ``np.asarray(d)``, ``np.array(d)``, ``np.ascontiguousarray(d)`` raise
  TypeError, as CuPy's ``__array__`` does; so does any ufunc or function that mixes a NumPy
  array with a device array (``host + d``, ``np.copyto(host, d)``, ``d @ host``), as CuPy's
  ``__array_ufunc__`` / ``__array_function__`` do. Python and NumPy scalars mix freely, and a
  0-d device array converts with float()/int()/bool() (CuPy synchronizes and allows it).
  Reductions and scalar indexing return 0-d device arrays, not NumPy scalars, as CuPy does.
- The explicit transfers work and are counted: ``asarray``/``array`` of host data and
  ``d.set(host)`` (host to device), ``asnumpy(d)`` and ``d.get(out=)`` (device to host).
  NumPy arrays used as indices or as values assigned into a device array are converted, as
  CuPy converts them, and counted apart (``implicit_h2d``).
- Device memory is accounted: every array that owns its memory counts its bytes from its
  creation until it is garbage collected (``memory.used``, ``memory.peak``), and
  ``get_default_memory_pool().used_bytes()`` reports the same, as CuPy's pool does.
- ``__cuda_array_interface__`` (what mpi4py and the project's device detection read) points
  at the host memory underneath, so a "CUDA-aware" MPI really can move it; whether the double
  pretends MPI is CUDA-aware is ``ENGINE_GPU_DOUBLE_CUDA_AWARE=1`` (default 0, which makes
  the staging path the one tested), read by collectives/devices.py through ``mpi_cuda_aware()``.
- What the project calls beyond NumPy's names: ``cuda.get_current_stream().synchronize()``,
  ``cuda.Stream(non_blocking=True)`` with ``record()`` / ``wait_event()`` (parallel/data/offload.py),
  ``cuda.Device(i).use()``, ``cuda.runtime.getDeviceCount()`` (``ENGINE_GPU_DOUBLE_DEVICES``,
  default 1), ``cuda.alloc_pinned_memory`` / ``empty_pinned`` (counted pinned host bytes),
  ``random.RandomState``, ``scatter_add`` (cupyx's), ``get_array_module``.

The counters, pinned memory and the `cuda` namespace live in engine/device_double_cuda.py.
Everything else is NumPy's own function applied to the unwrapped arrays, so results are
bitwise NumPy's: a test that passes on the CPU and fails here found a host/device mix-up.
"""
import os
import types
import weakref

import numpy as np

from . import device_double_cuda as _device
from .device_double_cuda import _alloc, _free, memory

# CuPy's names for the device and pinned memory (engine/device_double_cuda.py)
cuda, empty_pinned, zeros_pinned = _device.cuda, _device.empty_pinned, _device.zeros_pinned
get_default_memory_pool, get_default_pinned_memory_pool = _device.get_default_memory_pool, _device.get_default_pinned_memory_pool


_OWNERS = weakref.WeakValueDictionary()   # id(host buffer) -> the device array owning it
_HIDDEN = frozenset({"__array_interface__", "__array_struct__", "ctypes", "tofile"})


def _root(h):
    while isinstance(h.base, np.ndarray):
        h = h.base
    return h


class ndarray:
    """A device array: a NumPy array behind a wall that only explicit transfers cross."""

    __slots__ = ("_h", "_owner", "__weakref__")
    __array_priority__ = 100                 # CuPy's

    def __init__(self, h, _owner=None):
        self._h = h
        self._owner = _owner

    # -- the boundary --------------------------------------------------------
    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method == "__call__":
            _check_operands(inputs, ufunc.__name__)
        return _apply(getattr(ufunc, method), inputs, kwargs, ufunc.__name__)

    def __array_function__(self, func, types_, args, kwargs):
        mine = getattr(_self, func.__name__, None)
        if mine is None or not callable(mine) or isinstance(mine, type):
            return NotImplemented
        return mine(*args, **kwargs)

    @property
    def __cuda_array_interface__(self):
        h = self._h
        return {"shape": h.shape, "typestr": h.dtype.str, "version": 2,
                "data": (h.__array_interface__["data"][0], not h.flags.writeable),
                "strides": None if h.flags.c_contiguous else h.strides}

    def get(self, stream=None, out=None, **_):
        memory.d2h += 1
        memory.d2h_bytes += self._h.nbytes
        if out is None:
            return self._h.copy()
        if type(out) is not np.ndarray:
            raise TypeError("out must be a numpy.ndarray")
        np.copyto(out, self._h)
        return out

    def set(self, arr, stream=None):
        if isinstance(arr, ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        arr = np.asarray(arr)
        if arr.shape != self._h.shape or arr.dtype != self._h.dtype:
            raise ValueError("Shape or dtype mismatch")
        memory.h2d += 1
        memory.h2d_bytes += arr.nbytes
        np.copyto(self._h, arr)

    # -- what is not an array ------------------------------------------------
    shape = property(lambda self: self._h.shape)
    dtype = property(lambda self: self._h.dtype)
    ndim = property(lambda self: self._h.ndim)
    size = property(lambda self: self._h.size)
    nbytes = property(lambda self: self._h.nbytes)
    itemsize = property(lambda self: self._h.itemsize)
    strides = property(lambda self: self._h.strides)
    flags = property(lambda self: self._h.flags)

    @shape.setter
    def shape(self, value):
        self._h.shape = value

    @property
    def base(self):
        return self._owner

    @property
    def device(self):
        return cuda.Device(cuda._current)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._h.__array_interface__["data"][0])

    def __getattr__(self, name):
        if name in _HIDDEN:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r}")
        attr = getattr(self._h, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*a, _self=self, **k):     # holds self: a view's owner must outlive the call
            return _apply(attr, a, k, name)
        return method

    # -- conversions CuPy allows (they synchronize) --------------------------
    def __float__(self):
        return float(self._h)

    def __int__(self):
        return int(self._h)

    def __index__(self):
        return self._h.__index__()

    def __bool__(self):
        return bool(self._h)

    def __complex__(self):
        return complex(self._h)

    def __len__(self):
        return len(self._h)

    def __iter__(self):
        return (_wrap(x) for x in self._h)

    def __repr__(self):
        return repr(self._h)

    def __str__(self):
        return str(self._h)

    def __format__(self, spec):
        return format(self._h.item() if self._h.ndim == 0 else self._h, spec)

    def item(self):
        return self._h.item()

    def tolist(self):
        return self._h.tolist()

    def __getitem__(self, key):
        return _wrap(self._h[_index(key)])

    def __setitem__(self, key, value):
        if type(value) is np.ndarray:
            memory.implicit_h2d += 1
        self._h[_index(key)] = value._h if isinstance(value, ndarray) else value

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("device arrays are not pickled here: move them to the host first")

    __hash__ = None


def _should_use_rop(other):
    """CuPy's rule (cupy/_core/core.pyx): ``d op other`` defers to other's reflected operator
    when other opts out of ufuncs (``__array_ufunc__ = None``) or, having no
    ``__array_ufunc__``, sets a higher ``__array_priority__`` than the device array's 100."""
    try:
        return other.__array_ufunc__ is None
    except AttributeError:
        return getattr(other, "__array_priority__", 0) > ndarray.__array_priority__


def _binary(ufunc):
    def op(self, other):
        return NotImplemented if _should_use_rop(other) else ufunc(self, other)
    return op, (lambda self, other: ufunc(other, self))


for _name, _uf in [("add", np.add), ("sub", np.subtract), ("mul", np.multiply), ("truediv", np.true_divide),
                   ("floordiv", np.floor_divide), ("mod", np.remainder), ("pow", np.power),
                   ("matmul", np.matmul), ("and", np.bitwise_and), ("or", np.bitwise_or),
                   ("xor", np.bitwise_xor), ("lshift", np.left_shift), ("rshift", np.right_shift)]:
    _f, _r = _binary(_uf)
    setattr(ndarray, f"__{_name}__", _f)
    setattr(ndarray, f"__r{_name}__", _r)
    setattr(ndarray, f"__i{_name}__", (lambda uf: lambda self, other: _inplace(uf, self, other))(_uf))
for _name, _uf in [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less), ("le", np.less_equal),
                   ("gt", np.greater), ("ge", np.greater_equal)]:
    setattr(ndarray, f"__{_name}__", (lambda uf: _binary(uf)[0])(_uf))
for _name, _uf in [("neg", np.negative), ("pos", np.positive), ("abs", np.absolute), ("invert", np.invert)]:
    setattr(ndarray, f"__{_name}__", (lambda uf: lambda self: uf(self))(_uf))


def _inplace(ufunc, self, other):
    """a += b keeps a (the same object), as NumPy and CuPy do."""
    ufunc(self, other, out=self)
    return self


def _wrap(r):
    """A NumPy result as what CuPy would return: device arrays (views keep their owner)."""
    if isinstance(r, np.ndarray):
        root = _root(r)
        owner = _OWNERS.get(id(root))
        if owner is not None and owner._h is root:
            return owner if r is root else ndarray(r, owner)
        return _own(r if r is root else r.copy())
    if isinstance(r, np.generic):
        return _own(np.asarray(r))
    if isinstance(r, tuple):
        return tuple(_wrap(x) for x in r)
    if isinstance(r, list):
        return [_wrap(x) for x in r]
    return r


def _own(h):
    """A new device array owning host buffer h (its bytes counted until it is collected)."""
    d = ndarray(h)
    _OWNERS[id(h)] = d
    _alloc(h.nbytes)
    weakref.finalize(d, _free, h.nbytes)
    return d


def _unwrap(x, what):
    if isinstance(x, ndarray):
        return x._h
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {what}: move NumPy arrays to the device "
                        "explicitly (cupy.asarray) or device arrays to the host (.get())")
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(y, what) for y in x)
    return x


def _check_operands(inputs, what):
    """A ufunc takes device arrays and scalars; CuPy refuses anything else (a list, an object
    such as a Tensor) with TypeError rather than making an object array of it."""
    for x in inputs:
        if not isinstance(x, (ndarray, np.ndarray, np.generic, int, float, complex)):
            raise TypeError(f"Unsupported type {type(x)} in {what}")


def _index(key):
    """Indices: device arrays unwrapped, NumPy arrays and lists converted (CuPy converts them)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._h
    if isinstance(key, np.ndarray):
        memory.implicit_h2d += 1
    return key


def _apply(f, args, kwargs, what):
    out = kwargs.get("out")
    r = f(*_unwrap(args, what), **{k: _unwrap(v, what) for k, v in kwargs.items()})
    if out is not None:                       # ufunc(..., out=d) returns d itself
        return out[0] if isinstance(out, tuple) and len(out) == 1 else out
    return _wrap(r)


# -- the module's functions ----------------------------------------------------

def asarray(a, dtype=None, order=None, **_):
    """Host data to the device (counted), or a device array as it is (cast if dtype)."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == np.dtype(dtype) else a.astype(dtype)
    h = np.array(a, dtype=dtype, order=order or "K", copy=True)
    memory.h2d += 1
    memory.h2d_bytes += h.nbytes
    return _own(h)


def array(a, dtype=None, copy=True, order="K", **_):
    if isinstance(a, ndarray):
        return a.astype(dtype or a.dtype, order=order, copy=True) if copy else asarray(a, dtype)
    return asarray(a, dtype, order)


def ascontiguousarray(a, dtype=None):
    if not isinstance(a, ndarray):
        return asarray(np.ascontiguousarray(a), dtype)
    return _wrap(np.ascontiguousarray(a._h, dtype=dtype))


def asnumpy(a, stream=None, out=None, **_):
    if isinstance(a, ndarray):
        return a.get(out=out)
    if out is not None:
        np.copyto(out, a)
        return out
    return np.asarray(a)


def get_array_module(*args):
    return _self if any(isinstance(a, ndarray) for a in args) else np


def scatter_add(a, indices, values):
    """cupyx.scatter_add: a[indices] += values with repeats accumulated."""
    np.add.at(a._h, _index(indices), values._h if isinstance(values, ndarray) else values)


def copyto(dst, src, casting="same_kind", where=True):
    if not isinstance(dst, ndarray):
        raise TypeError(f"copyto: destination must be a device array, got {type(dst)}")
    if type(src) is np.ndarray and src.size != 1:
        raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
    np.copyto(dst._h, src._h if isinstance(src, ndarray) else src, casting=casting,
              where=where._h if isinstance(where, ndarray) else where)


class _Ufunc:
    """A NumPy ufunc behind the wall (call, reduce, accumulate, at, outer)."""

    def __init__(self, uf):
        self._uf = uf
        self.__name__ = uf.__name__
        self.nin, self.nout = uf.nin, uf.nout

    def __call__(self, *a, **k):
        _check_operands(a, self.__name__)
        return _apply(self._uf, a, k, self.__name__)

    def __getattr__(self, name):
        attr = getattr(self._uf, name)
        return (lambda *a, **k: _apply(attr, a, k, f"{self.__name__}.{name}")) if callable(attr) else attr


def _function(f):
    def call(*a, **k):
        return _apply(f, a, k, f.__name__)
    call.__name__ = f.__name__
    return call


class _Namespace(types.ModuleType):
    """np.linalg, np.fft ... behind the wall."""

    def __init__(self, name, inner):
        super().__init__(name)
        self._inner = inner

    def __getattr__(self, name):
        return _lookup(getattr(self._inner, name))


def _lookup(attr):
    if isinstance(attr, np.ufunc):
        return _Ufunc(attr)
    if isinstance(attr, type) or not callable(attr):
        return attr                          # dtypes (cupy.float32 is numpy.float32), constants
    return _function(attr)


class _RandomState:
    """cupy.random.RandomState: NumPy's RandomState drawing into device arrays."""

    def __init__(self, seed=None):
        self._rs = np.random.RandomState(seed)

    def random_sample(self, size=None, dtype=np.float64):
        return _own(np.asarray(self._rs.random_sample(size), dtype=dtype))

    def __getattr__(self, name):
        attr = getattr(self._rs, name)
        return (lambda *a, **k: _wrap(np.asarray(attr(*_unwrap(a, name), **k)))) if callable(attr) else attr


random = types.ModuleType(__name__ + ".random")
random.RandomState = _RandomState
random.seed = np.random.seed
linalg = _Namespace(__name__ + ".linalg", np.linalg)


def mpi_cuda_aware():
    """Whether the double pretends the MPI library takes device buffers (see module docstring)."""
    return os.environ.get("ENGINE_GPU_DOUBLE_CUDA_AWARE", "0").strip() not in ("", "0", "false", "no")


_self = None
_CACHE = {}


def __getattr__(name):
    """Any other NumPy name, behind the wall (cupy.exp, cupy.zeros, cupy.einsum ...)."""
    if name.startswith("__"):
        raise AttributeError(name)
    if name in _CACHE:
        return _CACHE[name]
    try:
        attr = getattr(np, name)
    except AttributeError:
        raise AttributeError(f"the device double (like CuPy) has no {name!r}") from None
    value = _CACHE[name] = _lookup(attr)     # not cached in globals(): cupy.max would then
    return value                            # shadow the builtin max this file calls (_alloc)


def _bind_self():
    import sys
    global _self
    _self = sys.modules[__name__]


_bind_self()
