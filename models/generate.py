"""Autoregressive decoding for models/gpt.py: a KV cache, temperature and top-k sampling.

Without a cache, every new token reruns the whole context: O(T^2) work per token. With
one, the prompt runs once (prefill) and each layer keeps its keys and values; a new token
then computes only its own q, k, v and attends to the cached keys (decode), O(T) per token.

    prefill:  idx (B, T0)  -> every layer caches k, v (B, nh, T0, hs)  -> logits of token T0
    decode:   idx (B, 1)   at position t -> cache grows to t + 1       -> logits of token t + 1

A decoded token's query is the newest position, so it sees every cached key: its attention is
a plain softmax (one_query_attention), not the blockwise causal kernel the prefill uses.

Positions are learned and absolute, so when the context outgrows block_size the window
slides (nanoGPT crops to the last block_size tokens), every token's position changes and
the cache is recomputed from the cropped window: exactly what decoding without a cache
computes, which the tests check token for token.

Sparse models (Jaszczur et al. 2021) decode the same way: the sparse QKV layer's causal
convolution over length also keeps the last two positions' pre-convolution activations in
the cache (``KVCache.conv_state``), and the sparse FFN, evaluated on fewer rows than its
block size, reads only the chosen rows of W1 and W2 (models/sparse_ffn.py), never the dense FFN.
"""
import math

import numpy as np

from engine import backend
from engine.autograd import Tensor, no_grad
from engine.ops.attention import attention_forward


class KVCache:
    """Keys and values of the tokens decoded so far, for one attention layer: preallocated
    (B, nh, block_size, hs) buffers filled left to right."""

    def __init__(self, capacity):
        self.capacity, self.length, self.k, self.v = capacity, 0, None, None
        self.conv_state = None      # sparse QKV: z of the last 2 positions, (B, 2, S, M) (models/sparse_qkv.py)
        self.buckets = None         # LSH attention: bucket ids of the cached keys, (R, B, nh, t) (models/terraformer.py)

    def append(self, k, v):
        """Store k, v (B, nh, T, hs); return every cached key and value and the position of k's first row."""
        B, nh, T, hs = k.shape
        start = self.length
        if start + T > self.capacity:
            raise ValueError(f"KV cache overflow: {start} + {T} tokens > block_size {self.capacity}")
        if self.k is None:
            xp = backend.get_array_module(k)
            self.k = xp.empty((B, nh, self.capacity, hs), dtype=k.dtype)   # (B, nh, block_size, hs)
            self.v = xp.empty((B, nh, self.capacity, hs), dtype=v.dtype)
        self.k[:, :, start:start + T] = k
        self.v[:, :, start:start + T] = v
        self.length = start + T
        return self.k[:, :, :self.length], self.v[:, :, :self.length], start   # (B, nh, start+T, hs)


def cached_attention(qkv, kv_cache, n_head):
    """Decoding's attention on arrays (no graph: generation runs under no_grad): qkv (B, T, 3C)
    of the new tokens; their k, v join the cache and their q attend to every cached key, the
    new ones causally. -> (B, T, C). The split, reshapes and transposes are plain array views,
    not ten autograd ops: at bench.sparse_decode's paper shape, one thread, that took the
    attention outside c_attn and c_proj from 2.55 to 1.6 ms per token."""
    B, T, C3 = qkv.shape
    heads = qkv.reshape(B, T, 3, n_head, C3 // 3 // n_head).transpose(2, 0, 3, 1, 4)   # (3, B, nh, T, hs) view
    k_all, v_all, start = kv_cache.append(heads[1], heads[2])                 # (B, nh, start+T, hs)
    if T == 1:                                                                # one new token sees every key
        y = one_query_attention(heads[0], k_all, v_all)                       # (B, nh, 1, hs)
    else:
        y, _ = attention_forward(heads[0], k_all, v_all, causal=True, q_offset=start)   # (B, nh, T, hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)                    # (B, T, nh hs)


def one_query_attention(q, k, v):
    """softmax(q k^T / sqrt(hs)) v for one query per head, q (B, nh, 1, hs), k, v (B, nh, t, hs):
    the query is the newest position, so no key is masked and the blockwise kernel's causal
    bookkeeping (block plan, mask, one shift per head) is not needed. Each row is shifted by its
    own max (bench/sparse_decode.py's docstring has what this saved)."""
    xp = backend.get_array_module(q)
    s = q @ k.swapaxes(-1, -2)                                                # (B, nh, 1, t)
    s *= 1.0 / math.sqrt(q.shape[-1])
    s -= s.max(axis=-1, keepdims=True)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s @ v                                                              # (B, nh, 1, hs)


def next_logits(model, idx, caches=None):
    """Logits of the last position, (B, V) float64 on the host. With caches, idx holds only
    the tokens not cached yet, at the positions after the cached ones."""
    start = caches[0].length if caches else 0
    pos = backend.xp().arange(start, start + idx.shape[1])             # (T,)
    x = model.embed(idx, pos)                                           # (B, T, C)
    for i, block in enumerate(model.blocks):
        x = block(x, caches[i] if caches else None)                     # (B, T, C)
    logits, _ = model.head(Tensor(x.data[:, -1:]))                      # (B, 1, V): the last position only
    logits = model.transformer.wte.full_logits(logits.data[:, -1])      # (B, V) (tensor parallel: gathered)
    return backend.to_numpy(logits).astype(np.float64)                 # (B, V)


def sample(logits, temperature, top_k, rng):
    """One token per row of logits (B, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k largest logits."""
    if temperature == 0:
        return logits.argmax(axis=1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k:].min(axis=1, keepdims=True)   # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)                                   # (B, V)
    u = rng.random((p.shape[0], 1))                                     # inverse-CDF sampling, one draw per row
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, rng=None, use_cache=True):
    """GPT.generate: idx (B, T) or (T,) token ids -> the same with max_new_tokens appended."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if isinstance(max_new_tokens, bool) or int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    idx = np.array(backend.to_numpy(idx.data if isinstance(idx, Tensor) else idx), dtype=np.int64)
    squeeze = idx.ndim == 1
    idx = idx[None] if squeeze else idx                                 # (B, T)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"generate needs a prompt of shape (B, T) with T >= 1, got {idx.shape}")
    bs, was_training = model.config.block_size, model.training
    model.eval()
    try:
        with no_grad():
            caches = None
            for _ in range(max_new_tokens):
                if not use_cache:
                    logits = next_logits(model, idx[:, -bs:])
                elif caches is None or caches[0].length == bs:         # prefill, or the window slid
                    caches = [KVCache(bs) for _ in model.blocks]
                    logits = next_logits(model, idx[:, -bs:], caches)
                else:                                                   # decode one new token
                    logits = next_logits(model, idx[:, -1:], caches)
                idx = np.concatenate([idx, sample(logits, temperature, top_k, rng)[:, None]], axis=1)
    finally:
        model.train(was_training)
    return idx[0] if squeeze else idx
