"""The Terraformer, decoder-only (Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers",
arXiv 2111.12763, section 5): a Scaling Transformer (sparse FFN and sparse QKV, models/sparse_*.py)
with reversible layers, LSH attention and the sparse loss layer; each is a GPTConfig field and
they compose with one another and with the sparse layers (``build_model`` picks this class when
any of reversible, attention = "lsh", loss_sparsity > 0 is set):

    x = wte[idx] + wpe[pos]                                           (B, T, C), dropout
    reversible, rev_streams copy (Reformer):  pair = [x | x]          (B, T, 2C), streams of C
                rev_streams split (RevNet):   pair = x                (B, T, C), streams of C/2
    each layer (engine/reversible.py):  y1 = x1 + F(x2),  y2 = x2 + G(y1)
        F(x) = dropout(c_proj(attention(ln_1(x))))    full or LSH attention; dense or sparse QKV
        G(x) = dropout(mlp(ln_2(x)))                  dense or sparse FFN
    copy: x = (y1 + y2) / 2 (Trax's Terraformer averages the streams);  split: x = [y1 | y2]
    not reversible: x = x + F(x), then x = x + G(x) (GPT-2's pre-LayerNorm block)
    logits = sparse_loss(ln_f(x)) (models/sparse_loss.py)  or  ln_f(x) wte^T (tied, loss_sparsity 0)

LSH attention (engine/ops/lsh_attention.py, Kitaev et al. 2020): one projection c_qv (C -> 2C)
gives the shared query-key and the values (with sparse QKV, its q and v; its k is unused).
The random rotations (R, hs, n_buckets / 2) of layer l are normals drawn from the model's
counter-based generator at (step, pass, l, "lsh"): fresh each training step, the same on every
rank and in every recomputation; in evaluation and decoding, one fixed draw (step -1).

Decoding (models/generate.py): a full-attention layer's KV cache holds k, v as in GPT. An LSH
layer's cache holds the unit keys k = q / |q| (B, nh, t, hs), the values, and the bucket ids
of every cached token in every round, ``KVCache.buckets`` (R, B, nh, t). The prompt is
prefilled with the chunked kernel; each new token then attends, in each round, to every cached
token of its own bucket (lsh_decode): the set the chunks approximate, equal to it when the
window is one chunk (tests/test_terraformer.py decodes with and without the cache alike there).

Memory: the reversible stack keeps one (B, T, 2C) pair whatever the depth (plus one layer's
graph in backward); an LSH layer's scores are (B, nh, T, 2 chunk) per round instead of
(B, nh, T, T). Cost: one more forward per layer (the reversible recomputation), which is also
ZeRO-3's recomputation: under stage 3 the stack asks parallel/data/fsdp.py to gather layer i
right before it computes (forward, and again in backward, prefetching the next) and to free it
after, so one recomputation serves both (``manage_layers``), and no layer input is kept.
"""
import math
from dataclasses import replace

import numpy as np

from engine import backend, ops
from engine.autograd import Tensor
from engine.nn import Embedding, Linear, Module, ModuleList
from engine.ops.lsh_attention import lsh_attention, lsh_buckets, lsh_decode, unit_keys
from engine.random import SITES, CounterRNG
from engine.reversible import reversible

from .generate import generate as _generate
from .attention import residual_dropout
from .gpt import GPT, Block, embed, layer_norm
from .sparse_loss import SparseLoss
from .sparse_qkv import SparseQKV


def check_config(c):
    """ValueError (one line) for the Terraformer fields of a GPTConfig that cannot run."""
    for name in ("lsh_chunk", "lsh_buckets", "lsh_hashes"):
        v = getattr(c, name)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
    if c.attention not in ("full", "lsh"):
        raise ValueError(f"GPTConfig.attention must be 'full' or 'lsh', got {c.attention!r}")
    if c.rev_streams not in ("copy", "split"):
        raise ValueError(f"GPTConfig.rev_streams must be 'copy' or 'split', got {c.rev_streams!r}")
    if isinstance(c.loss_sparsity, bool) or not isinstance(c.loss_sparsity, (int, np.integer)) \
            or c.loss_sparsity < 0:
        raise ValueError(f"GPTConfig.loss_sparsity must be an integer >= 0, got {c.loss_sparsity!r}")
    if c.attention == "lsh":
        if c.block_size % c.lsh_chunk:
            raise ValueError(f"GPTConfig.block_size ({c.block_size}) must be divisible by lsh_chunk "
                             f"({c.lsh_chunk}): LSH attention cuts each window into chunks")
        if c.lsh_buckets != 1 and c.lsh_buckets % 2:
            raise ValueError(f"GPTConfig.lsh_buckets ({c.lsh_buckets}) must be 1 or even: a random rotation "
                             "hashes to one of n/2 directions or its negative")
        if c.lsh_buckets * c.lsh_chunk > 2 * c.block_size:
            raise ValueError(f"GPTConfig.lsh_buckets ({c.lsh_buckets}) does not fit: {c.block_size // c.lsh_chunk} "
                             f"chunks of {c.lsh_chunk} per window take at most {2 * c.block_size // c.lsh_chunk} "
                             "buckets (Kitaev et al. take block_size / lsh_chunk)")
    if c.reversible and c.rev_streams == "split":
        if c.n_embd % 2:
            raise ValueError(f"GPTConfig.n_embd ({c.n_embd}) is odd: reversible split streams take half of "
                             "its channels each")
        try:                                                           # each stream's layers, n_embd / 2 wide
            replace(c, n_embd=c.n_embd // 2, reversible=False)
        except ValueError as e:
            raise ValueError(f"reversible split streams of n_embd / 2 = {c.n_embd // 2} channels: {e}") from None


def build_model(config, rng=None):
    """A GPT, or a Terraformer when a config asks for one of its layers."""
    return Terraformer(config, rng) if config.terraformer else GPT(config, rng)


class LSHSelfAttention(Module):
    """Causal LSH self-attention (engine/ops/lsh_attention.py) with the projections around it:
    x (B, T, C) -> (B, T, C). ``noise``: the model's CounterRNG (rotations, dropout)."""

    def __init__(self, config, rng, noise, layer):
        C = config.n_embd
        self.n_head, self.head_size, self.dropout = config.n_head, C // config.n_head, config.dropout
        self.chunk, self.n_buckets, self.n_hashes = config.lsh_chunk, config.lsh_buckets, config.lsh_hashes
        if config.qkv_modules:
            self.sparse_qkv = SparseQKV(C, config.qkv_modules, bias=config.bias, rng=rng)
        else:
            self.c_qv = Linear(C, 2 * C, bias=config.bias, rng=rng)      # shared query-key, values
        self.c_proj = Linear(C, C, bias=config.bias, rng=rng)
        self.noise, self.layer = noise, layer

    def rotations(self):
        """(R, hs, n_buckets / 2) normals of this layer (None: one bucket)."""
        if self.n_buckets == 1:
            return None
        return self.noise.shared_normal(self.layer, SITES["lsh"], (self.n_hashes, self.head_size, self.n_buckets // 2),
                                        step=None if self.training else -1)

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        nh, hs = self.n_head, self.head_size
        if hasattr(self, "sparse_qkv"):
            q, _, v = ops.split(self.sparse_qkv(x, kv_cache), 3, axis=-1)   # each (B, T, C)
        else:
            q, v = ops.split(self.c_qv(x), 2, axis=-1)
        q, v = (ops.transpose(ops.reshape(t, (B, T, nh, hs)), (0, 2, 1, 3)) for t in (q, v))   # (B, nh, T, hs)
        buckets = lsh_buckets(q.data, self.rotations())                  # (R, B, nh, T)
        if kv_cache is not None and kv_cache.length > 0:                 # decoding a new token, no graph
            k_all, v_all, start = kv_cache.append(unit_keys(q.data)[0], v.data)
            kv_cache.buckets = backend.get_array_module(buckets).concatenate([kv_cache.buckets, buckets], axis=-1)
            y = Tensor(lsh_decode(q.data, k_all, v_all, buckets, kv_cache.buckets, start))
        else:
            y = lsh_attention(q, v, buckets, self.chunk)                 # (B, nh, T, hs)
            if kv_cache is not None:                                     # the prefill: cache what decoding reads
                kv_cache.append(unit_keys(q.data)[0], v.data)
                kv_cache.buckets = buckets
        y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (B, T, C))       # (B, nh, T, hs) -> (B, T, C)
        return residual_dropout(self.c_proj(y), self.dropout, self.noise, self.layer, "attn", self.training)


class TerraBlock(Block):
    """GPT-2's block (ln_1, attn, ln_2, mlp: dense or sparse) as the two halves of a reversible
    layer, F = attn(ln_1(.)) and G = mlp(ln_2(.)); attn is LSH attention if the config says."""

    def __init__(self, config, rng, noise, layer, paired):
        super().__init__(config, rng, noise, layer)
        if config.attention == "lsh":
            self.attn = LSHSelfAttention(config, rng, noise, layer)      # keeps attn's place in the names
        self.paired = paired

    def f(self, x, kv_cache=None):
        return self.attn(self.ln_1(x), kv_cache)

    def g(self, x):
        return self.mlp(self.ln_2(x))

    def forward(self, x, kv_cache=None):
        """paired: one reversible layer on the pair (B, T, 2d), stored activations (decoding, and
        ZeRO-3 without reversibility never meet it); else the residual block on (B, T, d)."""
        if not self.paired:
            x = x + self.f(x, kv_cache)
            return x + self.g(x)
        x1, x2 = ops.split(x, 2, axis=-1)                                # (B, T, d) each
        y1 = x1 + self.f(x2, kv_cache)
        return ops.concat([y1, x2 + self.g(y1)], axis=-1)                # (B, T, 2d)


class Transformer(Module):
    """wte, wpe, the blocks h (streams of ``width`` channels), ln_f: the names GPT uses."""

    def __init__(self, config, width, rng, noise):
        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng)   # (V, C)
        self.wpe = Embedding(config.block_size, config.n_embd, rng=rng)   # (block_size, C)
        sub = replace(config, n_embd=width, reversible=False)             # each layer's shape
        self.h = ModuleList([TerraBlock(sub, rng, noise, i, config.reversible) for i in range(config.n_layer)])
        self.ln_f = layer_norm(config.n_embd, config.bias)


class Terraformer(Module):
    """The model of the module docstring; GPT's interface (embed, blocks, head, forward,
    num_params, flops_per_token, generate), so train.py, parallel/step.py (dp, ZeRO 0-3),
    checkpoints, consolidate.py and sample.py take it as they take a GPT."""

    def __init__(self, config, rng=None):
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        self.config = config
        self.noise = CounterRNG(int(rng.integers(2**63)))
        self.copy = config.reversible and config.rev_streams == "copy"
        width = config.n_embd // 2 if config.reversible and not self.copy else config.n_embd
        self.transformer = Transformer(config, width, rng, self.noise)
        if config.loss_sparsity:
            self.lm_head = SparseLoss(config.n_embd, config.vocab_size, config.loss_sparsity, rng=rng)
        scale = 1.0 / math.sqrt(2 * config.n_layer)                       # GPT-2: residual projections scaled
        for block in self.blocks:
            block.attn.c_proj.weight.data *= scale
            (block.mlp.w2 if config.ffn_sparsity else block.mlp.c_proj.weight).data *= scale
        self._manager = None                                             # ZeRO-3's layer gatherer (manage_layers)

    @property
    def blocks(self):
        return self.transformer.h

    def manage_layers(self, manager):
        """ZeRO-3 (parallel/data/fsdp.py) offers its gatherer: a reversible stack runs its layers
        itself and calls manager.enter(i, step) / leave(i) around each; returns True when taken
        (otherwise ZeRO-3 wraps each block's forward as for GPT)."""
        if not self.config.reversible:
            return False
        self._manager = manager
        return True

    def embed(self, idx, pos=None):
        """(B, T) ids -> the stream pair (B, T, 2C) (copy), or (B, T, C)."""
        t = self.transformer
        x = embed(self.config, t.wte, t.wpe, idx, pos, self.noise, self.training)   # (B, T, C)
        return ops.concat([x, x], axis=-1) if self.copy else x

    def head(self, x, targets=None):
        """The streams merged, ln_f, the output layer; the mean cross-entropy (ignore -1) if targets."""
        if self.copy:
            x1, x2 = ops.split(x, 2, axis=-1)
            x = (x1 + x2) * 0.5                                          # (B, T, C)
        x = self.transformer.ln_f(x)
        if not self.config.loss_sparsity:
            logits = self.transformer.wte.logits(x)                      # tied, (B, T, V)
        else:
            logits = self.lm_head(x)                                     # (B, T, V)
        if targets is None:
            return logits, None
        targets = backend.to_device(targets.data if isinstance(targets, Tensor) else targets)
        return logits, ops.cross_entropy(logits, targets)

    def forward(self, idx, targets=None, pos=None):
        x = self.embed(idx, pos)
        if self.config.reversible:
            x = reversible(x, list(self.blocks), rng=self.noise, manager=self._manager)
        else:
            for block in self.blocks:
                x = block(x)
        return self.head(x, targets)

    def num_params(self, non_embedding=False):
        n = sum(p.size for p in self.parameters())
        return n - self.transformer.wpe.weight.size if non_embedding else n

    def flops_per_token(self, seq_len=None):
        """6 N + 12 L T' C as GPT.flops_per_token, with T' = min(T, 2 chunk R) keys per query for
        LSH; N counts the sparse QKV's and sparse loss's multiply-adds, not wte when it is only
        looked up (sparse loss). The reversible recomputation is not model FLOPs (as PaLM's MFU)."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        if c.attention == "lsh":
            T = min(T, 2 * c.lsh_chunk * c.lsh_hashes)
        n = self.num_params(non_embedding=True)
        for block in self.blocks:
            if hasattr(block.attn, "sparse_qkv"):
                n += block.attn.sparse_qkv.macs_per_token() - block.attn.sparse_qkv.num_parameters()
        if c.loss_sparsity:
            n += self.lm_head.macs_per_token() - self.lm_head.num_parameters() - self.transformer.wte.weight.size
        return 6 * n + 12 * c.n_layer * T * self.blocks[0].ln_1.dim          # attention at the streams' width

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rng=None, use_cache=True):
        """As GPT.generate (models/generate.py); an LSH layer's cache is described above."""
        return _generate(self, idx, max_new_tokens, temperature, top_k, rng, use_cache)
