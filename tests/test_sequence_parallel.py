"""Sequence parallelism (parallel/sequence/ring_attention.py, ulysses.py, sequence.py) equals one process.

- layouts (no MPI): zigzag and contiguous segments cover every position once; bad lengths fail;
- attention: ring and Ulysses, causal and not, both layouts, 1/3/4 heads, output and q/k/v
  gradients against dense NumPy attention in float64, N = 1..8 in ONE 8-rank launch; the
  error stays at rounding level and does not grow with N;
- training: 5 AdamW steps of a GPT in float64 with sp = 2, sp = 4 and sp = 2 x dp = 2, ring and
  Ulysses, equal the one-process run within 1e-10 (one 4-rank launch);
- bad input: one line naming the problem on every rank, exit code 2.
"""
import re

import numpy as np
import pytest

from mpi_util import describe, run_mpi
from parallel.sequence import SequenceParallelError, check_config
from parallel.sequence.split import check_split, positions, segments, shard


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("N", [1, 2, 3, 4, 8])
def test_layout_covers_every_position_once(layout, N):
    T = 2 * N * 5
    allpos = np.concatenate([positions(T, r, N, layout) for r in range(N)])
    assert sorted(allpos.tolist()) == list(range(T))
    x = np.arange(3 * T).reshape(3, T)
    for r in range(N):
        np.testing.assert_array_equal(shard(x, r, N, layout), x[:, positions(T, r, N, layout)])
    if layout == "zigzag" and N > 1:               # rank r holds chunks r and 2N-1-r
        c = T // (2 * N)
        assert segments(T, 1, N, layout) == [(c, c), ((2 * N - 2) * c, c)]


def test_bad_lengths_raise():
    with pytest.raises(SequenceParallelError, match="multiple of 8"):
        check_split(12, 4, "zigzag")
    with pytest.raises(SequenceParallelError, match="multiple of 3"):
        check_split(10, 3, "contiguous")
    with pytest.raises(SequenceParallelError, match="block_size"):
        check_config(2, "ring", 128, block_size=64)
    with pytest.raises(SequenceParallelError, match="unknown sp attention"):
        check_config(2, "rings", 16)
    check_config(4, "ulysses", 12, n_head=3)       # uneven heads are fine


def test_attention_matches_one_process_for_n_1_to_8():
    proc = run_mpi(8, "sp_attention_worker.py", timeout=240)
    assert proc.returncode == 0, describe(proc)
    errs = {int(n): float(e) for n, e in re.findall(r"N=(\d+) max_err=(\S+) cases=24", proc.stdout)}
    assert sorted(errs) == list(range(1, 9)), describe(proc)
    assert max(errs.values()) < 1e-12, errs               # the bar is 1e-10; rounding level in fact
    small = max(errs[1], errs[2], 1e-16)
    assert max(errs[n] for n in range(5, 9)) < 20 * small, errs   # no growth with N


def test_training_matches_one_process():
    proc = run_mpi(4, "sp_train_worker.py", timeout=240)
    assert proc.returncode == 0, describe(proc)
    rows = re.findall(r"^(\S+) (ring|ulysses) loss_err=(\S+) param_err=(\S+) moved=(\S+)", proc.stdout, re.M)
    assert {(r[0], r[1]) for r in rows} == {(l, m) for l in ("sp=2", "sp=4", "sp=2xdp=2", "sp=2xdp=2avg")
                                              for m in ("ring", "ulysses")}, describe(proc)
    for layout, mode, le, pe, moved in rows:
        assert float(le) < 1e-10 and float(pe) < 1e-10, (layout, mode, le, pe)
        assert float(moved) > 1e-3                            # the five steps did train


@pytest.mark.parametrize("mode, T, want", [
    ("ring", 12, "sequence length 12 is not divisible into 2 x sp = 8 chunks"),
    ("ulysses", 6, "sequence length 6 is not divisible into sp = 4 ranks")])
def test_bad_length_fails_on_every_rank(mode, T, want):
    proc = run_mpi(4, "sp_error_worker.py", mode, T, timeout=60)
    assert proc.returncode == 2, describe(proc)
    for r in range(4):
        assert f"rank {r}: SequenceParallelError: {want}" in proc.stdout, describe(proc)
