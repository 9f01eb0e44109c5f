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
    assert sorted(got) == sorted((t, c) for t in range(1, 5) for c in ("mlp", "vocab-g1", "vocab-g8", "gpt")), \
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
    with pytest.raises(TensorParallelError, match="sparse"):
        check_config(GPTConfig(n_head=4, n_embd=16, ffn_sparsity=4), 2)
    check_config(GPTConfig(n_head=4, n_embd=16), 4)
