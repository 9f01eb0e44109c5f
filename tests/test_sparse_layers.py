"""The sparse layers of Jaszczur et al. 2021 (models/sparse_ffn.py, models/sparse_qkv.py):
finite-difference gradients in float64 (tests/gradcheck.py), the straight-through controller
gradient against the same formula built from basic engine ops, the decode gather against the
masked dense product, causality of the length convolution and its cached context."""
import numpy as np
import pytest

from engine import ops
from engine.autograd import Tensor
from engine.backend import get_array_module, to_device, to_numpy as H
from models.sparse_ffn import SparseFFN, SparseFFNFunction, gather_forward
from models.sparse_qkv import ConvQKV, Multiplicative
from tests.gradcheck import check_grad

n, d, d_ff, N, r = 6, 5, 12, 4, 3          # nb = 3 blocks of 4 units


def ffn_arrays(seed=0):
    g = np.random.default_rng(seed)
    return dict(x=g.standard_normal((2, 3, d)), w1=g.standard_normal((d_ff, d)) * 0.5,
                w2=g.standard_normal((d_ff, d)) * 0.5, b2=g.standard_normal(d) * 0.1,
                c1=g.standard_normal((r, d)), c2=g.standard_normal((d_ff, r)), cb=g.standard_normal(d_ff) * 0.1)


NAMES = ("x", "w1", "w2", "b2", "c1", "c2", "cb")


def test_sparse_ffn_soft_mask_gradients_match_finite_differences():
    a = ffn_arrays()
    check_grad(lambda *t: SparseFFNFunction.apply(*t, N=N, hard=False), *(a[k] for k in NAMES))


def test_sparse_ffn_hard_mask_weight_gradients_match_finite_differences():
    a = ffn_arrays(1)
    noise = np.random.default_rng(5).gumbel(size=(n, d_ff // N, N)) * 0.1
    fixed = {k: Tensor(to_device(a[k])) for k in ("x", "c1", "c2", "cb")}            # the choice stays put

    def f(w1, w2, b2):
        return SparseFFNFunction.apply(fixed["x"], w1, w2, b2, fixed["c1"], fixed["c2"], fixed["cb"],
                                       N=N, hard=True, noise=to_device(noise))
    check_grad(f, a["w1"], a["w2"], a["b2"])


def reference_ffn(x, w1, w2, b2, c1, c2, cb, hard, noise):
    """The layer from basic engine ops, straight-through written out: one_hot + p - stop_grad(p)."""
    logits = ops.reshape(ops.matmul(ops.matmul(x, ops.transpose(c1, (1, 0))), ops.transpose(c2, (1, 0))) + cb,
                         (n, d_ff // N, N))
    e = ops.exp(logits - logits.data.max(axis=-1, keepdims=True))
    p = e / ops.sum(e, axis=-1, keepdims=True)
    if hard:
        sel = (logits.data + noise).argmax(axis=-1)
        mask = (sel[..., None] == get_array_module(sel).arange(N)).astype(x.dtype) + p - p.data   # value one-hot, gradient p's
    else:
        mask = p
    h = ops.reshape(ops.matmul(x, ops.transpose(w1, (1, 0))), (n, d_ff // N, N))
    hm = h * mask
    act = hm * (hm.data > 0)                                                     # relu
    return ops.matmul(ops.reshape(act, (n, d_ff)), w2) + b2


@pytest.mark.parametrize("hard", [True, False])
def test_sparse_ffn_gradients_equal_the_straight_through_formula_from_basic_ops(hard):
    a = ffn_arrays(2)
    a["x"] = a["x"].reshape(n, d)
    noise = np.random.default_rng(3).gumbel(size=(n, d_ff // N, N)) * 0.1
    up = np.random.default_rng(4).standard_normal((n, d))
    grads = []
    for fn in (lambda *t: SparseFFNFunction.apply(*t, N=N, hard=hard, noise=to_device(noise)),
               lambda *t: reference_ffn(*t, hard=hard, noise=to_device(noise))):
        ts = [Tensor(to_device(a[k].copy()), requires_grad=True) for k in NAMES]
        y = fn(*ts)
        y.backward(to_device(up))
        grads.append((H(y.data), [H(t.grad) for t in ts]))
    np.testing.assert_allclose(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    for name, g0, g1 in zip(NAMES, grads[0][1], grads[1][1]):
        np.testing.assert_allclose(g0, g1, rtol=1e-10, atol=1e-12, err_msg=name)
    assert np.abs(grads[0][1][5]).sum() > 0                                     # the controller learns


def test_gather_reads_the_chosen_units_and_equals_the_masked_dense_product():
    a = ffn_arrays(3)
    dense = H(SparseFFNFunction.apply(*(Tensor(to_device(a[k])) for k in NAMES), N=N, hard=True).data)
    np.testing.assert_allclose(H(gather_forward(*(to_device(a[k]) for k in NAMES), N=N)), dense, rtol=1e-12, atol=1e-12)
    # a unit no row chose cannot matter: poison it in W1 and W2
    logits = (a["x"].reshape(-1, d) @ a["c1"].T @ a["c2"].T + a["cb"]).reshape(n, -1, N)
    chosen = set((logits.argmax(-1) + np.arange(0, d_ff, N)).ravel().tolist())
    unused = [j for j in range(d_ff) if j not in chosen]
    assert unused
    a["w1"][unused], a["w2"][unused] = np.nan, np.nan
    assert np.isfinite(H(gather_forward(*(to_device(a[k]) for k in NAMES), N=N))).all()


def test_sparse_ffn_module_data_parallel_slices_reproduce_the_whole_batch():
    """Two 'ranks' holding half the batch each (rows), or half the tokens each (zigzag
    positions), located there in the counter-based generator, get the outputs one process
    gets: the same coin, and the Gumbel noise of their own rows and tokens."""
    from engine.random import CounterRNG
    hard_seen = set()
    for seed in range(8):                                           # some hard, some soft steps
        noise = CounterRNG(seed)
        layer = SparseFFN(d, d_ff, N=N, d_lowrank=r, hard_prob=0.5, rng=np.random.default_rng(0),
                          noise=noise, layer=1, temperature=1.0)
        hard_seen.add(noise.scalar(1, 3) < 0.5)
        x = np.random.default_rng(9).standard_normal((4, 4, d))
        whole = H(layer(Tensor(to_device(x))).data)
        parts = []
        for shard in range(2):
            with noise.located(rows=[2 * shard, 2 * shard + 1]):
                parts.append(H(layer(Tensor(to_device(x[2 * shard:2 * shard + 2]))).data))
        np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-6, atol=1e-6)
        for pos in ([0, 3], [1, 2]):                                # tokens split over two 'sp ranks'
            with noise.located(pos=pos):
                part = H(layer(Tensor(to_device(x[:, pos]))).data)
            np.testing.assert_allclose(part, whole[:, pos], rtol=1e-6, atol=1e-6)
    assert hard_seen == {True, False}


# -- sparse QKV -------------------------------------------------------------------------------
S, M = 3, 2


def test_multiplicative_dense_gradients_and_formula():
    g = np.random.default_rng(0)
    x, D, E, b = g.standard_normal((2, 3, 4)), g.standard_normal((S, 4)), g.standard_normal((4, M)), \
        g.standard_normal(S * M)                                       # D stored (S, d)
    z = H(Multiplicative.apply(*(Tensor(to_device(a)) for a in (x, D, E, b))).data)
    np.testing.assert_allclose(z, np.einsum("bti,si,im->btsm", x, D, E) + b.reshape(S, M), rtol=1e-12)
    check_grad(lambda *t: Multiplicative.apply(*t), x, D, E, b)


def conv_inputs(seed=0, B=2, T=4):
    g = np.random.default_rng(seed)
    return [g.standard_normal((B, T, S, M)), g.standard_normal((3, 3, M, M)), g.standard_normal((3, 3, M, M)),
            g.standard_normal((3, 1, M, M)), g.standard_normal(M), g.standard_normal(M), g.standard_normal(M)]


def dev(arrays):
    """Tensors of the arrays, on the active device."""
    return [Tensor(to_device(a)) for a in arrays]


def conv_reference(z, wq, wk, wv, bq, bk, bv):
    """Direct loops over the formula: causal over length, zero-padded over modules."""
    B, T, _, _ = z.shape
    out = np.zeros((B, T, 3, S, M))
    for i, (w, b) in enumerate(((wq, bq), (wk, bk), (wv, bv))):
        ks = w.shape[1]
        for t in range(T):
            for s in range(S):
                acc = b.copy()[None].repeat(B, 0)
                for a in range(3):
                    for c in range(ks):
                        tt, ss = t - 2 + a, s + c - (ks - 1) // 2
                        if tt >= 0 and 0 <= ss < S:
                            acc = acc + z[:, tt, ss] @ w[a, c]
                out[:, t, i, s] = acc
    return out.reshape(B, T, -1)


def test_conv_qkv_matches_the_formula_and_finite_differences():
    args = conv_inputs()
    np.testing.assert_allclose(H(ConvQKV.apply(*dev(args)).data), conv_reference(*args), rtol=1e-12)
    check_grad(lambda *t: ConvQKV.apply(*t), *args)


def test_conv_qkv_is_causal_and_its_context_continues_a_sequence():
    args = conv_inputs(1, T=6)
    full = H(ConvQKV.apply(*dev(args)).data)
    later = [a.copy() for a in args]
    later[0][:, 4:] += 1.0                                             # change positions 4, 5
    np.testing.assert_array_equal(H(ConvQKV.apply(*dev(later)).data[:, :4]), full[:, :4])
    z = args[0]                                                        # positions 3.. given z[1:3] as context
    tail = H(ConvQKV.apply(*dev([z[:, 3:]] + args[1:]), context=to_device(z[:, 1:3])).data)
    np.testing.assert_allclose(tail, full[:, 3:], rtol=1e-12)


def test_gather_in_chunks_equals_the_masked_dense_product_at_any_thread_count(monkeypatch):
    """More blocks than one gather chunk (models/sparse_ffn.py GATHER_BLOCKS): the chunked,
    threaded decode gather equals the masked dense product, bitwise alike at 1 and 2 threads
    (on the pool beside a 1-thread BLAS) and beside a 2-thread BLAS (chunks inline)."""
    from models import sparse_ffn
    from engine.threads import chunk_threads
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    g = np.random.default_rng(7)
    nb, dd, rr = sparse_ffn.GATHER_BLOCKS * 2 + 5, 6, 3                 # 3 chunks, the last one short
    units = 2 * nb
    a = dict(x=g.standard_normal((1, 1, dd)), w1=g.standard_normal((units, dd)), w2=g.standard_normal((units, dd)),
             b2=g.standard_normal(dd), c1=g.standard_normal((rr, dd)), c2=g.standard_normal((units, rr)),
             cb=g.standard_normal(units))
    dense = H(SparseFFNFunction.apply(*(Tensor(to_device(a[k])) for k in NAMES), N=2, hard=True).data)
    outs = []
    spread = []
    for threads, blas in (("1", "1"), ("2", "1"), ("2", "2")):
        monkeypatch.setenv("ENGINE_THREADS", threads)
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", blas)
        spread.append(chunk_threads(nb, sparse_ffn.GATHER_BLOCKS, sparse_ffn.SPREAD_BESIDE_BLAS))
        outs.append(H(gather_forward(*(to_device(a[k]) for k in NAMES), N=2)))
    assert spread == [1, 2, 1]                                         # pooled only beside a 1-thread BLAS
    np.testing.assert_allclose(outs[0], dense, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
