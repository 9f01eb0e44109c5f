"""How a sequence of T tokens is split over the N ranks of the sp axis.

Two layouts, each a list of contiguous *segments* (global start, length) per rank:

    contiguous   rank r holds [r T/N, (r+1) T/N)                  one segment
    zigzag       rank r holds chunks r and 2N-1-r of length T/2N  two segments

    T = 16, N = 4, chunks of c = 2 tokens:
        chunk  0  1  2  3  4  5  6  7
        rank   0  1  2  3  3  2  1  0        (zigzag)

Zigzag is the causal load balance of Brandon et al. 2023 ("Striped attention", the
zigzag variant used by ring-flash-attention and Megatron's context parallelism): under a
causal mask a rank holding an early chunk and a late chunk sees, summed over the ring,
the same number of visible (query, key) pairs as every other rank, so every ring step
costs the same everywhere. Ulysses gathers the whole sequence per head group, so it has
no imbalance and uses the contiguous layout.

The local array is the concatenation of a rank's segments along the sequence axis;
``positions`` gives each local token's global position (what GPT.embed needs, and what
the attention kernel's causal mask compares).
"""
import numpy as np

from engine.backend import get_array_module

LAYOUTS = ("contiguous", "zigzag")


class SequenceParallelError(ValueError):
    """Bad input for sequence parallelism (a length the split cannot divide, a bad mode)."""


def check_split(T, size, layout):
    """Raise SequenceParallelError unless a length-T sequence splits over size ranks."""
    if layout not in LAYOUTS:
        raise SequenceParallelError(f"unknown sequence layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    parts = 2 * size if layout == "zigzag" else size
    if T <= 0 or T % parts:
        why = f"2 x sp = {parts} chunks (zigzag split of causal ring attention)" if layout == "zigzag" \
            else f"sp = {parts} ranks"
        raise SequenceParallelError(f"sequence length {T} is not divisible into {why}; "
                                    f"use a sequence length that is a multiple of {parts}")


def segments(T, rank, size, layout):
    """Rank's segments of a length-T sequence: [(global start, length), ...] in local order."""
    check_split(T, size, layout)
    if layout == "contiguous" or size == 1:
        n = T // size
        return [(rank * n, n)]
    c = T // (2 * size)
    return [(rank * c, c), ((2 * size - 1 - rank) * c, c)]


def local_segments(T, rank, size, layout):
    """[(global start, length, local start), ...]: where each segment sits in the local array."""
    out, off = [], 0
    for start, n in segments(T, rank, size, layout):
        out.append((start, n, off))
        off += n
    return out


def positions(T, rank, size, layout):
    """Global positions (T/N,) of rank's local tokens, int64 NumPy."""
    return np.concatenate([np.arange(s, s + n) for s, n in segments(T, rank, size, layout)])


def shard(x, rank, size, layout, axis=1):
    """Rank's local part of a full array x along `axis` (the sequence axis), a copy."""
    T = x.shape[axis]
    idx = (slice(None),) * (axis % x.ndim)
    parts = [x[idx + (slice(s, s + n),)] for s, n in segments(T, rank, size, layout)]
    return parts[0].copy() if len(parts) == 1 else get_array_module(x).concatenate(parts, axis=axis)
