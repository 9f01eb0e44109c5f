"""The Terraformer model (models/terraformer.py): the sparse loss layer against a dense
reconstruction of its factored weights; train.py under dp 2 with ZeRO 0-3 equals one process
within 1e-10 (float64, 5 steps, dropout and LSH rotations on; tests/mpi_workers/terra_cli.py
runs every case in ONE 3-rank launch); its checkpoints consolidate and sample.py decodes them."""
import contextlib
import io
import re

import numpy as np
import pytest

from engine.autograd import Tensor
from engine.backend import to_device, to_numpy
from models.sparse_loss import SparseLoss
from mpi_util import describe, metrics, run_errors, run_mpi


@pytest.mark.parametrize("V, S", [(13, 4), (16, 4), (7, 1)])
def test_sparse_loss_equals_its_dense_reconstruction(V, S):
    rng = np.random.default_rng(V)
    layer = SparseLoss(6, V, S, rng=rng).astype("float64")
    layer.b.data[:] = rng.standard_normal(layer.b.shape)
    x = Tensor(to_device(rng.standard_normal((2, 3, 6))), requires_grad=True)
    g = rng.standard_normal((2, 3, V))
    logits = layer(x)
    logits.backward(to_device(g))
    W = to_numpy(layer.dense())                                         # (V, d)
    assert W.shape == (V, 6)
    xh, b = to_numpy(x.data), to_numpy(layer.b.data)
    assert np.max(np.abs(to_numpy(logits.data) - (xh @ W.T + b[:V]))) < 1e-13
    assert np.max(np.abs(to_numpy(x.grad) - g @ W)) < 1e-13
    dW = np.zeros((S * layer.M, 6))
    dW[:V] = g.reshape(-1, V).T @ xh.reshape(-1, 6)                     # dL/dW, padded rows 0
    dW = dW.reshape(S, layer.M, 6)                                      # [s, m, i]
    D, E = to_numpy(layer.D.data), to_numpy(layer.E.data)               # (S, d), (d, M)
    assert np.max(np.abs(to_numpy(layer.D.grad) - np.einsum("smi,im->si", dW, E))) < 1e-12
    assert np.max(np.abs(to_numpy(layer.E.grad) - np.einsum("smi,si->im", dW, D))) < 1e-12
    db = np.zeros(S * layer.M)
    db[:V] = g.reshape(-1, V).sum(0)
    assert np.max(np.abs(to_numpy(layer.b.grad) - db)) < 1e-12
    assert layer.num_parameters() == 6 * S + 6 * layer.M + S * layer.M


TINY = ["--n-layer", "3", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "5", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0", "--dropout", "0.1",
        "--reversible", "--attention", "lsh", "--lsh-chunk", "8", "--lsh-buckets", "4", "--lsh-hashes", "2",
        "--loss-sparsity", "4"]
AGAINST = {"dp2-z3": "ref", "dp2-z0": "ref", "dp2-z1-split": "ref-split", "dp2-z2-split": "ref-split",
           "dp2-z3-plain": "ref-plain"}
KEYS = ("loss", "grad_norm", "val_loss")


def test_terraformer_under_dp_and_zero_equals_one_process(corpus, tmp_path):
    from parallel.checkpoint import consolidate
    import consolidate as consolidate_py
    import sample
    proc = run_mpi(3, "terra_cli.py", tmp_path, corpus, *TINY, timeout=300)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    rcs = dict(re.findall(r"^CASE (\S+) rc=(\d+)$", proc.stdout, re.M))
    refs = sorted(set(AGAINST.values()))
    assert rcs == {t: "0" for t in [*refs, *AGAINST]}, describe(proc)
    ref_metrics = {t: metrics(tmp_path / f"{t}.jsonl") for t in refs}
    params = {t: consolidate(str(tmp_path / t)) for t in refs}
    assert ref_metrics["ref"][5]["loss"] != ref_metrics["ref-split"][5]["loss"] != ref_metrics["ref-plain"][5]["loss"]
    assert any(n.startswith("lm_head.") for n in params["ref"]) and any(".attn.c_qv." in n for n in params["ref"])
    worst = {}
    for tag, against in AGAINST.items():
        assert sorted(ref_metrics[against]) == [1, 2, 3, 4, 5], tag
        worst[tag] = err, perr = run_errors(str(tmp_path), tag, ref_metrics[against], params[against], KEYS)
        assert err < 1e-10 and perr < 1e-10, (tag, err, perr)
    print(worst)
    # the checkpoint of a dp 2 ZeRO-3 run: one file, and sample.py decodes it (KV cache, LSH buckets)
    out = tmp_path / "ref.safetensors"
    assert consolidate_py.main([str(tmp_path / "dp2-z3"), str(out)]) == 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert consolidate_py.main([str(tmp_path / "dp2-z3"), str(tmp_path / "hf"), "--hf"]) == 2
    assert "no Terraformer layers" in err.getvalue() and not (tmp_path / "hf").exists()
    texts = []
    for ckpt in (str(tmp_path / "dp2-z3"), str(out)):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert sample.main(["--ckpt", ckpt, "--prompt", "1 squared", "--max-new-tokens", "20",
                                "--temperature", "0"]) == 0
        texts.append(buf.getvalue())
    assert texts[0] == texts[1] and texts[0].startswith("1 squared") and len(texts[0]) > 25
