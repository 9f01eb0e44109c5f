"""engine/threads.py: the chunked, threaded elementwise paths (GELU, AdamW) give bitwise the same
arrays at 1 thread and at 3, on sizes that are not a multiple of the chunk; attention cut over
the sequences (for_parts) gives bitwise the same output and gradient at 1, 2 and 5 threads."""
import numpy as np

from engine import threads
from engine.ops.fused import GELU
from engine.optim import AdamW
from engine.autograd import Tensor
from models.attention import HeadsAttention


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
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")          # small arrays go on the pool only beside a 1-thread BLAS
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


def test_for_chunks_one_task_per_thread_beside_blas(monkeypatch):
    """Each thread walks one contiguous run of chunks in order; beside a BLAS with threads of its
    own, fewer than BESIDE_BLAS_MIN elements stay on the calling thread."""
    import threading
    import time
    monkeypatch.setenv("ENGINE_THREADS", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    runs = {}

    def mark(a, b):
        runs.setdefault(threading.current_thread().name, []).append((a, b))
        time.sleep(0.002)                                      # a task outlasts the other's start
    threads.for_chunks(1000, mark, np, chunk=64)              # 16 chunks: 8 per thread
    assert sorted(runs.values()) == [[(a, a + 64) for a in range(0, 512, 64)],
                                     [(a, min(a + 64, 1000)) for a in range(512, 1000, 64)]], runs
    assert all(name.startswith("engine-elementwise") for name in runs), runs
    assert threads.chunk_threads(1000, 64) == 2 and threads.chunk_threads(100, 64) == 2 and threads.chunk_threads(64, 64) == 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")          # the BLAS's own threads: small arrays inline
    small, big = threads.BESIDE_BLAS_MIN - 1, threads.BESIDE_BLAS_MIN
    assert threads.chunk_threads(small) == 1 and threads.chunk_threads(big) == 2
    assert threads.chunk_threads(1000, 64, beside_blas_min=0) == 2
    runs.clear()
    threads.for_chunks(1000, mark, np, chunk=64)
    assert list(runs) == [threading.current_thread().name] and len(runs[threading.current_thread().name]) == 16


def test_for_parts_cuts_near_equal_parts_once(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")          # the parts run on the pool only beside a 1-thread BLAS
    for t, n, want in (("3", 10, [(0, 3), (3, 6), (6, 10)]), ("4", 2, [(0, 1), (1, 2)]), ("1", 5, [(0, 5)])):
        monkeypatch.setenv("ENGINE_THREADS", t)
        seen = []
        threads.for_parts(n, lambda a, b: seen.append((a, b)), np)
        assert sorted(seen) == want
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")          # a BLAS with threads of its own: one part, inline
    seen = []
    threads.for_parts(10, lambda a, b: seen.append((a, b)), np)
    assert seen == [(0, 10)] and threads.blas_threads() == 2
    seen = []
    threads.for_parts(0, lambda a, b: seen.append((a, b)), np)
    assert seen == []


def test_nested_pool_work_runs_inline(monkeypatch):
    monkeypatch.setenv("ENGINE_THREADS", "2")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    seen = np.zeros(40, dtype=np.int64)

    def outer(a, b):                          # a pool task starting more pool work: inline, no deadlock
        threads.for_chunks(b - a, lambda c, d: seen.__setitem__(slice(a + c, a + d), seen[a + c:a + d] + 1),
                           np, chunk=3)
    threads.for_parts(40, outer, np)
    assert (seen == 1).all()


def test_attention_over_threads_is_bitwise_equal(monkeypatch):
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((7, 24, 3 * 32)).astype(np.float32)       # 7 sequences: uneven parts
    g = rng.standard_normal((7, 24, 32)).astype(np.float32)
    out = {}
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    for n in ("1", "2", "5"):
        monkeypatch.setenv("ENGINE_THREADS", n)
        x = Tensor(qkv.copy(), requires_grad=True)
        y = HeadsAttention.apply(x, n_head=4)
        y.backward(Tensor(g))
        out[n] = (np.array(y.data), np.array(x.grad))
    for n in ("2", "5"):
        assert all(a.tobytes() == b.tobytes() for a, b in zip(out["1"], out[n])), n
    assert np.isfinite(out["1"][1]).all() and np.abs(out["1"][1]).max() > 0
