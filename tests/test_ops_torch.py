"""Fused ops against PyTorch in float32: outputs and every input gradient, same inputs, same
random upstream gradient. PyTorch is the independent oracle here, not a dependency."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle, extra 'test') is not installed")
F = torch.nn.functional

from engine import ops  # noqa: E402
from engine.autograd import Tensor  # noqa: E402
from engine.backend import to_device, to_numpy  # noqa: E402

R = np.random.default_rng(7)


def f32(*shape, scale=1.0):
    return (R.standard_normal(shape) * scale).astype(np.float32)


def compare(ours, theirs, *inputs, consts=(), rtol=1e-5, atol=1e-5):
    """Run ours on engine Tensors and theirs on torch tensors; compare output and grads."""
    ts = [Tensor(to_device(a), requires_grad=True) for a in inputs]
    ps = [torch.tensor(a, requires_grad=True) for a in inputs]
    out, ref = ours(*ts), theirs(*ps)
    assert out.dtype == np.float32
    np.testing.assert_allclose(to_numpy(out.data), ref.detach().numpy(), rtol=rtol, atol=atol)
    g = f32(*ref.shape)
    if ref.numel() == 1:
        out.backward()
        ref.backward()
    else:
        out.backward(to_device(g))
        ref.backward(torch.tensor(g))
    for i, (t, p) in enumerate(zip(ts, ps)):
        assert t.grad.dtype == np.float32
        np.testing.assert_allclose(to_numpy(t.grad), p.grad.numpy(), rtol=rtol, atol=atol, err_msg=f"input {i}")


def test_linear():
    compare(ops.linear, F.linear, f32(4, 6, 32), f32(48, 32), f32(48))
    compare(ops.linear, F.linear, f32(10, 32), f32(16, 32))


def test_layer_norm():
    compare(ops.layer_norm, lambda x, w, b: F.layer_norm(x, (64,), w, b, 1e-5),
            f32(4, 6, 64, scale=3) + 2, f32(64), f32(64))


def test_gelu():
    compare(ops.gelu, lambda x: F.gelu(x, approximate="tanh"), f32(8, 128, scale=3))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy(reduction):
    targets = R.integers(0, 65, (4, 16))
    targets[0, :5] = -1
    t = to_device(targets)
    compare(lambda z: ops.cross_entropy(z, t, ignore_index=-1, reduction=reduction),
            lambda z: F.cross_entropy(z.reshape(-1, 65), torch.tensor(targets).reshape(-1), ignore_index=-1,
                                      reduction=reduction),
            f32(4, 16, 65, scale=5))


def test_embedding():
    idx = R.integers(0, 20, (4, 9))
    compare(lambda w: ops.embedding(to_device(idx), w), lambda w: F.embedding(torch.tensor(idx), w), f32(20, 16))


@pytest.mark.parametrize("causal,T,block_size", [(True, 64, 256), (False, 48, 256), (True, 70, 16), (False, 33, 8)])
def test_attention(causal, T, block_size):
    compare(lambda q, k, v: ops.attention(q, k, v, causal=causal, block_size=block_size),
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            f32(2, 4, T, 32), f32(2, 4, T, 32), f32(2, 4, T, 32), atol=2e-5)


def test_attention_lse():
    q, k = f32(2, 3, 20, 8), f32(2, 3, 20, 8)
    out, lse = ops.attention(Tensor(to_device(q)), Tensor(to_device(k)), Tensor(to_device(k)), block_size=4,
                             return_lse=True)
    s = torch.tensor(q) @ torch.tensor(k).transpose(-1, -2) / np.sqrt(8)
    s = s.masked_fill(torch.ones(20, 20, dtype=torch.bool).triu(1), float("-inf"))
    np.testing.assert_allclose(to_numpy(lse), torch.logsumexp(s, -1).numpy(), rtol=1e-5, atol=1e-5)


def test_matmul_broadcast():
    compare(ops.matmul, torch.matmul, f32(2, 1, 5, 8), f32(3, 8, 4))
