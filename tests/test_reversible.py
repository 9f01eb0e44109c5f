"""engine/reversible.py in float64: the reversible stack's gradients equal ordinary autograd of
the same two-stream network with stored activations (engine.reversible.stored) within 1e-10 at
depth 1, 4 and 12 with dropout (and, at depth 4, the sparse FFN's and sparse QKV's noise and LSH
attention's rotations), its inverse gives the inputs back within 1e-12, one block passes the
finite-difference gradcheck, and an odd channel count is refused in one line."""
import numpy as np
import pytest

from engine.autograd import Tensor, no_grad
from engine.backend import to_device, to_numpy
from engine.reversible import ReversibleError, invert, reversible, stored
from gradcheck import check_grad
from models.gpt import GPTConfig
from models.terraformer import Terraformer

DENSE = dict(dropout=0.1)
SPARSE = dict(dropout=0.1, ffn_sparsity=8, ffn_lowrank=4, ffn_temperature=0.5, ffn_hard_prob=0.5, qkv_modules=4,
              attention="lsh", lsh_chunk=4, lsh_buckets=4)


def blocks(depth, extra, streams="copy", width=16):
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=depth, n_head=2, n_embd=width, reversible=True,
                    rev_streams=streams, **extra)
    model = Terraformer(cfg, rng=3).astype("float64")
    model.noise.set_step(5)
    return model, list(model.blocks)


def run(fn, x, layers, noise, g):
    """(output, input grad, {param name: grad}) of fn(x, layers) with upstream gradient g."""
    for p in (p for b in layers for p in b.parameters()):
        p.grad = None
    xt = Tensor(to_device(x), requires_grad=True)
    with noise.located(rows=np.array([4, 7]), pos=np.arange(8)):
        y = fn(xt, layers)
    y.backward(to_device(g))
    return to_numpy(y.data), to_numpy(xt.grad), [np.array(to_numpy(p.grad)) for b in layers for p in b.parameters()]


@pytest.mark.parametrize("depth, extra, streams", [(1, DENSE, "copy"), (4, SPARSE, "split"), (12, DENSE, "copy")])
def test_gradients_equal_stored_activations(depth, extra, streams):
    model, layers = blocks(depth, extra, streams, width=32 if streams == "split" else 16)
    rng = np.random.default_rng(depth)
    C = 32                                                                 # the pair: 2 x 16 channels
    x, g = rng.standard_normal((2, 8, C)), rng.standard_normal((2, 8, C))
    rev = run(lambda t, ls: reversible(t, ls, rng=model.noise), x, layers, model.noise, g)
    ref = run(stored, x, layers, model.noise, g)
    rel = lambda a, b: float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))
    assert rel(rev[0], ref[0]) < 1e-13
    assert rel(rev[1], ref[1]) < 1e-10
    worst = max(rel(a, b) for a, b in zip(rev[2], ref[2]) if np.any(b))
    assert worst < 1e-10, worst
    assert sum(bool(np.any(b)) for b in ref[2]) >= len(ref[2]) - depth * 3   # grads reach (almost) all
    assert model.noise.state().step == 5                                   # the cursor came back


def test_dropout_masks_differ_by_step():
    """The recomputation must redraw the masks of the forward's step: another step gives other outputs."""
    model, layers = blocks(2, DENSE)
    x = np.random.default_rng(0).standard_normal((2, 8, 32))
    with no_grad():
        a = to_numpy(reversible(Tensor(to_device(x)), layers, rng=model.noise).data)
        model.noise.set_step(6)
        b = to_numpy(reversible(Tensor(to_device(x)), layers, rng=model.noise).data)
    assert np.max(np.abs(a - b)) > 1e-3


@pytest.mark.parametrize("depth", [1, 12])
def test_inverse_reconstructs_the_inputs(depth):
    model, layers = blocks(depth, DENSE)
    x = np.random.default_rng(1).standard_normal((2, 8, 32))
    with no_grad():
        y = reversible(Tensor(to_device(x)), layers, rng=model.noise).data
        back = to_numpy(invert(y, layers))
        y = to_numpy(y)
    assert np.max(np.abs(back - x)) < 1e-12
    assert np.max(np.abs(y - x)) > 1e-2


def test_one_block_gradcheck():
    model, layers = blocks(1, DENSE, width=8)
    x = np.random.default_rng(2).standard_normal((1, 4, 16))
    with model.noise.located(rows=np.array([0]), pos=np.arange(4)):
        check_grad(lambda t: reversible(t, layers, rng=model.noise), x, atol=1e-7, rtol=1e-6)


def test_odd_channels_are_refused():
    _, layers = blocks(1, DENSE)
    with pytest.raises(ReversibleError, match="splits its 31 channels into two equal streams: 31 is odd"):
        reversible(Tensor(to_device(np.zeros((1, 8, 31))), requires_grad=True), layers)
