"""Every op's gradient against central finite differences (float64, tests/gradcheck.py), the
attention kernels against a naive softmax(QK^T)V, and the autograd contract (no_grad, graph
freed, upstream gradients, grad hooks, float32 kept float32)."""
import numpy as np
import pytest

from gradcheck import check_grad
from engine import ops
from engine.autograd import Tensor, no_grad
from engine.ops.attention import attention_bwd, attention_fwd
from engine.ops.fused import GELU
from engine.backend import to_device, to_numpy, xp

R = np.random.default_rng(1234)


def rand(*shape, low=None):
    x = R.standard_normal(shape)
    return np.abs(x) + low if low is not None else x


# -- elementwise, broadcasting -------------------------------------------------------------------
BROADCAST = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((4,), (2, 3, 4)), ((2, 3), ())]


@pytest.mark.parametrize("sa,sb", BROADCAST)
@pytest.mark.parametrize("op", [ops.add, ops.sub, ops.mul, ops.div])
def test_binary_broadcast(op, sa, sb):
    b = rand(*sb, low=0.5) if op is ops.div else rand(*sb)
    check_grad(op, rand(*sa), b)


def test_operators_and_scalars():
    check_grad(lambda a, b: (a + b) * a - b / (a * a + 1.0) + (-a) @ b.transpose(), rand(3, 3), rand(3, 3))
    check_grad(lambda a: 2.0 - a * 3 + 1 / (a + 5.0) + np.float64(2.0) * a, rand(2, 3, low=0.1))
    for p in (2, 3, 0.5, -1.5):
        check_grad(lambda a: a ** p, rand(2, 3, low=0.5))


@pytest.mark.parametrize("fn,low", [(ops.exp, None), (ops.log, 0.2), (ops.tanh, None)])
def test_unary(fn, low):
    check_grad(fn, rand(3, 4, low=low))


@pytest.mark.parametrize("sa,sb", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)),
                                   ((2, 1, 3, 4), (5, 4, 2)), ((4,), (4, 5)), ((3, 4), (4,)), ((4,), (4,))])
def test_matmul(sa, sb):
    check_grad(ops.matmul, rand(*sa), rand(*sb))


# -- shape ops -------------------------------------------------------------------------------------
def test_reshape_transpose():
    check_grad(lambda x: x.reshape(6, 4).transpose() * 1.0, rand(2, 3, 4))
    check_grad(lambda x: x.reshape((4, -1)), rand(2, 3, 4))
    check_grad(lambda x: x.transpose(2, 0, 1).reshape(4, 6), rand(2, 3, 4))
    check_grad(lambda x: ops.transpose(x, (1, 0, 2)), rand(2, 3, 4))
    check_grad(lambda x: ops.swapaxes(x, 0, -1), rand(2, 3, 4))


@pytest.mark.parametrize("index", [(slice(1, 3),), (1,), (Ellipsis, 2), (slice(None), slice(None, None, 2)),
                                   (np.array([0, 2, 0, 0]),), (slice(None), np.array([[1, 1], [0, 2]])),
                                   (np.array([True, False, True]),)])
def test_getitem(index):
    check_grad(lambda x: x[index], rand(3, 4))


def test_getitem_list_and_tensor_index():
    check_grad(lambda x: x[[0, 0, 2]], rand(3, 2))
    check_grad(lambda x: x[Tensor(to_device(np.array([1, 1])))], rand(3, 2))


def test_concat_split():
    check_grad(lambda a, b, c: ops.concat([a, b, c], axis=1), rand(2, 1, 3), rand(2, 3, 3), rand(2, 2, 3))
    check_grad(lambda a, b: ops.concat([a, b]) * 2.0, rand(2, 3), rand(1, 3))
    check_grad(lambda x: ops.concat(ops.split(x, 3, axis=-1)[::-1], axis=0), rand(2, 6))
    check_grad(lambda x: ops.split(x, [1, 3, 2], axis=1)[1], rand(2, 6))
    with pytest.raises(ValueError):
        ops.split(Tensor(to_device(np.zeros((2, 5)))), 2, axis=1)


@pytest.mark.parametrize("axis,keepdims", [(None, False), (0, False), (-1, True), ((0, 2), False), ([1], True)])
@pytest.mark.parametrize("fn", [ops.sum, ops.mean])
def test_reductions(fn, axis, keepdims):
    check_grad(lambda x: fn(x, axis=axis, keepdims=keepdims), rand(2, 3, 4))


# -- fused ops -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 3)])
def test_linear(shape):
    check_grad(ops.linear, rand(*shape), rand(4, 3), rand(4))
    check_grad(ops.linear, rand(*shape), rand(4, 3))


def test_layer_norm():
    check_grad(ops.layer_norm, rand(2, 3, 5) * 3 + 1, rand(5), rand(5), rtol=1e-4)
    check_grad(lambda x, w: ops.layer_norm(x, w, None), rand(4, 6), rand(6), rtol=1e-4)


def test_gelu():
    check_grad(ops.gelu, rand(3, 7) * 3)
    x = np.linspace(-5, 5, 11)
    ref = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    np.testing.assert_allclose(to_numpy(ops.gelu(Tensor(to_device(x))).data), ref, rtol=1e-12, atol=1e-15)


def test_gelu_keeps_its_derivative_not_its_input():
    """Forward keeps dy/dx (one array of x's size) and not x; without a graph it keeps nothing."""
    rng = np.random.default_rng(7)                 # its own draws: R's sequence feeds the tests below
    x = to_device(rng.standard_normal((4, 9)) * 3)
    fn = GELU()
    fn.needs_input_grad = (True,)
    fn.forward(x)
    kept = [v for v in vars(fn).values() if hasattr(v, "shape")]
    assert [v.shape for v in kept] == [x.shape]
    xh = to_numpy(x).copy()
    x[...] = 0                                   # backward must not read x
    g = to_device(rng.standard_normal((4, 9)))
    dx = fn.backward(g)[0]
    u = np.sqrt(2 / np.pi) * (xh + 0.044715 * xh ** 3)
    ref = 0.5 * (1 + np.tanh(u)) + 0.5 * xh * (1 - np.tanh(u) ** 2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * xh ** 2)
    np.testing.assert_allclose(to_numpy(dx), ref * to_numpy(g), rtol=1e-10, atol=1e-12)
    with no_grad():
        fn = GELU()
        fn.needs_input_grad = (True,)
        fn.forward(x)
    assert not [v for v in vars(fn).values() if hasattr(v, "shape")]


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 5)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-1, -100])
def test_cross_entropy(shape, reduction, ignore_index):
    targets = R.integers(0, 5, shape[:-1])
    targets.flat[[1, 4]] = ignore_index
    t = to_device(targets)
    check_grad(lambda z: ops.cross_entropy(z, t, ignore_index=ignore_index, reduction=reduction), rand(*shape) * 4)
    z = rand(*shape) * 20
    loss = to_numpy(ops.cross_entropy(Tensor(to_device(z)), t, ignore_index, reduction).data)
    z2, t2 = z.reshape(-1, shape[-1]), targets.reshape(-1)
    keep = t2 != ignore_index
    lse = np.log(np.exp(z2 - z2.max(1, keepdims=True)).sum(1)) + z2.max(1)
    li = np.where(keep, lse - z2[np.arange(len(t2)), np.where(keep, t2, 0)], 0)
    ref = {"mean": li.sum() / keep.sum(), "sum": li.sum(), "none": li.reshape(targets.shape)}[reduction]
    np.testing.assert_allclose(loss, ref, rtol=1e-12, atol=1e-15)


def test_cross_entropy_all_ignored_and_large_logits():
    z = Tensor(to_device(np.full((3, 4), 1e4, np.float32)), requires_grad=True)
    loss = ops.cross_entropy(z, np.full(3, -1))
    loss.backward()
    assert loss.item() == 0 and not z.grad.any()
    z = Tensor(to_device(np.array([[1e4, 0.0, -1e4]], np.float32)), requires_grad=True)
    loss = ops.cross_entropy(z, np.array([1]))
    loss.backward()
    assert np.isfinite(loss.item()) and abs(loss.item() - 1e4) < 1 and np.isfinite(z.grad).all()


def test_embedding():
    idx = to_device(np.array([[1, 3, 1], [0, 1, 3]], dtype=np.uint16))
    check_grad(lambda w: ops.embedding(idx, w), rand(5, 4))
    check_grad(lambda w: ops.embedding(to_device(np.arange(3)), w) * 2.0, rand(3, 2))


def test_dropout():
    rng = np.random.default_rng(0) if xp() is np else xp().random.RandomState(0)   # the device's own generator
    x = Tensor(to_device(np.ones((200, 50), np.float32)), requires_grad=True)
    y = ops.dropout(x, 0.25, rng)
    g = to_device(R.standard_normal((200, 50)).astype(np.float32))
    y.backward(g)
    yv, gx = to_numpy(y.data), to_numpy(x.grad)
    kept = yv != 0
    assert y.dtype == np.float32 and abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(yv[kept], 1 / 0.75, rtol=1e-6)
    np.testing.assert_allclose(gx, np.where(kept, to_numpy(g) / 0.75, 0), rtol=1e-6)   # same mask
    assert ops.dropout(x, 0.0, rng) is x and ops.dropout(x, 0.5, rng, training=False) is x


# -- attention ------------------------------------------------------------------------------------
def naive_attention(q, k, v, causal=True, scale=None, q_offset=0, k_offset=0):
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.swapaxes(-1, -2) * scale
    if causal:
        vis = (q_offset + np.arange(q.shape[2]))[:, None] >= (k_offset + np.arange(k.shape[2]))[None]
        s = np.where(vis, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l > 0, e @ v / np.where(l > 0, l, 1), 0), np.log(l[..., 0]) + m[..., 0]


ATTN = [  # (B, H, Tq, Tk, D, causal, q_offset, k_offset, block_size)
    (1, 2, 5, 5, 3, True, 0, 0, 256), (2, 1, 5, 5, 3, False, 0, 0, 256), (1, 2, 7, 7, 3, True, 0, 0, 3),
    (1, 1, 7, 7, 2, False, 0, 0, 2), (1, 2, 4, 6, 3, True, 5, 2, 4), (1, 1, 6, 4, 2, True, 1, 3, 3),
    (1, 1, 6, 4, 2, True, 1, 3, 256), (2, 1, 3, 8, 2, True, 8, 0, 3)]


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,qo,ko,bs", ATTN)
def test_attention_forward_matches_naive(B, H, Tq, Tk, D, causal, qo, ko, bs):
    q, k, v = rand(B, H, Tq, D), rand(B, H, Tk, D), rand(B, H, Tk, D)
    o, lse = ops.attention_forward(*map(to_device, (q, k, v)), causal, None, qo, ko, block_size=bs)
    o_ref, lse_ref = naive_attention(q, k, v, causal, None, qo, ko)
    np.testing.assert_allclose(to_numpy(o), o_ref, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(to_numpy(lse)), np.isneginf(lse_ref))
    np.testing.assert_allclose(to_numpy(lse)[np.isfinite(lse_ref)], lse_ref[np.isfinite(lse_ref)], atol=1e-12)


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,qo,ko,bs", ATTN)
def test_attention_grad(B, H, Tq, Tk, D, causal, qo, ko, bs):
    def fn(q, k, v):
        out, lse = ops.attention(q, k, v, causal=causal, scale=0.7, q_offset=qo, k_offset=ko, block_size=bs,
                                 return_lse=True)
        assert lse.shape == (B, H, Tq)
        return out
    check_grad(fn, rand(B, H, Tq, D), rand(B, H, Tk, D), rand(B, H, Tk, D))


@pytest.mark.parametrize("B,H,Tq,Tk,D,causal,qo,ko,bs", ATTN)
def test_attention_backward_kernel(B, H, Tq, Tk, D, causal, qo, ko, bs):
    """The blockwise recomputing backward (ring attention's kernel) equals the Function's grads."""
    q, k, v, do = (to_device(a) for a in (rand(B, H, Tq, D), rand(B, H, Tk, D), rand(B, H, Tk, D), rand(B, H, Tq, D)))
    o, lse = ops.attention_forward(q, k, v, causal, None, qo, ko, block_size=bs)
    grads = ops.attention_backward(q, k, v, o, lse, do, causal, None, qo, ko, block_size=bs)
    ts = [Tensor(a, requires_grad=True) for a in (q, k, v)]
    ops.attention(*ts, causal=causal, q_offset=qo, k_offset=ko).backward(do)
    for g, t in zip(grads, ts):
        np.testing.assert_allclose(to_numpy(g), to_numpy(t.grad), atol=1e-12)


@pytest.mark.parametrize("causal,qo,split,bs", [(True, 4, 3, 256), (False, 0, 4, 2), (True, 0, 2, 3), (True, 2, 5, 2)])
def test_merge_attention_equals_full(causal, qo, split, bs):
    q, k, v = (to_device(a) for a in (rand(2, 2, 4, 3), rand(2, 2, 7, 3), rand(2, 2, 7, 3)))
    o1, l1 = ops.attention_forward(q, k[:, :, :split], v[:, :, :split], causal, None, qo, 0, bs)
    o2, l2 = ops.attention_forward(q, k[:, :, split:], v[:, :, split:], causal, None, qo, split, bs)
    o, lse = ops.merge_attention(o1, l1, o2, l2)
    o_ref, lse_ref = ops.attention_forward(q, k, v, causal, None, qo, 0)
    np.testing.assert_allclose(to_numpy(o), to_numpy(o_ref), atol=1e-12)
    np.testing.assert_allclose(to_numpy(lse), to_numpy(lse_ref), atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_rows_far_apart(dtype):
    """Rows whose scores lie hundreds apart (the queries at position 2 300x larger): one shift for
    a whole head would underflow the other rows' exps to 0; each must still be its own softmax."""
    rng = np.random.default_rng(3)                 # its own draws: R's sequence feeds the other tests
    q, k, v, do = (rng.standard_normal(s) for s in ((3, 2, 6, 4), (3, 2, 6, 4), (3, 2, 6, 4), (3, 2, 6, 4)))
    q[:, :, 2] *= 300.0
    o_ref, lse_ref = naive_attention(q, k, v, True, None, 0, 0)
    o, lse, state = attention_fwd(*(to_device(a.astype(dtype)) for a in (q, k, v)), causal=True, keep_probs=True)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(to_numpy(o), o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(to_numpy(lse), lse_ref, rtol=tol, atol=tol)
    dq, dk, dv = attention_bwd(state, to_device(do.astype(dtype)))
    assert all(np.isfinite(to_numpy(g)).all() for g in (dq, dk, dv))
    ts = [Tensor(to_device(a), requires_grad=True) for a in (q, k, v)]       # float64, the same path
    ops.attention(*ts, causal=True).backward(to_device(do))
    for g, t in zip((dq, dk, dv), ts):
        np.testing.assert_allclose(to_numpy(g), to_numpy(t.grad), rtol=tol, atol=tol * 300)


def test_attention_row_without_keys():
    q, k, v = rand(1, 1, 3, 2), rand(1, 1, 2, 2), rand(1, 1, 2, 2)
    o, lse = ops.attention_forward(q, k, v, causal=True, q_offset=0, k_offset=1)   # row 0 sees nothing
    assert not to_numpy(o)[0, 0, 0].any() and np.isneginf(to_numpy(lse)[0, 0, 0])
    o, lse = ops.attention_forward(q, k, v, causal=True, q_offset=0, k_offset=9)   # nothing visible
    assert not to_numpy(o).any() and np.isneginf(to_numpy(lse)).all()


# -- dtype and the autograd contract --------------------------------------------------------------
def test_float32_stays_float32():
    f = lambda *s: Tensor(to_device(R.standard_normal(s).astype(np.float32)), requires_grad=True)  # noqa: E731
    x, w, b, q = f(2, 4, 8), f(8, 8), f(8), f(2, 2, 4, 4)
    h = ops.gelu(ops.linear(ops.layer_norm(x, b, b), w, b)) * np.float64(0.5) + 1.0
    h = (h.exp() / 2 + h.tanh() ** 2).mean(axis=-1, keepdims=True) * h
    a = ops.attention(q, q, q) + ops.attention(q, q, q, block_size=2)
    e = ops.embedding(np.array([[0, 3]]), w)
    loss = ops.cross_entropy(h, np.zeros((2, 4), int)) + a.sum() + e.sum()
    assert loss.dtype == np.float32
    loss.backward()
    for t in (x, w, b, q):
        assert t.grad.dtype == np.float32


def test_no_grad_records_nothing():
    x = Tensor(rand(2, 3), requires_grad=True)
    with no_grad():
        y = ops.gelu(x * 2 + 1).sum()
    assert y._fn is None and not y.requires_grad


def test_graph_freed_after_backward():
    x = Tensor(rand(2, 3), requires_grad=True)
    h = ops.tanh(x) * 3
    loss = h.sum()
    loss.backward()
    assert loss._fn is None and h._fn is None


def test_upstream_gradient():
    x = Tensor(rand(2, 3), requires_grad=True)
    g = rand(2, 3)
    (x * 3.0).backward(g)
    np.testing.assert_allclose(x.grad, 3 * g)


def test_grad_hook_called_once_when_complete():
    x = Tensor(rand(2, 3), requires_grad=True)
    seen = []
    x.register_grad_hook(lambda t: seen.append(t.grad.copy()))
    loss = (x * 2.0).sum() + (x * x).sum() + ops.gelu(x).sum()
    loss.backward()
    assert len(seen) == 1
    np.testing.assert_allclose(seen[0], x.grad)
    np.testing.assert_allclose(x.grad, check_grad(lambda t: (t * 2.0).sum() + (t * t).sum() + ops.gelu(t).sum(),
                                                  x.data)[0])
