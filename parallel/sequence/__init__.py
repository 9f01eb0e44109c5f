"""Sequence parallelism: each sequence's tokens split over the sp ranks.

    split.py            how T tokens split (contiguous, zigzag) and each token's global position
    ring_attention.py   ring attention (Liu et al. 2023): K/V blocks travel a ring, overlapped
    ulysses.py          DeepSpeed-Ulysses (Jacobs et al. 2023): all-to-all sequence <-> heads
    model.py            SequenceParallel: a GPT run on its local tokens with either attention
"""
from .model import MODES, SeqShard, SequenceParallel, check_config, layout_for  # noqa: F401
from .split import SequenceParallelError, check_split, local_segments, positions, segments, shard  # noqa: F401
