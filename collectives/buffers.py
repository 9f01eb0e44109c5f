"""Buffers: how a caller's array becomes the flat contiguous array an algorithm works on.

- Layout. Algorithms see 1-D C-contiguous arrays. A contiguous array is reshaped (a view,
  no copy); a non-contiguous one is copied to a contiguous temporary, and when it is an
  output, the result is copied back into it at the end ("handled", never silently wrong).
- Blocks. A vector of c elements split over N ranks: block i has counts[i] elements at
  offsets[i]. The default split is balanced, c // N each and one more for the first c % N
  ranks, so any c (0, 1, primes, c not divisible by N) is allowed.
- Devices. CuPy arrays: the stream is synchronized before MPI reads a buffer
  (engine.backend.synchronize). If the MPI library is CUDA-aware the device buffers are
  passed to MPI directly; otherwise they are staged: copied into pinned host buffers lent
  by devices.POOL (reused: a repeated collective allocates nothing), reduced there, and
  copied back into the caller's device array when the collective completes. How CUDA
  awareness is detected, and the ENGINE_CUDA_AWARE_MPI override: devices.py.
"""
from functools import lru_cache

import numpy as np

from engine import backend

from .devices import cuda_aware, to_host
from .ops import AVG, finish


def block_counts(count, n):
    """Balanced split of `count` elements over n ranks."""
    q, r = divmod(count, n)
    return [q + 1 if i < r else q for i in range(n)]


def offsets(counts):
    """Exclusive prefix sums: offsets[i] = sum(counts[:i]), with offsets[n] = total."""
    offs = [0] * (len(counts) + 1)
    for i, c in enumerate(counts):
        offs[i + 1] = offs[i] + c
    return offs


@lru_cache(maxsize=1024)
def balanced(count, n):
    """(counts, offsets) of the balanced split, cached; shared lists: never mutate them."""
    counts = block_counts(count, n)
    return counts, offsets(counts)


@lru_cache(maxsize=1024)
def uniform(count, n):
    """(counts, offsets) of n blocks of `count` elements each, cached."""
    counts = [count] * n
    return counts, offsets(counts)


def complete(op, buf, n, writebacks, result):
    """The end of every collective: divide by n for avg, copy temporaries back into the
    caller's arrays, return the result."""
    if op is not None and op.name == AVG and n > 1:
        finish(op, buf, n)
    for w in writebacks:
        w()
    return result


def check_counts(counts, n, what):
    """counts as a list of n non-negative ints (1.5 or True is refused, not truncated)."""
    try:
        counts = list(counts)
        ints = [int(c) for c in counts]
    except (TypeError, ValueError):
        ints = None
    if ints is None or len(ints) != n or any(c < 0 or c != v or isinstance(v, bool) for c, v in zip(ints, counts)):
        raise ValueError(f"{what}: expected {n} non-negative integer counts, got {list(counts)!r}")
    return ints


def is_device(a):
    return type(a) is not np.ndarray and backend.is_device_array(a)


def as_array(a, what):
    if isinstance(a, np.ndarray) or is_device(a):      # NumPy (and subclasses) or CuPy
        return a
    raise TypeError(f"{what} must be a NumPy or CuPy array, got {type(a).__name__}")


def staging(*arrays):
    """(on_device, stage): any device array among `arrays`, and whether to stage via host."""
    dev = any(a is not None and is_device(a) for a in arrays)
    if dev:
        backend.synchronize()       # kernels writing these buffers must finish before MPI reads
    return dev, dev and not cuda_aware()


def flat_in(a, stage):
    """Flat contiguous array holding a's data, for reading."""
    if stage:
        return to_host(a)
    if a.flags.c_contiguous:
        return a if a.ndim == 1 else a.reshape(-1)
    return backend.get_array_module(a).ascontiguousarray(a).reshape(-1)


def flat_out(a, stage, writebacks):
    """Flat contiguous array to write a's new contents into; when that is a temporary
    (non-contiguous or staged), a copy-back is appended to `writebacks`."""
    if stage:
        h = to_host(a)                 # keeps a's contents (in-place ops)
        writebacks.append(lambda: backend.copy_into(a, h.reshape(a.shape)))
        return h
    if a.flags.c_contiguous:
        return a if a.ndim == 1 else a.reshape(-1)
    c = backend.get_array_module(a).ascontiguousarray(a).reshape(-1)
    writebacks.append(lambda: a.__setitem__(Ellipsis, c.reshape(a.shape)))
    return c


def base_of(a):
    """The object owning a's memory (NumPy and CuPy point a view's .base at the owner)."""
    b = a.base
    return a if b is None else b


def raw_bytes(a):
    """The raw bytes of a C-contiguous NumPy array, as a flat memoryview (the cheapest message
    spec for mpi4py, and the cheapest copy)."""
    return a.reshape(-1).view(np.uint8).data


def address(a):
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return iface["data"][0]


def related(a, b):
    """Whether two arrays may share memory (cheap: same owning base object)."""
    return base_of(a) is base_of(b)


def overlaps(a, b):
    ba, bb = a.base, b.base
    if (a if ba is None else ba) is not (b if bb is None else bb):
        return False
    if type(a) is np.ndarray and type(b) is np.ndarray:
        return np.may_share_memory(a, b)
    lo_a, lo_b = address(a), address(b)
    return lo_a < lo_b + b.nbytes and lo_b < lo_a + a.nbytes


def same_memory(a, b):
    """Whether a and b are the same elements (a view of the same start and size)."""
    return a is b or (a.nbytes == b.nbytes and related(a, b) and address(a) == address(b))


def is_block_of(x, out, offset_elems):
    """Whether x is exactly out's block starting at element offset_elems (in-place gather)."""
    return (related(x, out) and x.flags.c_contiguous and out.flags.c_contiguous
            and address(x) == address(out) + offset_elems * out.dtype.itemsize)
