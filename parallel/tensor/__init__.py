"""Tensor parallelism (Shoeybi et al. 2019, Megatron-LM, arXiv 1909.08053): each layer's
weights split over the tp ranks, so every rank holds 1/tp of each matrix.

    comm.py     the autograd-aware communication: copy_to_tp (identity forward, all-reduce
                backward), reduce_from_tp (all-reduce forward, identity backward), and for
                sequence-parallel regions gather_linear and scatter_tokens (Korthikanti et al.)
    layers.py   ColumnParallelLinear (QKV, the first MLP matrix), RowParallelLinear (the
                attention projection, the second MLP matrix)
    vocab.py    VocabParallelEmbedding: the tied wte split by vocabulary rows, its output
                layer and a cross-entropy that never gathers the full logits
    model.py    shard_gpt: a GPT's blocks and embedding replaced by their tp slices in place
"""
from .comm import copy_to_tp, reduce_from_tp  # noqa: F401
from .layers import ColumnParallelLinear, RowParallelLinear  # noqa: F401
from .model import TensorParallelError, shard_gpt  # noqa: F401
from .vocab import VocabParallelEmbedding, padded_vocab  # noqa: F401
