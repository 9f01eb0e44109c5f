"""int8 weight-only decoding of a models/gpt.py GPT, dense or sparse, and its safetensors file.

Every matrix a token is multiplied by becomes per-output-channel int8 (engine/int8.py; vector-wise
quantization of Dettmers et al. 2022, "LLM.int8()", arXiv 2208.07339, section 3.1):

    W (out, in) ~ Q * s[:, None],  Q int8 in [-127, 127],  s_o = max_i |W[o, i]| / 127 (rounded up)
    y = x W^T  ~  (x Q^T) * s

    Linear (c_attn, c_proj, c_fc, mlp.c_proj)  -> Int8Linear                 W as stored, (out, in)
    transformer.wte (embedding and output layer) -> Int8Embedding             (V, C): one scale per token
    SparseFFN (Jaszczur et al. 2021)              -> Int8SparseFFN: controller C1 (r, d), C2 (d_ff, r) and
                                                     the unit rows of W1, W2 (d_ff, d), one scale per unit
    SparseQKV                                     -> Int8SparseQKV: E^T (M, d) and each convolution kernel
                                                     as (M, taps M), one scale per output module channel

A sparse FFN decoding one token reads d_ff/N rows of W1 and of W2, so it gathers those rows' codes
and scales: h = relu((Q1[rows] x) * s1[rows]), y = (h * s2[rows]) Q2[rows] + b2 (W2's row scale
moves onto h).  Float stay: LayerNorm, biases, the position embedding (one row per token) and the
sparse QKV's gate D (an elementwise product, S d weights).  Weights read per token: 1 byte each
plus 4 per row, against 4 each in float32.

File (``save_int8``): safetensors; each float parameter under its usual name, each int8 matrix as
``<name>.int8`` (the (out, in) codes above; for E and the kernels, of their transposes) and
``<name>.scale`` (float32, one per row); the metadata holds the checkpoint's manifest (as
consolidate.py's file does) with a ``quantization`` entry.  ``load_int8`` builds the same modules
from it, so a model quantized at load and one read from its file are bitwise the same.
Decoding only: the int8 modules refuse to record a graph (engine/int8.py ``inference_only``).
"""
import json

from engine.autograd import Tensor
from engine.backend import get_array_module, to_device
from engine.int8 import Int8Embedding, Int8Linear, Int8Weight, inference_only
from engine.io import save_safetensors
from engine.nn import Linear, Module, ModuleList, Parameter

from .sparse_ffn import SparseFFN, chosen_units, units_forward
from .sparse_qkv import SparseQKV, advance_conv_state, conv_qkv

FORMAT = "mpi-transformer-engine/int8"
SCHEME = {"bits": 8, "scheme": "symmetric int8, one float32 scale per output channel (row)",
          "suffixes": [".int8", ".scale"]}
KEEP = ("config", "tokenizer", "step", "data", "metrics", "good", "best_loss")   # manifest entries kept
ROWS = 256                  # rows of a sparse FFN's input gathered at once (bounds the (rows, nb, d) copy)


def _float(p):
    return None if p is None else Parameter(p.data, decay=False)


class Int8SparseFFN(Module):
    """models/sparse_ffn.py's layer in evaluation (hard argmax mask), every row gathering its units.
    Parameters keep SparseFFN's names: w1, w2, c1, c2 int8; b2, cb float."""

    def __init__(self, ffn, q):
        self.N = ffn.N
        self.w1, self.w2 = q("w1", ffn.w1.data), q("w2", ffn.w2.data)    # (d_ff, d): one row per unit
        self.c1, self.c2 = q("c1", ffn.c1.data), q("c2", ffn.c2.data)    # (r, d), (d_ff, r)
        self.b2, self.cb = _float(ffn.b2), _float(ffn.cb)

    def int8_weights(self):
        return {"w1": self.w1, "w2": self.w2, "c1": self.c1, "c2": self.c2}

    def dequantized(self):
        return {k: w.dequantize() for k, w in self.int8_weights().items()}

    def forward(self, x):
        inference_only(x, "Int8SparseFFN")
        x2 = x.data.reshape(-1, x.shape[-1])                            # (n, d)
        y = get_array_module(x2).empty_like(x2)                          # (n, d)
        for r in range(0, x2.shape[0], ROWS):
            xr = x2[r:r + ROWS]
            logits = self.c2.matmul_t(self.c1.matmul_t(xr))             # (rows, d_ff): the controller
            if self.cb is not None:
                logits += self.cb.data
            units = chosen_units(logits, self.N)                        # (rows, nb)
            (q1, s1), (q2, s2) = self.w1.rows(units, x2.dtype), self.w2.rows(units, x2.dtype)   # (rows, nb, d), (rows, nb)
            y[r:r + ROWS] = units_forward(xr, q1, q2, None if self.b2 is None else self.b2.data, s1, s2)
        return Tensor(y.reshape(x.shape))


class Int8SparseQKV(Module):
    """models/sparse_qkv.py's layer with int8 E and convolution kernels (the gate D stays float):
    z = (x * D) E + b, then conv_qkv with int8 products; the KV cache's conv_state as SparseQKV's."""

    def __init__(self, qkv, q):
        self.S, self.M, self.bias = qkv.S, qkv.M, qkv.bias
        self.D, self.b = _float(qkv.D), _float(qkv.b)                   # D (S, d)
        self.E = q("E", qkv.E.data.T)                                   # E^T (M, d)
        self.shapes = {k: getattr(qkv, k).shape for k in ("wq", "wk", "wv")}
        for k, shape in self.shapes.items():                            # (3, ks, M, M) -> (M, 3 ks M)
            setattr(self, k, q(k, getattr(qkv, k).data.reshape(-1, self.M).T))
        for k in ("bq", "bk", "bv"):
            setattr(self, k, _float(getattr(qkv, k)))

    def int8_weights(self):
        return {"E": self.E, "wq": self.wq, "wk": self.wk, "wv": self.wv}

    def dequantized(self):
        out = {"E": self.E.dequantize().T}
        for k, shape in self.shapes.items():
            out[k] = getattr(self, k).dequantize().T.reshape(shape)     # (taps M, M) -> (3, ks, M, M)
        return out

    def forward(self, x, kv_cache=None):
        inference_only(x, "Int8SparseQKV")
        d, S, M = x.shape[-1], self.S, self.M
        xs = x.data.reshape(-1, 1, d) * self.D.data                     # (n, S, d) gated copies
        z = self.E.matmul_t(xs.reshape(-1, d)).reshape(*x.shape[:-1], S, M)   # (n S, d) -> (B, T, S, M)
        if self.b is not None:
            z += self.b.data.reshape(S, M)
        context = None if kv_cache is None else advance_conv_state(kv_cache, z)
        biases = tuple(None if b is None else b.data for b in (self.bq, self.bk, self.bv))
        out, _, _ = conv_qkv(z, [self.wq.matmul_t, self.wk.matmul_t, self.wv.matmul_t], biases, context)
        return Tensor(out)                                              # (B, T, 3d)


INT8 = (Int8Linear, Int8Embedding, Int8SparseFFN, Int8SparseQKV)


def _convert(name, m, q):
    """The int8 module for model module m at ``name``, or None to keep it."""
    if isinstance(m, Linear):
        return Int8Linear(q("weight", m.weight.data), None if m.bias is None else m.bias.data)
    if name == "transformer.wte":                                       # wpe (one row per token) stays float
        return Int8Embedding(q("weight", m.weight.data), m.weight.dtype)
    if isinstance(m, SparseFFN):
        return Int8SparseFFN(m, q)
    if isinstance(m, SparseQKV):
        return Int8SparseQKV(m, q)
    return None


def quantize_gpt(model, stored=None):
    """Replace, in place, every matrix of a GPT a token is multiplied by with its int8 form and
    return the model, in evaluation mode. ``stored``: tensors of a file written by ``save_int8``
    whose codes and scales to use instead of quantizing (their shapes checked)."""
    used = set()

    def weights(prefix):
        def q(local, w):
            key = f"{prefix}.{local}"
            if stored is None:
                return Int8Weight.quantize(w)
            if key + ".int8" not in stored or key + ".scale" not in stored:
                raise ValueError(f"int8 file: no {key}.int8 / {key}.scale")
            used.update((key + ".int8", key + ".scale"))
            codes, scales = stored[key + ".int8"], stored[key + ".scale"]
            if tuple(codes.shape) != tuple(w.shape):
                raise ValueError(f"int8 file: {key}.int8 has shape {tuple(codes.shape)}, the model needs {tuple(w.shape)}")
            return Int8Weight(to_device(codes), to_device(scales))
        return q

    modules = dict(model.named_modules())
    for name, m in list(modules.items()):
        new = None if not name or isinstance(m, INT8) else _convert(name, m, weights(name))
        if new is not None:
            parent, _, attr = name.rpartition(".")
            if isinstance(modules[parent], ModuleList):                 # never: blocks hold the layers
                raise TypeError(f"quantize_gpt: cannot replace {name}, an item of a ModuleList")
            setattr(modules[parent], attr, new)
    extra = sorted(k for k in (stored or {}) if k.endswith(tuple(SCHEME["suffixes"])) and k not in used)
    if extra:
        raise ValueError(f"int8 file: {extra[0]} matches no weight of this model")
    return model.eval()


def int8_tensors(model):
    """{name: array} of an int8 GPT: its float parameters, and each int8 matrix's codes and scales."""
    out = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, INT8):
            for local, w in m.int8_weights().items():
                out[f"{name}.{local}.int8"], out[f"{name}.{local}.scale"] = w.codes, w.scales
    return out


def dequantized_state(model):
    """The float state dict of the GPT an int8 one approximates: each int8 matrix dequantized (Q * s)
    in its parameter's shape, the rest as is (a test's reference: the float model that computes
    what the int8 one computes)."""
    out = dict(model.state_dict())
    for name, m in model.named_modules():
        if isinstance(m, INT8):
            for local, w in m.dequantized().items():
                out[f"{name}.{local}"] = w
    return out


def save_int8(path, model, manifest):
    """Write an int8 GPT to one safetensors file; the metadata keeps ``manifest``'s entries that
    describe the model (KEEP: config, tokenizer, step, ...), not its sharded layout."""
    meta = {k: manifest[k] for k in KEEP if k in manifest}
    meta.update(format=FORMAT, quantization=SCHEME)
    save_safetensors(path, int8_tensors(model), metadata={"format": FORMAT, "manifest": json.dumps(meta)})


def load_int8(model, tensors):
    """A freshly built GPT of the file's config -> the int8 model the file holds (in place)."""
    quantize_gpt(model, stored=tensors)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.endswith(tuple(SCHEME["suffixes"]))})
    return model


def is_int8(manifest):
    """Whether a checkpoint's manifest is that of a file written by ``save_int8``."""
    return isinstance(manifest, dict) and "quantization" in manifest
