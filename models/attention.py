"""GPT-2's attention (Vaswani et al. 2017; Radford et al. 2019): the packed c_attn output split
into heads, causal softmax attention, the heads merged back, c_proj, and the residual branch's
dropout.

    qkv = c_attn(x)                                           (B, T, 3C), or SparseQKV (Jaszczur et al. 2021)
    y = softmax(q k^T / sqrt(hs) + causal mask) v             per head, (B, nh, T, hs)
    out = dropout(c_proj(y))                                  (B, T, C)

HeadsAttention is the graph node from qkv to y, on engine/ops/attention.py's kernels
(FlashAttention's blockwise forward and backward); CausalSelfAttention is the module that
models/gpt.py's Block holds. ``attention_fn`` swaps the attention proper for ring or Ulysses attention
(parallel/sequence/), and a KV cache sends decoding to models/generate.py's cached_attention.
``residual_dropout`` is the counter-based dropout every residual branch and the embedding use.
"""
from engine import backend, ops
from engine.autograd import Function, Tensor, is_grad_enabled
from engine.nn import Linear, Module
from engine.ops.attention import attention_bwd, attention_fwd
from engine.random import SITES
from engine.threads import for_parts, run_ranges

from .generate import cached_attention
from .sparse_qkv import SparseQKV


def residual_dropout(x, p, noise, layer, site, training):
    """Dropout whose mask is the counter-based draw at (layer, site) for x's global rows and
    tokens (engine/random.py), so every layout and every recomputation masks alike."""
    if p == 0 or not training:
        return x
    u = noise.uniform(layer, SITES[site], x.shape, dtype=x.dtype, like=x.data)   # (B, T, C)
    return ops.dropout(x, p, u=u)


class HeadsAttention(Function):
    """Causal attention from the packed c_attn output to the c_proj input, one graph node:

        qkv (B, T, 3C) -> q, k, v (B, nh, T, hs) -> softmax(q k^T / sqrt(hs) + mask) v -> y (B, T, C)

    The head views of q, k and v are strided views of qkv (no copy); the kernels are
    engine.ops.attention's (attention_fwd / attention_bwd). Forward copies once (the heads
    merged back, (B, T, nh, hs)), and backward writes dq, dk, dv straight into one (B, T, 3C)
    gradient: the split, the four transposes and the two reshapes as separate ops would cost
    three zero-filled gradients, their sums and two more copies. The sequences are cut over
    the elementwise threads (engine/threads.py ``for_parts``) when the BLAS runs on one thread
    (OPENBLAS_NUM_THREADS=1 ENGINE_THREADS=k): each (batch, head) is its own softmax and its
    own small GEMMs, so one process uses k cores in attention; beside a BLAS with threads of
    its own they run inline (for_parts says why); bitwise the same either way.

    ``keep_probs=False`` is selective recomputation (Korthikanti et al. 2022, "Reducing
    Activation Recomputation in Large Transformer Models", section 4.2): the probabilities
    P (B, nh, T, T), the one activation that grows with T^2 and costs the least to recompute
    (2 B nh T^2 hs FLOPs of q k^T against the block's 24 B T C^2), are not kept; backward
    recomputes them blockwise from q, k, v and the saved log-sum-exp (FlashAttention's
    backward), so the memory per layer is that of q, k, v, O and the LSE only."""

    def forward(self, qkv, n_head=1, keep_probs=True):
        xp = backend.get_array_module(qkv)
        B, T, C3 = qkv.shape
        nh, hs = self.nh, self.hs = n_head, C3 // 3 // n_head
        heads = qkv.reshape(B, T, 3, nh, hs)                    # (B, T, 3, nh, hs) view
        keep = keep_probs and is_grad_enabled() and any(self.needs_input_grad)   # False: recomputed in backward
        out = xp.empty((B, T, nh, hs), dtype=qkv.dtype)
        self.parts = []

        def part(a, b):                                         # sequences [a, b): independent of the others
            q, k, v = (heads[a:b, :, i].transpose(0, 2, 1, 3) for i in range(3))   # (b - a, nh, T, hs) views
            y, _, state = attention_fwd(q, k, v, causal=True, keep_probs=keep)
            out[a:b] = y.transpose(0, 2, 1, 3)                  # (b - a, nh, T, hs) -> (b - a, T, nh, hs)
            state.o = out[a:b].transpose(0, 2, 1, 3)            # O as a view of it: one copy kept
            self.parts.append((a, b, state))
        for_parts(B, part, xp)                                  # the sequences over the threads
        return out.reshape(B, T, C3 // 3)                       # (B, T, C)

    def backward(self, g):
        xp = backend.get_array_module(g)
        B, T, C = g.shape
        dy = g.reshape(B, T, self.nh, self.hs)                  # (B, T, nh, hs) view
        dqkv = xp.empty((B, T, 3, self.nh, self.hs), dtype=g.dtype)
        states = {(a, b): state for a, b, state in self.parts}

        def part(a, b):
            grads = attention_bwd(states[a, b], dy[a:b].transpose(0, 2, 1, 3))   # dq, dk, dv (b - a, nh, T, hs)
            for i, d in enumerate(grads):
                dqkv[a:b, :, i] = d.transpose(0, 2, 1, 3)      # (b - a, T, nh, hs) slot of (B, T, 3, nh, hs)
        run_ranges(part, list(states))                          # the forward's parts
        return (dqkv.reshape(B, T, 3 * C),)                     # (B, T, 3C)


class CausalSelfAttention(Module):
    """Multi-head causal self-attention. ``attention_fn(q, k, v) -> (B, nh, T, hs)`` replaces
    the attention proper (ring attention does); None uses engine.ops.attention, fused with the
    head split and merge (HeadsAttention)."""

    def __init__(self, config, rng, noise=None, layer=0, attention_fn=None):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_size, self.dropout = config.n_head, C // config.n_head, config.dropout
        if config.qkv_modules:                                 # Jaszczur et al. 2021: sparse QKV
            self.sparse_qkv = SparseQKV(C, config.qkv_modules, bias=config.bias, rng=rng)
        else:
            self.c_attn = Linear(C, 3 * C, bias=config.bias, rng=rng)   # q, k, v in one matmul
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.attention_fn = attention_fn
        self.noise, self.layer = noise, layer
        self.keep_probs = True                                 # False: selective recomputation

    def forward(self, x, kv_cache=None):
        B, T, _ = x.shape
        nh, hs = self.n_head, self.head_size                  # nh: this rank's heads under tensor parallelism
        if hasattr(self, "sparse_qkv"):
            if self.attention_fn is not None:
                raise ValueError("sparse QKV convolves over positions: sequence parallelism is not supported")
            qkv = self.sparse_qkv(x, kv_cache)                 # (B, T, 3C)
        else:
            qkv = self.c_attn(x)                               # (B, T, 3C)
        if kv_cache is not None:                               # decoding, under no_grad: plain arrays
            y = Tensor(cached_attention(qkv.data, kv_cache, nh))   # (B, T, C)
        elif self.attention_fn is None:
            y = HeadsAttention.apply(qkv, n_head=nh, keep_probs=self.keep_probs)   # (B, T, C)
        else:
            qkv = ops.reshape(qkv, (B, T, 3, nh, hs))          # (B, T, 3, nh, hs) view
            q, k, v = (ops.transpose(ops.reshape(t, (B, T, nh, hs)), (0, 2, 1, 3))   # (B, nh, T, hs)
                       for t in ops.split(qkv, 3, axis=2))     # each (B, T, 1, nh, hs)
            y = self.attention_fn(q, k, v)                     # (B, nh, T, hs)
            y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (B, T, nh * hs))   # (B, T, nh, hs) -> (B, T, nh hs)
        return residual_dropout(self.c_proj(y), self.dropout, self.noise, self.layer, "attn", self.training)
