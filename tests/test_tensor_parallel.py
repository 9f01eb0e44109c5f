"""parallel/tensor/: Megatron's column- and row-parallel linears, the vocabulary-parallel
embedding and cross-entropy (a vocabulary not divisible by tp, padded), and a whole GPT
sharded by shard_gpt (dropout on), against the dense layers in float64 at tp = 1..4:
outputs and the gradients of inputs and weights within 1e-12 (tests/mpi_workers/tp_worker.py,
one 4-rank launch)."""
import re

import pytest

from mpi_util import describe, run_mpi
from parallel.tensor import padded_vocab


def test_tp_layers_equal_dense_layers():
    proc = run_mpi(4, "tp_worker.py", timeout=120)
    assert proc.returncode == 0, describe(proc)
    got = {(int(t), case): float(e) for t, case, e in re.findall(r"^tp=(\d) (\S+) err=(\S+)$", proc.stdout, re.M)}
    assert sorted(got) == sorted((t, c) for t in range(1, 5) for c in ("mlp", "vocab-g1", "vocab-g8", "gpt", "gpt-tokens", "gpt-sparse")), \
        describe(proc)
    assert max(got.values()) < 1e-12, got


@pytest.mark.parametrize("V,tp,granule,want", [(37, 1, 1, 37), (37, 2, 1, 38), (37, 4, 8, 64), (64, 4, 8, 64)])
def test_padded_vocab(V, tp, granule, want):
    assert padded_vocab(V, tp, granule) == want and want % (tp * granule) == 0


def test_shard_gpt_refuses_what_does_not_split():
    from parallel.tensor.model import TensorParallelError, check_config
    from models.gpt import GPTConfig
    with pytest.raises(TensorParallelError, match="n_head"):
        check_config(GPTConfig(n_head=4, n_embd=16), 3)
    with pytest.raises(TensorParallelError, match="sparse QKV"):
        check_config(GPTConfig(n_head=4, n_embd=16, qkv_modules=4), 2)
    with pytest.raises(TensorParallelError, match="whole blocks of 16 units: its 4 blocks"):
        check_config(GPTConfig(n_head=8, n_embd=16, ffn_sparsity=16), 8)
    check_config(GPTConfig(n_head=8, n_embd=16, ffn_sparsity=16), 4)
    check_config(GPTConfig(n_head=4, n_embd=16), 4)


def test_tp_composed_by_build_step_equals_one_process():
    """tp 2 and 4 alone and with grad-accum; tp2 x dp2 at ZeRO 0-3; tp2 x pp2 with every schedule;
    tp2 x sp2 ring and Ulysses; tp2 x pp2 x dp2; sequence-parallel regions (--tp-token-shards) at
    tp 2 and 4, with grad-accum, ZeRO 1-3 and dp 2: 5 steps in float64 with dropout 0.1 and a
    vocabulary tp does not divide give one process's losses, gradient norms and validation loss,
    and each rank's parameter slices (tests/mpi_workers/tp_step_worker.py, one 8-rank launch)."""
    proc = run_mpi(8, "tp_step_worker.py", timeout=240)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    got = {tag: (float(e), float(p)) for tag, e, p in re.findall(r"^CASE (\S+) err=(\S+) perr=(\S+)$", proc.stdout,
                                                                   re.M)}
    want = {"tp2", "tp2-ga2", "tp4", "tp2pp2dp2-z1", *(f"tp2dp2-z{z}" for z in range(4)),
            *(f"tp2pp2-{s}" for s in ("1f1b", "zb-h1", "interleaved", "gpipe")), "tp2sp2-ring", "tp2sp2-ulysses",
            "tp2-tokens", "tp4-tokens-ga2", "tp2dp1-tokens-z3", "tp2dp2-tokens-z2", "tp2dp2-tokens-z1",
            "tp2-sparse", "tp2dp2-sparse-z2", "tp2pp2-sparse-zb-h1"}
    assert set(got) == want, describe(proc)
    assert all(e < 1e-10 and p < 1e-10 for e, p in got.values()), got
