"""shard_gpt: turn a GPT (models/gpt.py, built whole from the seed on every rank) into this tp
rank's slice of it, in place (Shoeybi et al. 2019, figure 3):

    attention   c_attn -> ColumnParallelLinear over this rank's heads: rows of q, k and v of
                heads [r nh/tp, (r+1) nh/tp); the attention runs on those heads alone;
                c_proj -> RowParallelLinear over the same head columns
    MLP         c_fc -> ColumnParallelLinear over hidden units [r 4C/tp, (r+1) 4C/tp);
                c_proj -> RowParallelLinear over the same units
    wte         VocabParallelEmbedding (parallel/tensor/vocab.py): rows of the padded vocabulary,
                its output layer and its cross-entropy
    replicated  LayerNorms, wpe and the row-parallel biases: the same on every tp rank, and so
                are their gradients (their inputs' gradients were all-reduced)

Parameter names stay the dense model's (``transformer.h.0.attn.c_attn.weight``), each holding
this rank's slice. Per block: 2 all-reduces of (B, T, C) forward, 2 backward.
"""
import types

import numpy as np

from .layers import (ColumnParallelLinear, ParallelSparseFFN, ReplicatedLayerNorm, RowParallelLinear,
                     TokenShardedPositions)
from .vocab import VocabParallelEmbedding


class TensorParallelError(ValueError):
    """A model that does not split over the tp ranks (one line; callers exit with code 2)."""


def check_config(config, tp):
    """Raise TensorParallelError unless a GPTConfig (or a dict of its fields) splits over tp ranks."""
    if isinstance(config, dict):
        config = types.SimpleNamespace(**{"ffn_sparsity": 0, "qkv_modules": 0, **config})
    if tp < 1:
        raise TensorParallelError(f"tp must be >= 1, got {tp}")
    if config.n_head % tp:
        raise TensorParallelError(f"--tp {tp} splits the attention heads: n_head ({config.n_head}) must be "
                                  f"divisible by tp")
    if (4 * config.n_embd) % tp:
        raise TensorParallelError(f"--tp {tp} splits the MLP's 4 n_embd = {4 * config.n_embd} hidden units: "
                                  "they must be divisible by tp")
    if tp > 1 and config.qkv_modules:
        raise TensorParallelError(f"--tp {tp} with the sparse QKV layer (--qkv-modules) is not supported: its "
                                  "convolution mixes the modules that heads would split")
    if tp > 1 and config.ffn_sparsity and (4 * config.n_embd // config.ffn_sparsity) % tp:
        raise TensorParallelError(f"--tp {tp} splits the sparse FFN in whole blocks of {config.ffn_sparsity} "
                                  f"units: its {4 * config.n_embd // config.ffn_sparsity} blocks must divide by tp")


def shard_gpt(model, comm, vocab_granule=1, tokens=False):
    """Replace model's layers by this rank's tp slices (comm: the tp Communicator); returns the
    names of the parameters that are the same on every tp rank (counted once in norms).
    ``tokens``: sequence-parallel regions (Korthikanti et al. 2022): the residual stream,
    LayerNorms and dropout hold this rank's tokens [r T/tp, (r+1) T/tp) only."""
    cfg, t, r = model.config, comm.size, comm.rank
    check_config(cfg, t)
    if tokens and t > 1 and cfg.ffn_sparsity:
        raise TensorParallelError("sequence-parallel regions with a sparse FFN are not supported")
    C, hs = cfg.n_embd, cfg.n_embd // cfg.n_head
    nh = cfg.n_head // t
    q = np.arange(r * nh * hs, (r + 1) * nh * hs)                    # this rank's heads' q rows
    f = 4 * C // t
    units = np.arange(r * f, (r + 1) * f)
    for block in model.blocks:
        a, m = block.attn, block.mlp
        a.c_attn = ColumnParallelLinear.from_linear(a.c_attn, np.concatenate([q, C + q, 2 * C + q]), comm, tokens)
        a.c_proj = RowParallelLinear.from_linear(a.c_proj, q, comm, tokens)
        a.n_head = nh
        if cfg.ffn_sparsity:                                          # whole blocks of N units per rank
            block.mlp = ParallelSparseFFN(m, comm)
        else:
            m.c_fc = ColumnParallelLinear.from_linear(m.c_fc, units, comm, tokens)
            m.c_proj = RowParallelLinear.from_linear(m.c_proj, units, comm, tokens)
        if tokens:
            block.ln_1, block.ln_2 = ReplicatedLayerNorm(block.ln_1, comm), ReplicatedLayerNorm(block.ln_2, comm)
    tr = model.transformer
    tr.wte = VocabParallelEmbedding.from_embedding(tr.wte, comm, vocab_granule, tokens)
    if tokens:
        tr.wpe, tr.ln_f = TokenShardedPositions(tr.wpe, comm), ReplicatedLayerNorm(tr.ln_f, comm)
    sliced = set(slice_specs(model))
    return [n for n, p in model.named_parameters() if n not in sliced]


def _runs(index):
    """Contiguous runs [[s, e), ...] of a sorted index array."""
    out = []
    for i in np.asarray(index).tolist():
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def slice_specs(module, prefix=""):
    """{parameter name: {"shape": full shape, "axis": a, "ranges": [[s, e), ...]}} of every
    parameter this rank holds a tensor-parallel slice of (its rows or columns of the dense
    one, in order; a padded vocabulary's rows past V are zeros and listed in no range): what a
    sharded checkpoint records, so that any tp can read it (parallel/checkpoint/reshard.py)."""
    specs = {}
    for name, m in module.named_modules(prefix):
        dot = f"{name}." if name else ""
        if isinstance(m, ColumnParallelLinear):
            out, inp = m.weight.shape[0] * m.comm.size, m.weight.shape[1]
            specs[dot + "weight"] = {"shape": [out, inp], "axis": 0, "ranges": _runs(m.rows)}
            if m.bias is not None:
                specs[dot + "bias"] = {"shape": [out], "axis": 0, "ranges": _runs(m.rows)}
        elif isinstance(m, RowParallelLinear):
            out, inp = m.weight.shape[0], m.weight.shape[1] * m.comm.size
            specs[dot + "weight"] = {"shape": [out, inp], "axis": 1, "ranges": _runs(m.cols)}
        elif isinstance(m, ParallelSparseFFN):
            for pname in ("w1", "w2", "c2", "cb"):
                p = getattr(m, pname)
                if p is not None:
                    shape = [m.d_ff] + list(p.shape[1:])
                    specs[dot + pname] = {"shape": shape, "axis": 0, "ranges": _runs(m.units)}
        elif isinstance(m, VocabParallelEmbedding):
            hi = min(m.lo + m.weight.shape[0], m.vocab)
            specs[dot + "weight"] = {"shape": [m.vocab, m.weight.shape[1]], "axis": 0,
                                     "ranges": [[m.lo, hi]] if hi > m.lo else []}
    return specs
