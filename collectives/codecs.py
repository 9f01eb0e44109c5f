"""Codecs: how a float array travels when a collective compresses it (collectives/compressed.py).

A codec turns n float elements into a 1-D uint8 buffer of ``wire_bytes(n)`` bytes and back.
Every rank that decodes the same bytes gets the same bits (elementwise arithmetic only), which
is what keeps ZeRO replicas identical when they compute with decoded weights.

    int8, int4   symmetric blockwise codes, one float32 scale per ``block`` elements
                 (engine/quantize.py; ZeRO++'s qwZ / qgZ, Wang et al. 2023, arXiv 2306.10209):
                 wire  n + 4 ceil(n/B)  or  ceil(n/2) + 4 ceil(n/B) bytes;
                 error |x - x~| <= scale_b / 2 = max|block b| / (2 qmax), qmax 127 or 7
    bf16         bfloat16 (Kalamkar et al. 2019, arXiv 1905.12322): the upper 16 bits of the
                 float32, rounded to nearest even:  u16 = (u32 + 0x7FFF + ((u32 >> 16) & 1)) >> 16;
                 wire 2n bytes; error <= 2^-9 |x| (8 significand bits); as ml_dtypes.bfloat16
                 (the tests' oracle) for finite float32; float64 input is rounded to float32 first; NaN
                 stays NaN (the rounding would carry it into the exponent)

An int8 / int4 encoding of an array holding NaN or inf decodes to NaN everywhere (engine/
quantize.py refuses such input; here that would stop one rank while the others wait for it).
Decoding writes into an output of any float dtype; the arithmetic is engine/quantize.py's
(float32, or float64 for a float64 output). Cost: O(n) elementwise work per encode or decode,
a float64 temporary of n elements while quantizing; NumPy or CuPy by the input's module.
"""
import numpy as np

from engine.backend import get_array_module
from engine.quantize import dequantize, from_bytes, quantize, to_bytes, wire_bytes

KINDS = ("int8", "int4", "bf16")


class Codec:
    """One wire format: kind in KINDS, block (int8 / int4 only) the elements per scale."""

    def __init__(self, kind, block=256):
        if kind not in KINDS:
            raise ValueError(f"Codec: kind must be one of {KINDS}, got {kind!r}")
        if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
            raise ValueError(f"Codec: block must be an int >= 1, got {block!r}")
        self.kind, self.block = kind, int(block)
        self.bits = {"int8": 8, "int4": 4}.get(kind)

    def __repr__(self):
        return f"Codec({self.kind!r}" + (f", block={self.block})" if self.bits else ")")

    def wire_bytes(self, n):
        """Bytes on the wire for n elements."""
        return 2 * int(n) if self.bits is None else wire_bytes(int(n), self.bits, self.block)

    def encode(self, x):
        """x (any float array, flattened) -> uint8 (wire_bytes(x.size),)."""
        if self.bits is not None:
            try:
                return to_bytes(quantize(x.reshape(-1), self.bits, self.block))
            except ValueError:                  # NaN or inf (or beyond a float32 scale): NaN, not an error
                return self._all_nan(x)
        u = x.reshape(-1).astype(np.float32).view(np.uint32)          # (n,) float32 bits
        u16 = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        xp = get_array_module(u)
        u16 = xp.where((u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000), np.uint16(0x7FC0), u16)   # NaN stays NaN
        return u16.view(np.uint8)                                        # (2n,)

    def _all_nan(self, x):
        """The bytes of x that decode to NaN everywhere (NaN scales, zero codes): a gradient that
        diverged on one rank reaches every rank as NaN, so all of them see the divergence and
        stop together, where a refusal on one rank would leave the others waiting for its message."""
        xp = get_array_module(x)
        buf = xp.zeros(self.wire_bytes(x.size), dtype=np.uint8)
        nb = -(-x.size // self.block)
        buf[:4 * nb] = xp.full(nb, np.nan, dtype=np.float32).view(np.uint8)
        return buf

    def decode(self, buf, out):
        """The uint8 bytes of ``encode`` -> out (1-D, its dtype; out.size elements), returns out."""
        n = out.size
        if self.bits is not None:
            return dequantize(from_bytes(buf, n, self.bits, self.block, out.dtype), out=out)
        xp = get_array_module(buf)
        u = xp.ascontiguousarray(buf).view(np.uint16).astype(np.uint32) << 16   # (n,) float32 bits
        out[...] = u.view(np.float32)
        return out
