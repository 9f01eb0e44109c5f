"""Symmetric blockwise int8 / int4 quantization, for sending fewer bytes through a collective.

As ZeRO++'s blockwise quantized weights and gradients (Wang et al. 2023, arXiv 2306.10209)
and the 8-bit optimizers' block-wise quantization (Dettmers et al. 2022, arXiv 2110.02861):
the flattened array is cut into blocks of ``block`` elements (the last one may be short),
and each block b gets one float32 scale, so one outlier costs precision in its block only.

    qmax     = 127 (int8) or 7 (int4; symmetric, the code -8 is never used)
    scale_b  = the smallest float32 >= max_{i in b} |x_i| / qmax      (0 for an all-zero block)
    q_i      = round_half_even(x_i / scale_b), clipped to [-qmax, qmax]  (0 where scale_b = 0)
    x~_i     = q_i * scale_b                                            (dequantize)

Error bound.  Rounding the scale *up* makes |x_i| / scale_b <= qmax, so the clip never
acts; then x_i / scale_b lies within half a step of the integer q_i, and multiplying by
scale_b gives  |x_i - q_i * scale_b| <= scale_b / 2,  exactly, with scale_b the stored float32
(within one float32 ulp of max|block| / qmax, so the block's max may come back 1 ulp larger).
Dequantizing in float64 is exact (q has <= 8 bits, the scale 24); in float32 it adds one
rounding (relative 2^-24), in float16/bfloat16 that of the output dtype.  Rounding up also
keeps tiny blocks (subnormal scales) bounded, where nearest rounding of a subnormal scale
could put |x| / scale far above qmax and the clip would then cost far more than half a step.

What is true of the code.  x / scale is computed in float64; for float32, float16 and
bfloat16 inputs that quotient lies at least 2^-25 from any half-integer unless it is one,
so q is the round-half-even of the *exact* quotient (the tests check it with Fractions).
For float64 inputs q is that of the float64-rounded quotient.  Codes: int8 as an int8
array of n; int4 as uint8 bytes of two 4-bit two's-complement codes, low nibble first
(element 2j in bits 0-3 of byte j, 2j+1 in bits 4-7; an odd n pads one zero nibble).
Deterministic (elementwise ops and max only), vectorised over whole blocks, NumPy or CuPy
by the input's array module.  NaN or inf is refused (one blocking check on the GPU).

Cost: O(n) time, a float64 temporary of n elements while quantizing.  On the wire
(``wire_bytes``): n + 4 ceil(n/block) bytes for int8, ceil(n/2) + 4 ceil(n/block) for
int4 — at block 256, 1.016 and 0.516 bytes per element against 4 for float32.
``to_bytes`` lays one buffer out as  [ scales (float32, 4 nb bytes) | codes ].
"""
from typing import NamedTuple

import numpy as np

from .backend import get_array_module

QMAX = {8: 127, 4: 7}
_FLOATS = ("float16", "bfloat16", "float32", "float64")


class Quantized(NamedTuple):
    codes: object   # int8 (n,) for bits=8; uint8 (ceil(n/2),) for bits=4
    scales: object  # float32 (ceil(n/block),)
    shape: tuple    # the original shape; n = prod(shape)
    dtype: object   # the original dtype (dequantize's default)
    bits: int
    block: int

    @property
    def n(self):
        return int(np.prod(self.shape, dtype=np.int64))


def _check_args(bits, block, where):
    if isinstance(bits, bool) or bits not in QMAX:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"{where}: block must be an int >= 1, got {block!r}")


def _n_blocks(n, block):
    return -(-n // block)


def wire_bytes(n, bits=8, block=256):
    """Exact bytes of codes + scales for n elements (the size of ``to_bytes``'s buffer)."""
    _check_args(bits, block, "wire_bytes")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"wire_bytes: n must be an int >= 0, got {n!r}")
    code_bytes = n if bits == 8 else -(-n // 2)
    return int(code_bytes + 4 * _n_blocks(n, block))


def quantize(x, bits=8, block=256):
    """Quantize a float array (any shape) blockwise over its flattened (C-order) elements."""
    _check_args(bits, block, "quantize")
    xp = get_array_module(x)
    if not hasattr(x, "dtype") or x.dtype.name not in _FLOATS:
        got = getattr(x, "dtype", type(x).__name__)
        raise ValueError(f"quantize: x must be a float16, bfloat16, float32 or float64 array, got {got}")
    qmax, n, nb = QMAX[bits], int(x.size), _n_blocks(int(x.size), block)
    flat = x.reshape(-1).astype(np.float64)                       # (n,)
    bad = ~xp.isfinite(flat)
    n_bad = int(bad.sum())
    if n_bad:
        n_nan, first = int(xp.isnan(flat).sum()), int(xp.argmax(bad))
        raise ValueError(f"quantize: x has {n_bad} non-finite values ({n_nan} NaN, "
                         f"{n_bad - n_nan} inf), first at flat index {first}")
    padded = xp.zeros(nb * block, dtype=np.float64)
    padded[:n] = flat
    blocks = padded.reshape(nb, block)                            # (nb, block); zero pad
    amax = xp.abs(blocks).max(axis=1) if nb else xp.zeros(0)      # (nb,) float64
    if nb and bool((amax > float(np.finfo(np.float32).max) * qmax).any()):
        raise ValueError(f"quantize: |x| up to {float(amax.max()):.3g} overflows a float32 scale")
    scales = (amax / qmax).astype(np.float32)                     # nearest or next float32
    low = scales.astype(np.float64) * qmax < amax                 # exact: 24 bits * 7 bits
    scales = xp.where(low, xp.nextafter(scales, np.float32(np.inf)), scales)  # round up
    s = scales.astype(np.float64)[:, None]                        # (nb, 1)
    q = xp.rint(blocks / xp.where(s > 0, s, 1.0))                 # half to even; 0 if s = 0
    q = xp.clip(q, -qmax, qmax).astype(np.int8).reshape(-1)[:n]   # (n,) int8
    codes = q if bits == 8 else pack_int4(q)
    return Quantized(codes, scales, tuple(x.shape), x.dtype, bits, int(block))


def pack_int4(q):
    """int8 codes in [-8, 7], (n,) -> uint8 (ceil(n/2),): low nibble element 2j, high 2j+1."""
    xp = get_array_module(q)
    u = (q.astype(np.int16) & 0xF).astype(np.uint8)               # 4-bit two's complement
    if u.size % 2:
        u = xp.concatenate([u, xp.zeros(1, dtype=np.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_int4(packed, n):
    """uint8 (ceil(n/2),) -> int8 codes (n,), the inverse of ``pack_int4``."""
    xp = get_array_module(packed)
    nib = xp.stack([packed & 0xF, packed >> 4], axis=1).reshape(-1)[:n]   # (n,) in 0..15
    return ((nib.astype(np.int16) ^ 8) - 8).astype(np.int8)               # sign-extend


def codes_int8(qt):
    """The codes of ``qt`` as int8 (n,), whatever the packing."""
    return qt.codes if qt.bits == 8 else unpack_int4(qt.codes, qt.n)


def dequantize(qt, dtype=None, out=None):
    """q * scale, in ``dtype`` (default: out's dtype, else the original), shaped as the original
    (or written into ``out``, any shape with n elements)."""
    if out is not None:
        if dtype is not None and np.dtype(dtype) != out.dtype:
            raise ValueError(f"dequantize: dtype {np.dtype(dtype)} differs from out's dtype {out.dtype}")
        dtype = out.dtype
    dtype = np.dtype(qt.dtype if dtype is None else dtype)
    if dtype.name not in _FLOATS:
        raise ValueError(f"dequantize: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
    n, nb = qt.n, int(qt.scales.size)
    if out is not None and out.size != n:
        raise ValueError(f"dequantize: out has {out.size} elements, the quantized array {n}")
    if nb != _n_blocks(n, qt.block):
        raise ValueError(f"dequantize: {nb} scales for {n} elements in blocks of {qt.block}")
    xp = get_array_module(qt.codes, qt.scales)
    work = np.float64 if dtype == np.float64 else np.float32
    q = xp.zeros(nb * qt.block, dtype=work)
    q[:n] = codes_int8(qt)
    x = (q.reshape(nb, qt.block) * qt.scales.astype(work)[:, None]).reshape(-1)[:n]   # (n,)
    x = x.astype(dtype)
    if out is None:
        return x.reshape(qt.shape)
    out[...] = x.reshape(out.shape)
    return out


def to_bytes(qt):
    """One contiguous uint8 buffer [scales | codes] of ``wire_bytes(n, bits, block)`` bytes."""
    xp = get_array_module(qt.codes, qt.scales)
    parts = [xp.ascontiguousarray(qt.scales, dtype=np.float32).view(np.uint8),
             xp.ascontiguousarray(qt.codes).view(np.uint8)]
    return xp.concatenate(parts)


def from_bytes(buf, shape, bits=8, block=256, dtype=np.float32):
    """The ``Quantized`` that ``to_bytes`` flattened; shape, bits, block and dtype travel apart
    (a collective knows them). Codes are a view of buf; scales a copy (aligned for the GPU)."""
    _check_args(bits, block, "from_bytes")
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    if getattr(buf, "dtype", None) != np.uint8 or buf.ndim != 1:
        raise ValueError(f"from_bytes: buf must be a 1-D uint8 array, got {getattr(buf, 'dtype', type(buf))}")
    if buf.size != wire_bytes(n, bits, block):
        raise ValueError(f"from_bytes: buf has {buf.size} bytes, {n} elements at bits={bits}, "
                         f"block={block} need {wire_bytes(n, bits, block)}")
    k = 4 * _n_blocks(n, block)
    scales = buf[:k].copy().view(np.float32)
    codes = buf[k:].view(np.int8) if bits == 8 else buf[k:]
    return Quantized(codes, scales, shape, np.dtype(dtype), bits, int(block))
