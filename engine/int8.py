"""Weight-only int8 for decoding: one float scale per output channel (row) of each weight matrix.

Vector-wise quantization (Dettmers et al. 2022, "LLM.int8()", arXiv 2208.07339, section 3.1;
Jacob et al. 2018 for the symmetric scheme): a weight W (out, in), as PyTorch's Linear stores it,
keeps int8 codes Q and one float32 scale per row, the rows being y's channels:

    s_o = the smallest float32 >= max_i |W[o, i]| / 127,   Q[o, i] = round(W[o, i] / s_o)  in [-127, 127]
    y   = x W^T  ~  (x Q^T) * s          the scale leaves the sum: one multiply per output, not per weight

The codes and scales are engine/quantize.py's blockwise int8 with one block per row (block = in),
so its tested bound holds per weight: |W[o, i] - Q[o, i] s_o| <= s_o / 2.  Activations stay float
(weight-only: x, LayerNorm, attention and the KV cache are unchanged).

Why, and the kernel.  Decoding one token is a chain of matrix-vector products that read every
weight once, so it is bound by the bytes of weights read: int8 reads in + 4 bytes per row where
float32 reads 4 in.  BLAS has no int8 GEMV, so ``matmul_t`` walks Q in blocks of rows that fit in the
cache (``BLOCK`` elements, ``R = BLOCK // in`` rows): each block is cast int8 -> float into one
reused buffer and multiplied there by one BLAS call, so DRAM sees 1 byte per weight and the
float copy lives only in cache.  Cost per product: in*out bytes from memory, one cast pass and
one GEMV over cache-resident data, ``ceil(out / R)`` pairs of NumPy calls, and out multiplies by
the scales.  So in NumPy the cast pass, which runs at the speed of an elementwise loop and not of
memory, is what remains of the product's time: bench/int8_decode.py measures what that leaves.  On the GPU (CuPy) one cast of the whole matrix and one GEMM is used instead.
Memory: the codes (1 byte per weight) and the scales (4 bytes per row), plus one buffer of
BLOCK floats per thread.  Decoding only: the int8 modules refuse to record a graph.
"""
import threading

import numpy as np

from .autograd import Tensor, is_grad_enabled
from .backend import get_array_module
from .nn import Embedding, Module, Parameter
from .quantize import Quantized, dequantize, quantize

BLOCK = 1 << 17            # float elements per cast block: 512 KiB in float32, an L2's worth
_scratch = threading.local()


def _buffer(n, dtype):
    """A reused float buffer of >= n elements for this thread (one per dtype)."""
    bufs = _scratch.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.size < n:
        buf = bufs[dtype] = np.empty(max(n, BLOCK), dtype=dtype)
    return buf


class Int8Weight:
    """A 2-D weight (out, in) as int8 codes (out, in), C-contiguous, and float32 scales (out,)."""

    def __init__(self, codes, scales):
        xp = get_array_module(codes, scales)
        if getattr(codes, "dtype", None) != np.int8 or codes.ndim != 2:
            raise ValueError(f"Int8Weight: codes must be a 2-D int8 array, got {getattr(codes, 'dtype', type(codes))} "
                             f"of shape {getattr(codes, 'shape', None)}")
        if getattr(scales, "dtype", None) != np.float32 or scales.shape != (codes.shape[0],):
            raise ValueError(f"Int8Weight: scales must be float32 of shape ({codes.shape[0]},), got "
                             f"{getattr(scales, 'dtype', type(scales))} of shape {getattr(scales, 'shape', None)}")
        self.codes, self.scales = xp.ascontiguousarray(codes), xp.ascontiguousarray(scales)

    @classmethod
    def quantize(cls, w):
        """Per-row int8 of a float matrix w (out, in): engine/quantize.py with one block per row."""
        if w.ndim != 2 or w.shape[1] == 0:
            raise ValueError(f"Int8Weight.quantize: w must be 2-D with in > 0, got shape {w.shape}")
        qt = quantize(w, bits=8, block=w.shape[1])
        return cls(qt.codes.reshape(w.shape), qt.scales)      # (out*in,) -> (out, in)

    @property
    def shape(self):
        return self.codes.shape

    @property
    def nbytes(self):
        """Bytes a product reads: the codes and the scales."""
        return int(self.codes.nbytes + self.scales.nbytes)

    def dequantize(self, dtype=np.float32):
        """Q * s as a float (out, in) array (engine/quantize.py's dequantize)."""
        out, n_in = self.shape
        qt = Quantized(self.codes.reshape(-1), self.scales, (out, n_in), np.dtype(dtype), 8, n_in)
        return dequantize(qt, dtype)

    def rows(self, idx, dtype=np.float32):
        """(codes of rows idx as floats (..., in), their scales (...)): for layers that gather rows."""
        return self.codes[idx].astype(dtype), self.scales[idx]

    def matmul_t(self, x):
        """x (..., in) float -> x W^T (..., out) in x's dtype, reading the int8 codes block by block."""
        out, n_in = self.shape
        if x.shape[-1] != n_in:
            raise ValueError(f"Int8Weight.matmul_t: x has {x.shape[-1]} features, the weight {n_in}")
        xp = get_array_module(x)
        x2 = x.reshape(-1, n_in)                                        # (n, in)
        if xp is not np:
            y = x2 @ self.codes.T.astype(x.dtype)                       # (n, out): one cast on the device
        elif x2.shape[0] == 1:
            y = np.empty((1, out), dtype=x.dtype)
            self._blocks(x2[0], y[0])
        else:
            yt = np.empty((out, x2.shape[0]), dtype=x.dtype)            # (out, n): row blocks are contiguous
            self._blocks(x2.T, yt)                                      # x2.T (in, n), F-order: BLAS transposes
            y = yt.T
        y *= self.scales.astype(x.dtype, copy=False)
        return y.reshape(*x.shape[:-1], out)                             # (..., out)

    def _blocks(self, xt, yt):
        """yt[r:e] = float(Q[r:e]) @ xt for row blocks of R rows: xt (in,) or (in, n), yt (out,) or (out, n)."""
        out, n_in = self.shape
        R = max(1, BLOCK // n_in)
        buf = _buffer(R * n_in, xt.dtype)
        for r in range(0, out, R):
            e = min(out, r + R)
            b = buf[:(e - r) * n_in].reshape(e - r, n_in)               # (rows, in) in cache
            np.copyto(b, self.codes[r:e], casting="unsafe")             # int8 -> float
            np.matmul(b, xt, out=yt[r:e])


def inference_only(x, where):
    """Refuse a call that would record a graph: int8 layers have no gradients."""
    if is_grad_enabled() and getattr(x, "requires_grad", False):
        raise RuntimeError(f"{where}: int8 weights are for inference; call it under engine.autograd.no_grad()")


def _data(x):
    return x.data if isinstance(x, Tensor) else x


class Int8Linear(Module):
    """Drop-in for engine.nn.Linear in evaluation: y = (x Q^T) * s + b. The bias stays a float
    Parameter (registered under the same name as the Linear's)."""

    def __init__(self, weight, bias=None):
        self.weight = weight                                            # Int8Weight (not a Parameter)
        self.bias = None if bias is None else Parameter(bias, decay=False)

    @classmethod
    def from_linear(cls, linear, weight=None):
        """From an engine.nn.Linear; ``weight``: its Int8Weight if already made (e.g. read from a file)."""
        w = Int8Weight.quantize(linear.weight.data) if weight is None else weight
        return cls(w, None if linear.bias is None else linear.bias.data)

    def int8_weights(self):
        return {"weight": self.weight}

    def dequantized(self):
        return {"weight": self.weight.dequantize()}

    def forward(self, x):
        inference_only(x, "Int8Linear")
        y = self.weight.matmul_t(_data(x))                              # (..., out)
        if self.bias is not None:
            y += self.bias.data
        return Tensor(y)


class Int8Embedding(Embedding):
    """A (tied) embedding table (V, C) as per-row int8: its rows are looked up and dequantized, and
    as the output layer each row's scale is that logit's: logits = (x Q^T) * s. full_logits and
    cross_entropy are engine.nn.Embedding's."""

    def __init__(self, weight, dtype=np.float32):
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight, self.dtype = weight, np.dtype(dtype)               # Int8Weight; the rows' float dtype

    @classmethod
    def from_embedding(cls, emb, weight=None):
        return cls(Int8Weight.quantize(emb.weight.data) if weight is None else weight, emb.weight.dtype)

    def int8_weights(self):
        return {"weight": self.weight}

    def dequantized(self):
        return {"weight": self.weight.dequantize()}

    def forward(self, idx):
        idx = get_array_module(self.weight.codes).asarray(_data(idx))
        q, s = self.weight.rows(idx, self.dtype)                        # (B, T, C), (B, T)
        q *= s[..., None]
        return Tensor(q)

    def logits(self, x):
        inference_only(x, "Int8Embedding.logits")
        return Tensor(self.weight.matmul_t(_data(x)))                   # (..., V)
