"""engine/ops/lsh_attention.py in float64: the chunked kernel equals its reference mode (full
attention under the same bucket-and-chunk mask, by autograd on engine ops) within 1e-12 forward
and backward; with one bucket and one chunk it is full causal attention; the Terraformer's LSH
layers give the same outputs whatever rows of the batch a rank holds (dp); decoding with the
cache (unit keys, values, buckets) gives the tokens decoding without one gives."""
import numpy as np
import pytest

from engine.autograd import Tensor, no_grad
from engine.ops.attention import attention
from engine.ops.lsh_attention import lsh_attention, lsh_buckets
from models.generate import KVCache, next_logits
from models.gpt import GPTConfig
from models.terraformer import Terraformer


def grads(qk, v, buckets, chunk, g, **kw):
    q, vt = Tensor(qk.copy(), requires_grad=True), Tensor(v.copy(), requires_grad=True)
    o = lsh_attention(q, vt, buckets, chunk, **kw)
    o.backward(g)
    return o.data, q.grad, vt.grad


# (T, chunk, rounds, buckets, mask_self): T not a multiple of the chunk pads
CASES = [(24, 4, 2, 4, True), (22, 4, 2, 4, True), (16, 8, 3, 2, True), (16, 4, 1, 8, False), (9, 4, 2, 6, True)]


@pytest.mark.parametrize("T, c, R, nb, mask_self", CASES)
def test_chunked_equals_reference_mode(T, c, R, nb, mask_self):
    rng = np.random.default_rng(T * 10 + R)
    B, H, D = 2, 2, 8
    qk, v, g = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    b = lsh_buckets(qk, rng.standard_normal((R, D, nb // 2)))
    assert len(np.unique(b)) > 1
    fast = grads(qk, v, b, c, g, mask_self=mask_self)
    ref = grads(qk, v, b, c, g, mask_self=mask_self, reference=True)
    for a, r in zip(fast, ref):
        assert np.max(np.abs(a - r)) < 1e-12
    other = grads(qk, v, lsh_buckets(qk, rng.standard_normal((R, D, nb // 2))), c, g, mask_self=mask_self)
    assert np.max(np.abs(other[0] - fast[0])) > 1e-3                     # the buckets matter


def test_float32_stays_float32():
    rng = np.random.default_rng(5)
    qk, v, g = (rng.standard_normal((1, 2, 12, 8)).astype(np.float32) for _ in range(3))
    out = grads(qk, v, lsh_buckets(qk, rng.standard_normal((2, 8, 2))), 4, g)
    assert [a.dtype for a in out] == [np.float32] * 3


def test_one_bucket_one_chunk_is_full_causal_attention():
    rng = np.random.default_rng(0)
    B, H, T, D = 2, 2, 16, 8
    q, v, g = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    o, dq, dv = grads(q, v, lsh_buckets(q, None), T, g, mask_self=False)
    norm = np.linalg.norm(q, axis=-1, keepdims=True)
    k = q / norm
    qt, kt, vt = (Tensor(a.copy(), requires_grad=True) for a in (q, k, v))
    ref = attention(qt, kt, vt, causal=True)
    ref.backward(g)
    dk = kt.grad
    assert np.max(np.abs(o - ref.data)) < 1e-12
    assert np.max(np.abs(dv - vt.grad)) < 1e-12
    assert np.max(np.abs(dq - qt.grad - (dk - k * (k * dk).sum(-1, keepdims=True)) / norm)) < 1e-12


def lsh_model(**kw):
    cfg = GPTConfig(**{**dict(block_size=16, vocab_size=13, n_layer=2, n_head=2, n_embd=16, dropout=0.1,
                              attention="lsh", lsh_chunk=4, lsh_buckets=4, reversible=True), **kw})
    return Terraformer(cfg, rng=1).astype("float64")


def test_outputs_do_not_depend_on_the_dp_split():
    model = lsh_model()
    model.noise.set_step(2)
    idx = np.random.default_rng(3).integers(0, 13, (4, 16))
    with no_grad():
        with model.noise.located(rows=np.arange(4)):
            whole = model(idx)[0].data
        parts = []
        for rows in ([0, 1], [2, 3]):
            with model.noise.located(rows=np.array(rows)):
                parts.append(model(idx[rows])[0].data)
    assert np.max(np.abs(np.concatenate(parts) - whole)) < 1e-12
    with no_grad(), model.noise.located(rows=np.array([2, 3])):
        assert np.max(np.abs(model(idx[:2])[0].data - whole[:2])) > 1e-3   # another row: other dropout


@pytest.mark.parametrize("kw", [dict(), dict(qkv_modules=4, ffn_sparsity=8, ffn_lowrank=4, loss_sparsity=3,
                                             rev_streams="split", n_embd=32)])
def test_decoding_with_the_cache_equals_decoding_without(kw):
    """One chunk per window (lsh_chunk = block_size): the chunked forward sees exactly the same-bucket
    keys the cached decode step sees, so every decoded position's logits agree, and so do the
    tokens generate() picks through a window slide."""
    model = lsh_model(lsh_chunk=16, lsh_buckets=2, **kw).eval()
    seq = np.random.default_rng(4).integers(0, 13, (2, 16))
    caches = [KVCache(16) for _ in model.blocks]
    with no_grad():
        got = [next_logits(model, seq[:, :5], caches)]
        got += [next_logits(model, seq[:, t:t + 1], caches) for t in range(5, 16)]
        want = [next_logits(model, seq[:, :t + 1]) for t in range(4, 16)]
    assert caches[0].buckets.shape == (2, 2, 2, 16)                     # (R, B, nh, t)
    assert len(np.unique(caches[0].buckets)) == 2
    assert max(float(np.max(np.abs(g - w))) for g, w in zip(got, want)) < 1e-12
    prompt = seq[:, :5]
    assert np.array_equal(model.generate(prompt, 20, temperature=0),
                          model.generate(prompt, 20, temperature=0, use_cache=False))
