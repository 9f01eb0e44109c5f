"""engine.nn, engine.flat and engine.optim: modules, flat buffers, optimizers against PyTorch."""
import math
import tracemalloc

import numpy as np
import pytest

from engine.autograd import Function, Tensor
from engine.backend import to_device as D, to_numpy as H
from engine.flat import FlatParameters, padded_size, shard_range
from engine.nn import Dropout, Embedding, LayerNorm, Linear, Module, ModuleList, Parameter
from engine.optim import SGD, AdamW, clip_grad_norm_, cosine_lr, grad_norm_sq

try:
    import torch
except ImportError:  # pragma: no cover
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch (the test oracle) is not installed")


def _has_ops():
    try:
        from engine.ops import embedding, layer_norm, linear  # noqa: F401
        return True
    except ImportError:
        return False


needs_ops = pytest.mark.skipif(not _has_ops(), reason="engine.ops (fused linear/layer_norm/embedding) not present")


class Block(Module):
    def __init__(self, rng):
        self.ln = LayerNorm(4)
        self.fc = Linear(4, 8, rng=rng)
        self.proj = Linear(8, 4, bias=False, rng=rng)


class TinyGPT(Module):
    """The layout that matters: embeddings, a ModuleList of blocks, a tied output head."""

    def __init__(self, rng=None, n_layer=2):
        rng = np.random.default_rng(0) if rng is None else rng
        self.wte = Embedding(10, 4, rng=rng)
        self.wpe = Embedding(6, 4, rng=rng)
        self.drop = Dropout(0.0)
        self.h = ModuleList(Block(rng) for _ in range(n_layer))
        self.ln_f = LayerNorm(4)
        self.lm_head = Linear(4, 10, bias=False, rng=rng)
        self.lm_head.weight = self.wte.weight          # tied (Press & Wolf 2017)


NAMES = ["wte.weight", "wpe.weight",
         "h.0.ln.weight", "h.0.ln.bias", "h.0.fc.weight", "h.0.fc.bias", "h.0.proj.weight",
         "h.1.ln.weight", "h.1.ln.bias", "h.1.fc.weight", "h.1.fc.bias", "h.1.proj.weight",
         "ln_f.weight", "ln_f.bias"]


# -- nn -------------------------------------------------------------------------------

def test_named_parameters_order_and_sharing():
    m = TinyGPT()
    assert [n for n, _ in m.named_parameters()] == NAMES
    assert len(m.parameters()) == len(NAMES)
    assert m.lm_head.weight is m.wte.weight
    assert [n for n, _ in m.named_modules()][:5] == ["", "wte", "wpe", "drop", "h"]
    assert [type(c).__name__ for c in m.children()] == ["Embedding", "Embedding", "Dropout", "ModuleList",
                                                       "LayerNorm", "Linear"]
    assert m.num_parameters() == 40 + 24 + 2 * (8 + 32 + 8 + 32) + 8
    assert len(m.h) == 2 and list(m.h)[1] is m.h[1]
    assert m.lm_head.bias is None


def test_init_and_decay_flags():
    m = Linear(64, 256, rng=np.random.default_rng(1))
    assert m.weight.shape == (256, 64) and m.weight.dtype == np.float32 and m.weight.decay
    assert abs(float(m.weight.data.std()) - 0.02) < 0.002 and not m.bias.data.any() and not m.bias.decay
    ln = LayerNorm(8, dtype="float64")
    assert (ln.weight.data == 1).all() and ln.weight.dtype == np.float64 and not ln.weight.decay
    assert not Embedding(3, 2).weight.decay and Embedding(3, 2, decay=True).weight.decay
    a, b = Linear(3, 3, rng=np.random.default_rng(5)), Linear(3, 3, rng=np.random.default_rng(5))
    assert np.array_equal(a.weight.data, b.weight.data)


def test_reassign_and_delete_keep_registry_consistent():
    m = Linear(2, 3)
    m.bias = None
    assert [n for n, _ in m.named_parameters()] == ["weight"]
    m.bias = Parameter(np.zeros(3, np.float32), decay=False)
    m.weight = Parameter(np.ones((3, 2), np.float32))
    assert [n for n, _ in m.named_parameters()] == ["weight", "bias"]     # kept its place
    del m.bias
    assert [n for n, _ in m.named_parameters()] == ["weight"]


def test_train_eval_propagate():
    m = TinyGPT()
    assert m.training and m.h[1].fc.training
    m.eval()
    assert not any(sub.training for _, sub in m.named_modules())
    m.train()
    assert all(sub.training for _, sub in m.named_modules())


def test_state_dict_is_live_and_load_is_in_place():
    m, other = TinyGPT(np.random.default_rng(0)), TinyGPT(np.random.default_rng(1))
    sd = m.state_dict()
    assert list(sd) == NAMES and sd["h.0.fc.weight"] is m.h[0].fc.weight.data
    before = {n: p.data for n, p in other.named_parameters()}
    missing, unexpected = other.load_state_dict({k: v.copy() for k, v in sd.items()})
    assert missing == [] and unexpected == []
    for n, p in other.named_parameters():
        assert p.data is before[n] and np.array_equal(p.data, sd[n])           # same arrays, new values


def test_load_state_dict_errors_are_one_line_and_change_nothing():
    m = TinyGPT()
    snapshot = {k: v.copy() for k, v in m.state_dict().items()}
    sd = {k: v.copy() + 1 for k, v in snapshot.items()}
    cases = [
        ({k: v for k, v in sd.items() if k != "ln_f.bias"}, "missing key 'ln_f.bias'"),
        ({**sd, "extra.weight": np.zeros(1)}, "unexpected key 'extra.weight'"),
        ({**sd, "h.1.fc.weight": np.zeros((4, 8))}, "shape mismatch for 'h.1.fc.weight'"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg) as e:
            m.load_state_dict(bad)
        assert "\n" not in str(e.value)
        for k, v in m.state_dict().items():
            assert np.array_equal(v, snapshot[k]), "a failed load must not modify the model"
    missing, unexpected = m.load_state_dict({"ln_f.bias": sd["ln_f.bias"], "junk": np.zeros(2)}, strict=False)
    assert "wte.weight" in missing and unexpected == ["junk"]
    assert np.array_equal(m.ln_f.bias.data, sd["ln_f.bias"])


def test_load_state_dict_accepts_tied_alias_and_casts():
    m = TinyGPT()
    sd = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    w = sd.pop("wte.weight") * 0 + 3.0
    sd["lm_head.weight"] = w                           # the HF-style name of the tied weight
    m.load_state_dict(sd)
    assert m.wte.weight.dtype == np.float32 and (m.wte.weight.data == 3).all()


def test_zero_grad_and_astype():
    m = TinyGPT().astype(np.float64)
    assert all(p.dtype == np.float64 for p in m.parameters()) and m.lm_head.weight is m.wte.weight
    m.h[0].fc.weight.grad = np.ones((8, 4))
    m.zero_grad()
    assert not m.h[0].fc.weight.grad.any()


def test_dropout_identity_when_off():
    x = Tensor(D(np.ones(5)))
    assert Dropout(0.0)(x) is x
    d = Dropout(0.5).eval()
    assert d(x) is x
    with pytest.raises(ValueError):
        Dropout(1.0)


@needs_ops
def test_layers_forward_and_backward_into_flat_buffer():
    rng = np.random.default_rng(0)
    lin, ln, emb = Linear(3, 5, dtype="float64", rng=rng), LayerNorm(5, dtype="float64"), Embedding(7, 3, dtype="float64", rng=rng)
    flat = FlatParameters([(f"{k}.{n}", p) for k, mod in (("emb", emb), ("lin", lin), ("ln", ln))
                           for n, p in mod.named_parameters()])
    idx = np.array([[1, 2, 6], [0, 6, 6]])
    y = ln(lin(emb(idx)))                                                   # (2, 3, 5)
    h = H(emb.weight.data)[idx] @ H(lin.weight.data).T + H(lin.bias.data)
    ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(H(y.data), ref, rtol=1e-10, atol=1e-12)
    up = np.random.default_rng(1).standard_normal(y.shape)
    y.backward(D(up))
    np.testing.assert_allclose(H(ln.bias.grad), up.sum((0, 1)), rtol=1e-12)
    gbuf = flat.grad["float64"]
    for p in (emb.weight, lin.weight, lin.bias, ln.weight, ln.bias):
        assert np.shares_memory(p.grad, gbuf) and np.abs(p.grad).sum() > 0
    assert not emb.weight.grad[[3, 4, 5]].any()                             # rows never looked up


# -- flat buffers ---------------------------------------------------------------------

class Scale(Function):
    """y = x * c: a one-op graph to push gradients through autograd into the buffers."""

    def forward(self, x, c):
        self.c = c
        return x * c

    def backward(self, grad):
        return (grad * self.c,)


def test_flat_views_both_ways_and_index():
    m = TinyGPT()
    values = {n: p.data.copy() for n, p in m.named_parameters()}
    flat = FlatParameters(m.named_parameters())
    buf = flat.data["float32"]
    assert flat.data[np.float32] is buf and flat.dtypes == ["float32"] and buf.size == flat.numel["float32"] == 232
    off = 0
    for n, p in m.named_parameters():
        dt, o, k, shape = flat.index[n]
        assert (dt, o, k, shape) == ("float32", off, p.size, p.shape)
        assert np.array_equal(buf[o:o + k].reshape(shape), values[n])
        off += k
    m.h[1].fc.weight.data[2, 3] = 42.0                     # param -> buffer
    dt, o, _, _ = flat.index["h.1.fc.weight"]
    assert buf[o + 2 * 4 + 3] == 42.0
    buf[:] = 7.0                                           # buffer -> params (tied head too)
    assert (m.lm_head.weight.data == 7).all() and (m.h[0].ln.bias.data == 7).all()
    flat.check_views()
    mask = flat.decay_mask["float32"]
    for n, p in m.named_parameters():
        _, o, k, _ = flat.index[n]
        assert mask[o:o + k].all() == p.decay and mask[o:o + k].any() == p.decay
    m.h[0].fc.bias.data = np.zeros(8, np.float32)          # rebinding breaks the view: detected
    with pytest.raises(RuntimeError, match="h.0.fc.bias.data"):
        flat.check_views()


def test_grads_accumulate_into_grad_buffer_through_backward():
    m = TinyGPT()
    flat = FlatParameters(m.named_parameters())
    w = m.h[0].fc.weight
    Scale.apply(w, 3.0).backward(D(np.ones(w.shape, np.float32)))
    Scale.apply(w, 2.0).backward(D(np.ones(w.shape, np.float32)))        # accumulates
    _, o, k, _ = flat.index["h.0.fc.weight"]
    g = flat.grad["float32"]
    assert (g[o:o + k] == 5.0).all() and g[:o].sum() == 0 and g[o + k:].sum() == 0
    assert w.grad.base is not None and np.shares_memory(w.grad, g)
    for name, data, grad in flat.named_views():
        assert np.shares_memory(data, flat.data["float32"]) and np.shares_memory(grad, g)
    flat.zero_grad()
    assert not g.any() and not w.grad.any()


def test_flat_multiple_dtypes_padding_and_existing_grads():
    a = Parameter(np.arange(5, dtype=np.float32))
    b = Parameter(np.arange(3, dtype=np.float64), decay=False)
    c = Parameter(np.float32(9.0).reshape(()))            # 0-d
    a.grad = np.full(5, 2.0, np.float32)
    flat = FlatParameters([("a", a), ("b", b), ("c", c), ("a_again", a)], world=4, align=2)
    assert flat.names == ["a", "b", "c"] and flat.dtypes == ["float32", "float64"]
    assert flat.numel["float32"] == 6 and flat.data["float32"].size == 8 and flat.data["float64"].size == 8
    assert flat.index["c"] == ("float32", 5, 1, ())
    assert np.array_equal(flat.data["float32"], [0, 1, 2, 3, 4, 9, 0, 0]) and c.data.shape == ()
    assert np.array_equal(flat.grad["float32"][:5], [2] * 5) and not flat.decay_mask["float64"].any()
    assert flat.decay_mask["float32"].tolist() == [True] * 6 + [False] * 2


def test_shard_range_covers_padded_buffer():
    for numel in (0, 1, 7, 96, 1001):
        for world in (1, 2, 3, 4, 8):
            for align in (1, 4):
                size = padded_size(numel, world, align)
                assert size >= numel and size % (world * align) == 0 and size - numel < world * align
                ranges = [shard_range(numel, r, world, align) for r in range(world)]
                assert ranges[0][0] == 0 and ranges[-1][1] == size
                assert all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))
                assert len({b - a for a, b in ranges}) == 1
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


# -- optimizers -----------------------------------------------------------------------

def _problem(n=300, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    mask = rng.random(n) < 0.6
    grads = [rng.standard_normal(n).astype(dtype) * 10.0 ** rng.integers(-3, 2) for _ in range(6)]
    return p, mask, grads


def _torch_groups(p, mask, wd):
    """Two torch tensors (decayed / not) standing for the masked elements of one flat array."""
    pd = torch.tensor(p[mask], requires_grad=True)
    pn = torch.tensor(p[~mask], requires_grad=True)
    return pd, pn, [{"params": [pd], "weight_decay": wd}, {"params": [pn], "weight_decay": 0.0}]


@needs_torch
def test_adamw_matches_torch():
    p, mask, grads = _problem()
    g = np.zeros_like(p)
    lrs = [1e-3, 3e-3, 1e-2, 5e-3, 1e-4, 0.0]
    opt = AdamW(p, g, decay_mask=mask, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, chunk_size=64)
    pd, pn, groups = _torch_groups(p, mask, 0.1)
    topt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for lr, grad in zip(lrs, grads):
        g[:] = grad
        opt.step(lr=lr)
        pd.grad, pn.grad = torch.tensor(grad[mask]), torch.tensor(grad[~mask])
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        np.testing.assert_allclose(p[mask], pd.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p[~mask], pn.detach().numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.exp_avg_sq[mask], topt.state[pd]["exp_avg_sq"].numpy(), rtol=1e-12)
    assert opt.step_count == 6


def test_weight_decay_only_where_masked():
    p = np.ones(10)
    mask = np.arange(10) < 4
    opt = AdamW(p, np.zeros(10), decay_mask=mask, lr=0.1, weight_decay=0.5)
    opt.step()                                                  # zero grads: only the decay moves p
    assert np.allclose(p[:4], 1 - 0.1 * 0.5) and (p[4:] == 1).all()
    q = np.ones(4)
    AdamW(q, np.zeros(4), lr=0.1, weight_decay=0.5).step()   # no mask: decay everywhere
    assert np.allclose(q, 0.95)


@needs_torch
@pytest.mark.parametrize("momentum,wd,damp,nesterov", [(0.0, 0.0, 0.0, False), (0.9, 0.01, 0.0, False),
                                                     (0.9, 0.01, 0.0, True), (0.8, 0.0, 0.3, False)])
def test_sgd_matches_torch(momentum, wd, damp, nesterov):
    p, mask, grads = _problem(seed=1)
    g = np.zeros_like(p)
    opt = SGD(p, g, lr=0.05, momentum=momentum, weight_decay=wd, decay_mask=mask, dampening=damp,
              nesterov=nesterov, chunk_size=50)
    pd, pn, groups = _torch_groups(p, mask, wd)
    topt = torch.optim.SGD(groups, lr=0.05, momentum=momentum, dampening=damp, nesterov=nesterov, foreach=False)
    for grad in grads:
        g[:] = grad
        opt.step()
        pd.grad, pn.grad = torch.tensor(grad[mask]), torch.tensor(grad[~mask])
        topt.step()
        np.testing.assert_allclose(p[mask], pd.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p[~mask], pn.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_sharded_update_equals_whole_update_bitwise():
    """What ZeRO relies on: AdamW on shards of a flat buffer == AdamW on the whole buffer."""
    p, mask, grads = _problem(n=1001, dtype=np.float32)
    whole, parts = p.copy(), p.copy()
    gw, gp = np.zeros_like(p), np.zeros_like(p)
    opts = [AdamW(whole, gw, mask)]
    for r in range(3):
        a, b = shard_range(p.size, r, 3)
        b = min(b, p.size)
        opts.append(AdamW(parts[a:b], gp[a:b], mask[a:b]))
    for grad in grads:
        gw[:] = grad
        gp[:] = grad
        for o in opts:
            o.step(lr=1e-2)
    assert np.array_equal(whole, parts) and whole.dtype == np.float32
    assert opts[0].exp_avg.dtype == np.float32


def test_adamw_float32_few_temporaries(monkeypatch):
    """O(chunk) scratch, never O(n): one chunk at 1 thread, one per thread in the pool."""
    from engine.threads import CHUNK
    n = 1 << 20
    for k in (1, 2):
        monkeypatch.setenv("ENGINE_THREADS", str(k))
        p, g = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
        opt = AdamW(p, g, decay_mask=np.ones(n, bool))
        tracemalloc.start()
        opt.step()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        bound = (k + 1) * CHUNK * 4 + (64 << 10)          # the step's chunk, one per thread, bookkeeping
        assert peak < bound < n * 4, f"{k} threads: AdamW.step allocated {peak} bytes for {n * 4} bytes of params"
        assert p.dtype == np.float32 and np.isfinite(p).all()


def test_optimizer_state_dict_round_trip():
    p, mask, grads = _problem(seed=3)
    q = p.copy()
    g = np.zeros_like(p)
    a = AdamW(p, g, mask, lr=1e-2)
    for grad in grads[:3]:
        g[:] = grad
        a.step()
    sd = {k: (v.copy() if hasattr(v, "copy") else v) for k, v in a.state_dict().items()}
    assert sd["step"] == 3 and set(sd) == {"step", "exp_avg", "exp_avg_sq"}
    q[:] = p
    b = AdamW(q, g, mask, lr=1e-2)
    b.load_state_dict(sd)
    for grad in grads[3:]:
        g[:] = grad
        a.step()
        b.step()
    assert np.array_equal(p, q)
    with pytest.raises(ValueError, match="'exp_avg' has shape"):
        b.load_state_dict({**sd, "exp_avg": np.zeros(3)})
    with pytest.raises(ValueError, match="missing key 'step'"):
        b.load_state_dict({k: v for k, v in sd.items() if k != "step"})
    s = SGD(p, g, lr=0.1, momentum=0.9)
    s.step()
    s2 = SGD(q, g, lr=0.1, momentum=0.9)
    s2.load_state_dict(s.state_dict())
    assert np.array_equal(s2.momentum_buffer, s.momentum_buffer) and s2.step_count == 1


def test_optimizer_rejects_bad_arrays():
    with pytest.raises(ValueError, match="1-D"):
        AdamW(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="grads shape"):
        AdamW(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="decay_mask"):
        AdamW(np.zeros(3), np.zeros(3), decay_mask=np.ones(3))


def test_cosine_lr_values():
    lr, warm, total, lo = 1e-3, 10, 110, 1e-4
    assert cosine_lr(0, lr, warm, total, lo) == pytest.approx(lr / 11)
    assert cosine_lr(9, lr, warm, total, lo) == pytest.approx(lr * 10 / 11)
    assert cosine_lr(10, lr, warm, total, lo) == pytest.approx(lr)
    assert cosine_lr(60, lr, warm, total, lo) == pytest.approx((lr + lo) / 2)
    assert cosine_lr(35, lr, warm, total, lo) == pytest.approx(lo + (lr - lo) * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_lr(110, lr, warm, total, lo) == pytest.approx(lo)
    assert cosine_lr(500, lr, warm, total, lo) == lo
    after = [cosine_lr(s, lr, warm, total, lo) for s in range(warm, total + 1)]
    assert all(x >= y for x, y in zip(after, after[1:]))
    assert cosine_lr(5, lr, 0, 0, lo) == lo                  # no decay phase: min_lr


@needs_torch
def test_clip_grad_norm_matches_torch():
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s) for s in (7, (3, 4), 100)]
    ts = [torch.tensor(a.copy(), requires_grad=True) for a in arrays]
    for t, a in zip(ts, arrays):
        t.grad = torch.tensor(a.copy())
    assert grad_norm_sq(arrays) == pytest.approx(sum(float((a ** 2).sum()) for a in arrays), rel=1e-12)
    norm = clip_grad_norm_(arrays, 1.0)
    tnorm = torch.nn.utils.clip_grad_norm_(ts, 1.0)
    assert norm == pytest.approx(float(tnorm), rel=1e-12)
    for t, a in zip(ts, arrays):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-12)
    assert math.sqrt(grad_norm_sq(arrays)) == pytest.approx(1.0, rel=1e-5)


def test_clip_grad_norm_precomputed_and_noop():
    g = np.full(4, 3.0, np.float32)
    assert clip_grad_norm_(g, 100.0) == pytest.approx(6.0)
    assert (g == 3.0).all()                                     # under the limit: untouched
    assert clip_grad_norm_([g], 1.0, norm=12.0) == 12.0         # e.g. all-reduced over ranks
    np.testing.assert_allclose(g, 3.0 / (12.0 + 1e-6), rtol=1e-6)
    assert g.dtype == np.float32
    from engine.backend import bfloat16
    h = np.ones(10, bfloat16())
    assert grad_norm_sq([h]) == 10.0
