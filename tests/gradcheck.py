"""The one gradient oracle for ops: central finite differences in float64.

For f = fn(*inputs) and a fixed random upstream gradient G (1 for a one-element output),
the autograd gradient of sum(f * G) with respect to each input must equal
(L(x + eps e_j) - L(x - eps e_j)) / (2 eps) for every element j.
"""
import numpy as np

from engine.autograd import Tensor, no_grad
from engine.backend import to_device, to_numpy


def check_grad(fn, *inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0):
    """Check fn's autograd gradients against finite differences.

    ``fn(*tensors) -> Tensor``; ``inputs`` are float arrays, each differentiated (in float64,
    on the active device). Constants (targets, indices, options) belong in ``fn``'s closure.
    Returns the analytic gradients as NumPy arrays."""
    xs = [np.array(to_numpy(x), dtype=np.float64) for x in inputs]      # private copies, perturbed in place
    tensors = [Tensor(to_device(x.copy()), requires_grad=True) for x in xs]
    out = fn(*tensors)
    upstream = np.random.default_rng(seed).standard_normal(out.shape)
    if out.size == 1:
        out.backward()
        upstream = np.ones(out.shape)
    else:
        out.backward(to_device(upstream))

    def loss(arrays):
        with no_grad():
            y = fn(*[Tensor(to_device(a)) for a in arrays])
        return float(np.sum(to_numpy(y.data) * upstream))

    grads = []
    for i, (x, t) in enumerate(zip(xs, tensors)):
        numeric = np.zeros_like(x)
        for j in range(x.size):
            orig = x.flat[j]
            x.flat[j] = orig + eps
            plus = loss(xs)
            x.flat[j] = orig - eps
            numeric.flat[j] = (plus - loss(xs)) / (2 * eps)
            x.flat[j] = orig
        analytic = np.zeros_like(x) if t.grad is None else to_numpy(t.grad)
        assert analytic.shape == x.shape, f"input {i}: grad shape {analytic.shape} != {x.shape}"
        np.testing.assert_allclose(analytic, numeric, atol=atol, rtol=rtol, err_msg=f"gradient of input {i}")
        grads.append(analytic)
    return grads
