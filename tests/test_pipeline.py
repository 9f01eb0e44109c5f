"""Pipeline parallelism (parallel/pipeline/executor.py): the B/W split of engine/autograd.py against a
plain backward, then one mpiexec launch per layout (pp = 2, pp = 4, pp = 2 x dp = 2, pp = 4 x dp = 2) running
every schedule for 5 float64 AdamW steps against one process within 1e-10, and the bad
layouts (one line, the same on every rank) — tests/mpi_workers/pipeline_equiv.py."""
import numpy as np
import pytest

from engine.autograd import Tensor, run_deferred
from models.gpt import GPT, GPTConfig
from mpi_util import describe, run_mpi
from parallel.pipeline.stage import PipelineConfigError, check_config, layer_ranges


def test_split_backward_equals_plain_backward():
    cfg = GPTConfig(block_size=8, vocab_size=29, n_layer=2, n_head=2, n_embd=8)
    rng = np.random.default_rng(1)
    x = rng.integers(0, 29, size=(3, 8))
    y = rng.integers(0, 29, size=(3, 8))
    grads = []
    for split in (False, True):
        m = GPT(cfg, np.random.default_rng(0)).astype("float64")
        h = Tensor(m.embed(x).data.copy(), requires_grad=True)       # a stage input: (B, T, C) leaf
        out = h
        for blk in m.blocks:
            out = blk(out)
        loss = m.head(out, y)[1]
        fired = []
        for p in m.parameters():
            p.register_grad_hook(lambda t, fired=fired: fired.append(t))
        if split:
            deferred = []
            loss.backward(deferred=deferred, inputs=(h,))
            assert h.grad is not None and deferred
            assert all(p.grad is None for p in m.parameters())      # B computed no weight gradient
            assert not fired
            run_deferred(deferred)
            assert not deferred
        else:
            loss.backward()
        used = [p for p in m.parameters() if p.grad is not None]
        assert len(fired) == len(used)                               # each hook once
        grads.append([h.grad] + [p.grad for p in m.parameters() if p is not m.transformer.wpe.weight])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-14)


def test_layout_checks():
    assert layer_ranges(8, 2, 2) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert layer_ranges(5, 2) == [(0, 2), (2, 5)]
    for args, words in [((2, 4, "1f1b", 4), "at least 4 layers"), ((8, 2, "interleaved", 4, 3), "divisible"),
                        ((8, 2, "interleaved", 3, 2), "micro_batches (3)"), ((8, 2, "1f1b", 4, 2), "interleaved"),
                        ((8, 2, "1f1b", 4, 1, 6), "does not split"), ((8, 2, "zb", 4), "unknown schedule")]:
        with pytest.raises(PipelineConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_config(*args)
    check_config(8, 2, "interleaved", 4, 2, batch_size=8)


@pytest.mark.parametrize("pp,dp", [(2, 1), (4, 1), (2, 2), (4, 2)])
def test_every_schedule_equals_one_process(pp, dp):
    proc = run_mpi(pp * dp, "pipeline_equiv.py", pp, dp, timeout=180)
    assert proc.returncode == 0, describe(proc)
    cases = [ln for ln in proc.stdout.splitlines() if ln.startswith("case ")]
    assert len(cases) == 6 and all(ln.endswith(" ok") for ln in cases), describe(proc)
    for name in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        assert any(f" {name} " in ln for ln in cases)
    bad = [ln for ln in proc.stdout.splitlines() if ln.startswith("bad ")]
    assert len(bad) == 4 and all(ln.endswith(" ok") for ln in bad), describe(proc)
    assert "0 failures" in proc.stdout, describe(proc)
