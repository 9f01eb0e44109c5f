"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), written
as nanoGPT writes it: learned positions, pre-LayerNorm blocks, tanh GELU, tied input and
output embeddings, biases.

    x = wte[idx] + wpe[pos]                                   (B, T, C)
    for each of the n_layer blocks:
        x = x + dropout(c_proj(attention(c_attn(ln_1(x)))))   causal self-attention
        x = x + dropout(c_proj(gelu(c_fc(ln_2(x)))))          MLP, hidden 4C
    logits = ln_f(x) @ wte.T                                  (B, T, V)

Parameter names are Hugging Face GPT-2's (``transformer.h.0.attn.c_attn.weight``, ...), so
models/hf.py converts checkpoints by transposing weights only: our Linear stores (out, in)
like PyTorch, Hugging Face's Conv1D stores (in, out). The output layer reuses wte and is
listed once.

Init (GPT-2 paper, section 2.3): weights normal(0, 0.02); the residual projections c_proj
scaled by 1/sqrt(2 n_layer), since every block adds two residual branches to the stream.

Attention-probability dropout is left out (the blockwise kernel never materialises the
probabilities); dropout acts on the embeddings and on each residual branch, as in nanoGPT.
The pieces are separate so later issues can reuse them: ``embed`` (a pipeline's first stage),
``blocks`` (any stage), ``head`` (the last stage), and models/attention.py's
``CausalSelfAttention.attention_fn`` (ring attention for sequence parallelism, which also passes
global positions ``pos``). Decoding with a KV cache is in models/generate.py.

Sparse options (Jaszczur et al. 2021, "Sparse is Enough in Scaling Transformers"):
``ffn_sparsity`` N > 0 replaces each MLP by models/sparse_ffn.py's SparseFFN (one unit of
every N active; parameters ``mlp.w1``, ``mlp.w2``, ``mlp.b2`` and the controller ``mlp.c1``,
``mlp.c2``, ``mlp.cb``), ``qkv_modules`` S > 0 replaces c_attn by models/sparse_qkv.py's
SparseQKV (``attn.sparse_qkv.*``). Such models have no Hugging Face GPT-2 layout.
"""
import math
from dataclasses import dataclass, field

import numpy as np

from engine import backend, ops
from engine.autograd import Tensor
from engine.random import CounterRNG
from engine.nn import Embedding, LayerNorm, Linear, Module, ModuleList

from .attention import CausalSelfAttention, residual_dropout
from .generate import generate as _generate
from .sparse_ffn import SparseFFN


@dataclass
class GPTConfig:
    block_size: int = 256      # longest context (number of learned positions)
    vocab_size: int = 256      # 256: byte-level
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True          # biases in Linear and LayerNorm (GPT-2 has them)
    # Sparse layers of Jaszczur et al. 2021 (models/sparse_ffn.py, models/sparse_qkv.py); 0 = dense
    ffn_sparsity: int = field(default=0, metadata=dict(
        help="sparse FFN: units per block N, one active per block (0: dense MLP; the paper: 32-64)"))
    ffn_lowrank: int = field(default=64, metadata=dict(help="sparse FFN: rank of the controller"))
    ffn_temperature: float = field(default=0.1, metadata=dict(
        help="sparse FFN: scale of the Gumbel noise on the controller's logits in training"))
    ffn_hard_prob: float = field(default=0.3, metadata=dict(
        help="sparse FFN: probability, per training step and layer, of the hard (one-hot) mask"))
    qkv_modules: int = field(default=0, metadata=dict(
        help="sparse QKV: module count S (must divide n_embd; 0: dense c_attn; the paper: 16)"))
    # The Terraformer of Jaszczur et al. 2021, section 5 (models/terraformer.py); each composes with the above
    reversible: bool = field(default=False, metadata=dict(
        help="reversible layers (RevNet / Reformer): two residual streams, inputs recomputed in backward"))
    rev_streams: str = field(default="copy", metadata=dict(
        help="with --reversible: copy (Reformer: both streams start as the embedding, averaged at the end) or "
             "split (RevNet: the n_embd channels halved, each layer n_embd/2 wide)", choices=("copy", "split")))
    attention: str = field(default="full", metadata=dict(
        help="full (causal softmax attention) or lsh (Reformer: shared query-key, hashed into buckets, chunked)",
        choices=("full", "lsh")))
    lsh_chunk: int = field(default=32, metadata=dict(help="LSH: chunk length (must divide block_size)"))
    lsh_buckets: int = field(default=4, metadata=dict(
        help="LSH: buckets per hash round, 1 or even, at most 2 block_size / lsh_chunk"))
    lsh_hashes: int = field(default=2, metadata=dict(help="LSH: hash rounds, combined by their log-sum-exp"))
    loss_sparsity: int = field(default=0, metadata=dict(
        help="sparse loss layer: the output projection as a multiplicative layer of S modules (0: the tied wte)"))

    @property
    def terraformer(self):
        """True when a Terraformer layer is on (models/terraformer.py builds the model)."""
        return self.reversible or self.attention == "lsh" or self.loss_sparsity > 0

    @property
    def sparse(self):
        """True when any layer is a sparse or Terraformer one (no Hugging Face GPT-2 layout)."""
        return self.ffn_sparsity > 0 or self.qkv_modules > 0 or self.terraformer

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be True or False, got {self.bias!r}")
        for name in ("ffn_sparsity", "qkv_modules"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"GPTConfig.{name} must be an integer >= 0, got {v!r}")
        if self.ffn_sparsity:
            if (4 * self.n_embd) % self.ffn_sparsity:
                raise ValueError(f"GPTConfig.ffn_sparsity ({self.ffn_sparsity}) must divide the FFN width "
                                 f"4 * n_embd ({4 * self.n_embd})")
            if isinstance(self.ffn_lowrank, bool) or not isinstance(self.ffn_lowrank, (int, np.integer)) \
                    or self.ffn_lowrank <= 0:
                raise ValueError(f"GPTConfig.ffn_lowrank must be a positive integer, got {self.ffn_lowrank!r}")
            if isinstance(self.ffn_temperature, bool) or not isinstance(self.ffn_temperature, (int, float)) \
                    or not self.ffn_temperature >= 0:
                raise ValueError(f"GPTConfig.ffn_temperature must be >= 0, got {self.ffn_temperature!r}")
            if isinstance(self.ffn_hard_prob, bool) or not isinstance(self.ffn_hard_prob, (int, float)) \
                    or not 0.0 <= self.ffn_hard_prob <= 1.0:
                raise ValueError(f"GPTConfig.ffn_hard_prob must be in [0, 1], got {self.ffn_hard_prob!r}")
        if self.qkv_modules and self.n_embd % self.qkv_modules:
            raise ValueError(f"GPTConfig.qkv_modules ({self.qkv_modules}) must divide n_embd ({self.n_embd})")
        from .terraformer import check_config                  # the Terraformer's own fields
        check_config(self)


def layer_norm(dim, bias):
    """LayerNorm over the last dim, with or without its bias (config.bias)."""
    if bias:
        return LayerNorm(dim)
    return LayerNorm(dim, bias=False)   # only with config.bias=False (no Hugging Face layout)


class MLP(Module):
    def __init__(self, config, rng, noise=None, layer=0):
        super().__init__()
        C = config.n_embd
        self.dropout = config.dropout
        self.c_fc = Linear(C, 4 * C, bias=config.bias, rng=rng)
        self.c_proj = Linear(4 * C, C, bias=config.bias, rng=rng)
        self.noise, self.layer = noise, layer

    def forward(self, x):
        h = ops.gelu(self.c_fc(x))                             # (B, T, 4C)
        return residual_dropout(self.c_proj(h), self.dropout, self.noise, self.layer, "mlp", self.training)   # (B, T, C)


class Block(Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config, rng, noise=None, layer=0, attention_fn=None):
        super().__init__()
        self.ln_1 = layer_norm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config, rng, noise, layer, attention_fn)
        self.ln_2 = layer_norm(config.n_embd, config.bias)
        if config.ffn_sparsity:                                # Jaszczur et al. 2021: sparse FFN
            self.mlp = SparseFFN(config.n_embd, 4 * config.n_embd, N=config.ffn_sparsity,
                                 d_lowrank=config.ffn_lowrank, temperature=config.ffn_temperature,
                                 hard_prob=config.ffn_hard_prob, bias=config.bias, rng=rng,
                                 noise=noise, layer=layer, dropout=config.dropout)
        else:
            self.mlp = MLP(config, rng, noise, layer)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)              # (B, T, C)
        return x + self.mlp(self.ln_2(x))                      # (B, T, C)


class Transformer(Module):
    """Container whose attribute name gives the Hugging Face prefix ``transformer.``:
    wte, wpe, h (the blocks), ln_f, registered in Hugging Face's order."""

    def __init__(self, config, rng, noise):
        super().__init__()
        self.wte = Embedding(config.vocab_size, config.n_embd, rng=rng)    # (V, C), also the output layer
        self.wpe = Embedding(config.block_size, config.n_embd, rng=rng)    # (block_size, C)
        self.h = ModuleList([Block(config, rng, noise, i) for i in range(config.n_layer)])
        self.ln_f = layer_norm(config.n_embd, config.bias)


def embed(config, wte, wpe, idx, pos=None, noise=None, training=False):
    """Token plus position embeddings, with dropout: idx (B, T) ints -> (B, T, C). pos: global
    positions (T,) or (B, T), default 0..T-1 (a sequence-parallel rank passes its own). The
    first pipeline stage calls this with the embeddings it holds."""
    idx = backend.to_device(idx.data if isinstance(idx, Tensor) else idx)
    if idx.ndim != 2:
        raise ValueError(f"idx must be (B, T) token ids, got shape {idx.shape}")
    T = idx.shape[1]
    if pos is None:
        if T > config.block_size:
            raise ValueError(f"sequence length {T} > block_size {config.block_size}")
        pos = backend.xp().arange(T)                            # (T,)
    else:
        pos = backend.to_device(pos.data if isinstance(pos, Tensor) else pos)
        if pos.shape not in ((T,), idx.shape):
            raise ValueError(f"pos must have shape ({T},) or {idx.shape}, got {pos.shape}")
        if pos.size and (int(pos.min()) < 0 or int(pos.max()) >= config.block_size):
            raise ValueError(f"positions must be in [0, {config.block_size}), "
                             f"got [{int(pos.min())}, {int(pos.max())}]")
    x = wte(idx) + wpe(pos)                                     # (B, T, C) + (T, C) or (B, T, C)
    return residual_dropout(x, config.dropout, noise, -1, "embed", training)


def head(ln_f, wte, x, targets=None):
    """Final LayerNorm and the tied output layer: x (B, T, C) -> logits (B, T, V) = ln_f(x) wte^T;
    the mean cross-entropy (ignoring -1) too if targets. The last pipeline stage calls this."""
    x = ln_f(x)                                                 # (B, T, C)
    logits = wte.logits(x)                                      # (B, T, V): x @ wte.T
    if targets is None:
        return logits, None
    targets = backend.to_device(targets.data if isinstance(targets, Tensor) else targets)
    return logits, wte.cross_entropy(logits, targets)


class GPT(Module):
    """GPT-2 language model. ``rng``: numpy Generator or seed for the init (None: seed 0);
    the noise generator (``model.noise``: dropout masks, the sparse FFN's coin and Gumbel
    noise; counter-based, engine/random.py) is keyed by a number drawn from it."""

    def __init__(self, config, rng=None):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT needs a GPTConfig, got {type(config).__name__}")
        self.config = config
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        self.noise = CounterRNG(int(rng.integers(2**63)))
        self.transformer = Transformer(config, rng, self.noise)
        scale = 1.0 / math.sqrt(2 * config.n_layer)            # GPT-2: residual projections scaled
        for block in self.transformer.h:
            block.attn.c_proj.weight.data *= scale
            (block.mlp.w2 if config.ffn_sparsity else block.mlp.c_proj.weight).data *= scale

    # -- pieces ---------------------------------------------------------------------------
    @property
    def blocks(self):
        """The transformer blocks (a ModuleList), registered as transformer.h."""
        return self.transformer.h

    def embed(self, idx, pos=None):
        """Token plus position embeddings (the function ``embed`` above) with this model's pieces."""
        t = self.transformer
        return embed(self.config, t.wte, t.wpe, idx, pos, self.noise, self.training)

    def head(self, x, targets=None):
        """Final LayerNorm and the tied output layer; loss (mean cross-entropy, ignore -1) if targets."""
        return head(self.transformer.ln_f, self.transformer.wte, x, targets)

    def forward(self, idx, targets=None, pos=None):
        x = self.embed(idx, pos)                               # (B, T, C)
        for block in self.blocks:
            x = block(x)                                       # (B, T, C)
        return self.head(x, targets)                           # (B, T, V), scalar or None

    def selective_recompute(self, on=True):
        """Selective activation recomputation (models/attention.py HeadsAttention's docstring):
        every block's attention probabilities recomputed in backward instead of kept
        (parallel/data/zero.py recompute="selective")."""
        for block in self.blocks:
            block.attn.keep_probs = not on

    # -- accounting -----------------------------------------------------------------------
    def num_params(self, non_embedding=False):
        """Parameters counted once (wte is also the output layer); non_embedding drops wpe, as nanoGPT."""
        n = sum(p.size for p in self.parameters())
        return n - self.transformer.wpe.weight.size if non_embedding else n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token, forward and backward: 6N + 12 L T C (PaLM, Chowdhery et al.
        2022, appendix B; nanoGPT's estimate_mfu). N excludes the position embeddings;
        12 L T C counts the attention score and value matmuls, T = seq_len (default block_size)."""
        c = self.config
        T = c.block_size if seq_len is None else seq_len
        n = self.num_params(non_embedding=True)
        for block in self.blocks:                              # sparse QKV reuses its weights S times
            if hasattr(block.attn, "sparse_qkv"):
                n += block.attn.sparse_qkv.macs_per_token() - block.attn.sparse_qkv.num_parameters()
        return 6 * n + 12 * c.n_layer * T * c.n_embd

    # -- decoding (models/generate.py) ---------------------------------------------------------
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rng=None, use_cache=True):
        """Append max_new_tokens sampled tokens to idx (B, T) and return it (host int64 array):
        KV cache (prefill, then one token at a time), temperature (0: greedy), top_k; rng:
        Generator or seed. use_cache=False recomputes the whole window for every token."""
        return _generate(self, idx, max_new_tokens, temperature, top_k, rng, use_cache)
