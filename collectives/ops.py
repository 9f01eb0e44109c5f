"""Reduction operators and dtypes: sum, avg, max, min, prod over NumPy/CuPy arrays.

A hand-written algorithm reduces two arrays with `op.ufunc(a, b, out)`, the elementwise
NumPy ufunc (CuPy arrays dispatch to CuPy's kernel through `__array_ufunc__`). Each
pairwise step is rounded to the array's dtype, as in every MPI library, so a float sum
over N ranks carries at most (N-1) roundings of unit u:

    |computed - exact| <= (N-1) * u * sum_i |x_i|          (Higham 2002, eq. 4.4)

whatever the association order; each algorithm documents its own order.

avg is sum followed by one division by N on every rank (floor division for integer
dtypes: the mean of int32 gradients stays int32 and rounds toward -inf).

Bytes, not types, cross the wire. Point-to-point moves always send raw bytes (MPI.BYTE),
so any dtype travels, bfloat16 included. For the library's own collective (algo="mpi",
the test oracle and benchmark baseline) an MPI datatype and MPI.Op are needed: MPI has no
bfloat16 and float16 is only an MPICH extension, so both 16-bit float types travel as
MPI.UINT16_T words and are reduced by a user-defined, commutative MPI.Op that views the
words as the real dtype and applies the same NumPy ufunc (so the oracle rounds like us).
"""
import numpy as np
from mpi4py import MPI

from engine import backend

SUM, AVG, MAX, MIN, PROD = "sum", "avg", "max", "min", "prod"


class ReduceOp:
    """One reduction: its name, its NumPy ufunc and its MPI.Op (for native MPI types)."""
    __slots__ = ("name", "ufunc", "mpi")

    def __init__(self, name, ufunc, mpi):
        self.name, self.ufunc, self.mpi = name, ufunc, mpi

    def __repr__(self):
        return f"ReduceOp({self.name!r})"


OPS = {
    SUM: ReduceOp(SUM, np.add, MPI.SUM),
    AVG: ReduceOp(AVG, np.add, MPI.SUM),      # sum, then finish() divides by N
    MAX: ReduceOp(MAX, np.maximum, MPI.MAX),
    MIN: ReduceOp(MIN, np.minimum, MPI.MIN),
    PROD: ReduceOp(PROD, np.multiply, MPI.PROD),
}
NAMES = tuple(OPS)  # index order used by the debug signature
_GET = OPS.get


def resolve(op):
    """'sum' | 'avg' | 'max' | 'min' | 'prod' (any case) or a ReduceOp -> ReduceOp."""
    found = _GET(op)
    if found is not None:
        return found
    if isinstance(op, ReduceOp):
        return op
    try:
        return OPS[op.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown reduction op {op!r}; expected one of {', '.join(NAMES)}") from None


def reducer(op, xp_is_device, sync_after):
    """The callable `reduce(a, b, out)` handed to algorithms. On a device array whose result MPI
    will read directly (CUDA-aware MPI) the stream is synchronized after each kernel."""
    ufunc = op.ufunc
    if not (xp_is_device and sync_after):
        return ufunc

    def reduce_and_sync(a, b, out):
        ufunc(a, b, out)
        backend.synchronize()
    return reduce_and_sync


def finish(op, buf, n):
    """avg: divide the reduced sum by the rank count in place (floor division for integers)."""
    if op.name == AVG and n > 1 and buf.size:
        if buf.dtype.kind in "iu":
            np.floor_divide(buf, n, out=buf)
        else:
            np.divide(buf, n, out=buf)
    return buf


# ---- dtypes ------------------------------------------------------------------------------

_SIXTEEN_BIT_FLOATS = ("float16", "bfloat16")


ACCEPTED = set()      # dtypes check_dtype has accepted (a set lookup is the fast path's whole check)


def check_dtype(dtype):
    """Refuse dtypes a reduction cannot handle, with one clear line."""
    if dtype in ACCEPTED:
        return dtype
    if dtype.kind in "iuf" or dtype.name == "bfloat16":
        ACCEPTED.add(dtype)
        return dtype
    raise TypeError(f"collectives support real numeric dtypes (float16, bfloat16, float32, float64, ints); "
                    f"got {dtype}" + (" (max and min have no order on complex numbers; pass the real and "
                                      "imaginary parts as a float array, x.view(x.real.dtype))"
                                      if dtype.kind == "c" else ""))


def dtype_code(dtype):
    """A small integer naming the dtype in debug signatures (its str() is recovered by dtype_name)."""
    return _DTYPE_CODES.setdefault(dtype.name, len(_DTYPE_CODES))


def dtype_name(code):
    for name, c in _DTYPE_CODES.items():
        if c == code:
            return name
    return f"dtype#{code}"


_DTYPE_CODES = {name: i for i, name in enumerate(
    ("float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
     "uint8", "uint16", "uint32", "uint64", "bool", "complex64", "complex128"))}


# ---- the MPI library's own collective (algo="mpi") ------------------------------------------

_USER_OPS = {}


def _user_op(op, dtype):
    """A commutative MPI.Op reducing 16-bit words viewed as `dtype` with op's NumPy ufunc."""
    key = (op.name, dtype.name)
    if key not in _USER_OPS:
        ufunc = op.ufunc

        def fn(inbuf, inoutbuf, datatype):
            a = np.frombuffer(inbuf, dtype)
            b = np.frombuffer(inoutbuf, dtype)
            ufunc(a, b, b)                      # inoutbuf = inbuf op inoutbuf
        _USER_OPS[key] = MPI.Op.Create(fn, commute=True)
    return _USER_OPS[key]


def mpi_buffer(a):
    """[array, MPI datatype] message spec for the library's collectives."""
    if a.dtype.name in _SIXTEEN_BIT_FLOATS:
        return [a, MPI.UINT16_T]
    return [a, MPI._typedict[a.dtype.char]]


def mpi_op(op, dtype):
    """The MPI.Op for `op` on `dtype` (user-defined for float16 and bfloat16)."""
    if dtype.name in _SIXTEEN_BIT_FLOATS:
        return _user_op(op, dtype)
    return op.mpi
