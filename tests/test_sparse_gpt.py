"""GPT with the sparse layers of Jaszczur et al. 2021 (GPTConfig.ffn_sparsity, qkv_modules):
cached decoding equals the full forward, step by step and token by token; every parameter is
registered and initialised from the model's seed; the sparse FFN's noise comes from the model's
generator (same seed, same run); Hugging Face export refuses; train.py takes the flags."""
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.autograd import no_grad
from engine.backend import to_numpy
from models.generate import KVCache, next_logits
from models.gpt import GPT, GPTConfig

SMALL = dict(block_size=12, vocab_size=23, n_layer=2, n_head=2, n_embd=16)
VARIANTS = {"dense": {}, "sparse_ff": dict(ffn_sparsity=8, ffn_lowrank=4),
            "sparse_qkv": dict(qkv_modules=4), "both": dict(ffn_sparsity=8, ffn_lowrank=4, qkv_modules=4)}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model(variant, seed=0, dtype="float64", **kw):
    m = GPT(GPTConfig(**SMALL, **VARIANTS[variant], **kw), rng=seed)
    for p in m.parameters():                          # larger weights: peaked logits, varied tokens
        p.data *= 3.0
    return m.astype(dtype).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_equals_the_full_forward(variant):
    m = model(variant)
    idx = np.random.default_rng(1).integers(0, 23, (1, 10))
    with no_grad():
        full, _ = m(idx)                              # (1, 10, V)
        caches = [KVCache(12) for _ in m.blocks]
        steps = [next_logits(m, idx[:, :4], caches)] + [next_logits(m, idx[:, t:t + 1], caches) for t in range(4, 10)]
    np.testing.assert_allclose(np.stack([s[0] for s in steps]), to_numpy(full.data[0, 3:]), rtol=1e-9, atol=1e-9)
    greedy = m.generate(idx[0, :3], 15, temperature=0)           # slides past block_size 12
    assert np.array_equal(greedy, m.generate(idx[0, :3], 15, temperature=0, use_cache=False))
    assert len(set(greedy.tolist())) > 3


def test_decode_never_computes_the_dense_ffn(monkeypatch):
    import models.sparse_ffn as sf
    m = model("both")
    calls = []
    monkeypatch.setattr(sf.SparseFFNFunction, "forward", lambda *a, **k: calls.append(1) / 0)
    m.generate(np.array([1, 2]), 5, temperature=0)                # prefill of 2 rows < N, then 1 row each
    assert calls == []


def test_parameters_registered_and_deterministic_from_the_seed():
    a, b, c = (GPT(GPTConfig(**SMALL, **VARIANTS["both"]), rng=s) for s in (7, 7, 8))
    names = [n for n, _ in a.named_parameters()]
    for part in ("mlp.w1", "mlp.w2", "mlp.b2", "mlp.c1", "mlp.c2", "mlp.cb", "attn.sparse_qkv.D",
                 "attn.sparse_qkv.E", "attn.sparse_qkv.wq", "attn.sparse_qkv.wk", "attn.sparse_qkv.wv"):
        assert f"transformer.h.1.{part}" in names
    assert not any("c_attn" in n or "c_fc" in n for n in names)
    seen = {id(p) for p in a.parameters()}
    for _, mod in a.named_modules():                  # nothing learnable hides outside named_parameters
        for v in vars(mod).values():
            if hasattr(v, "requires_grad") and getattr(v, "requires_grad"):
                assert id(v) in seen
    for (n1, p1), (_, p2), (_, p3) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert np.array_equal(p1.data, p2.data), n1
    assert not all(np.array_equal(p1.data, p3.data) for p1, p3 in zip(a.parameters(), c.parameters()))


def train_losses(seed, steps=6):
    m = GPT(GPTConfig(**SMALL, **VARIANTS["both"], ffn_hard_prob=0.5), rng=seed)
    data = np.random.default_rng(0).integers(0, 23, (4, 13))      # one batch, fitted
    out = []
    for _ in range(steps):
        _, loss = m(data[:, :-1], data[:, 1:])
        loss.backward()
        out.append((loss.item(), m.transformer.h[0].mlp.c2.grad.copy()))
        for p in m.parameters():
            p.data -= 0.5 * p.grad
            p.grad = None
    return out


def test_training_noise_is_reproducible_from_the_seed():
    a, b, c = train_losses(3), train_losses(3), train_losses(4)
    for (la, ga), (lb, gb) in zip(a, b):
        assert la == lb and np.array_equal(ga, gb)
    assert [x[0] for x in a] != [x[0] for x in c]
    assert a[-1][0] < a[0][0]


def test_config_validation():
    for bad in (dict(ffn_sparsity=3), dict(qkv_modules=5), dict(ffn_sparsity=-1), dict(ffn_sparsity=8, ffn_hard_prob=2.0)):
        with pytest.raises(ValueError, match="GPTConfig"):
            GPTConfig(**SMALL, **bad)


def test_hugging_face_export_refuses_sparse_models(tmp_path):
    from models.hf import save_hf
    with pytest.raises(ValueError, match="no sparse or Terraformer layers"):
        save_hf(model("sparse_ff"), str(tmp_path))
    assert not os.listdir(tmp_path)


def test_train_py_takes_the_sparse_flags(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus), "--tokenizer", "char",
                        "--max-steps", "2", "--batch-size", "2", "--block-size", "16", "--n-layer", "1",
                        "--n-embd", "32", "--n-head", "2", "--ffn-sparsity", "16", "--ffn-lowrank", "8",
                        "--qkv-modules", "4", "--eval-iters", "1", "--out-dir", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "ffn_sparsity': 16" in r.stdout and "qkv_modules': 4" in r.stdout
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--data", str(corpus), "--ffn-sparsity", "7",
                        "--out-dir", str(tmp_path / "bad")], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "ffn_sparsity" in r.stderr and len(r.stderr.strip().splitlines()) == 1
