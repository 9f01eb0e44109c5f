"""engine/threads.py: the chunked, threaded elementwise paths (GELU, AdamW) give bitwise the same
arrays at 1 thread and at 3, on sizes that are not a multiple of the chunk."""
import numpy as np

from engine import threads
from engine.ops.fused import GELU
from engine.optim import AdamW


def _gelu(x, g):
    fn = GELU()
    fn.needs_input_grad = (True,)
    return fn.forward(x), fn.backward(g)[0]


def _adamw(p, g, mask, steps=3):
    p = p.copy()
    opt = AdamW(p, g, mask, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, chunk_size=1000)
    for _ in range(steps):
        opt.step()
    return p, opt.exp_avg, opt.exp_avg_sq


def test_threads_are_bitwise_equal(monkeypatch):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((7, threads.CHUNK // 3)) * 4).astype(np.float32)   # 2.3 chunks
    x[0, :4] = (-1e4, -90.0, 0.0, 1e4)                                        # the clamp and the tails
    g = rng.standard_normal(x.shape).astype(np.float32)
    p, pg = rng.standard_normal(10_501), rng.standard_normal(10_501)
    mask = rng.random(10_501) < 0.5
    out = {}
    for n in ("1", "3"):
        monkeypatch.setenv("ENGINE_THREADS", n)
        assert threads.threads() == int(n)
        out[n] = _gelu(x, g) + _adamw(p, pg, mask)
    for a, b in zip(out["1"], out["3"]):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    y, dx = out["1"][:2]
    assert np.isfinite(y).all() and np.isfinite(dx).all() and abs(y[0, 0]) < 1e-20 and y[0, 3] == 1e4


def test_for_chunks_covers_the_range_once(monkeypatch):
    monkeypatch.setenv("ENGINE_THREADS", "2")
    seen = np.zeros(1000, dtype=np.int64)

    def mark(a, b):
        seen[a:b] += 1
    threads.for_chunks(1000, mark, np, chunk=64)
    threads.for_chunks(0, mark, np, chunk=64)
    assert (seen == 1).all()
