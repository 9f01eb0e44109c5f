"""Single-process pieces of collectives/: block layout, the scratch pool, the cost model, sizes."""
import numpy as np
import pytest

from bench.collectives_setup import BUSBW, parse_sizes
from collectives import cost
from collectives.buffers import balanced, block_counts, offsets
from collectives.transport import Pool


@pytest.mark.parametrize("count, n", [(0, 3), (1, 4), (7, 8), (13, 5), (10007, 6)])
def test_balanced_blocks(count, n):
    counts = block_counts(count, n)
    assert sum(counts) == count and max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
    assert offsets(counts) == [sum(counts[:i]) for i in range(n + 1)]
    assert balanced(count, n) == (counts, offsets(counts))


def test_pool_reuses_and_bounds_its_buffers():
    pool = Pool()
    sizes = [1 << 20, 8 << 20, 2 << 20, 1 << 16, 3 << 20, 5 << 20, 1 << 21, 7 << 20, 1 << 22, 9 << 20]
    bufs = [pool.take(np, s) for s in sizes]
    for b in bufs:
        pool.give(np, b)
    kept = pool.free["numpy"]
    assert len(kept) == 8 and min(b.nbytes for b in kept) == 2 << 20     # the smallest were forgotten
    b = pool.take(np, 6 << 20)
    assert b.nbytes == 7 << 20 and all(k is not b for k in pool.free["numpy"])   # best fit, checked out


def test_cost_model():
    for op in cost.MODELS:
        for algo in cost.algorithms(op):
            assert cost.predict(op, algo, 1, 1 << 20) == 0.0
            assert cost.predict(op, algo, 8, 1 << 20, (1e-6, 1e-10, 1e-10)) > 0
    abg = (1e-5, 1e-10, 1e-10)
    # latency-bound: log-step algorithms; bandwidth-bound all-reduce on many ranks: the ring family
    assert cost.choose("all_reduce", 8, 8, abg) == "recursive_doubling"
    assert cost.choose("all_reduce", 8, 1 << 28, abg) in ("ring", "rabenseifner")
    assert cost.choose("all_gather", 6, 8, abg) == "bruck"
    assert cost.coefficients("all_reduce", "ring", 4, 1000) == (6, 1500.0, 750.0)


def test_bench_sizes_and_busbw_factors():
    assert parse_sizes("8B:64B") == [8, 16, 32, 64]
    assert parse_sizes("4KB") == [4096] and parse_sizes("1MB:2MB") == [1 << 20, 2 << 20]
    with pytest.raises(ValueError):
        parse_sizes("8XB")
    assert BUSBW["all_reduce"](4) == 1.5 and BUSBW["all_gather"](4) == 0.75 and BUSBW["broadcast"](4) == 1.0


def test_bytes_sent_counts_every_payload_byte():
    """Communicator.bytes_sent: a ring all-reduce of n bytes sends 2 (N-1)/N n per rank, a
    send its bytes, the fast path's plans theirs (tests/mpi_workers/traffic_worker.py)."""
    from mpi_util import describe, run_mpi
    proc = run_mpi(4, "traffic_worker.py", timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("OK") == 4, describe(proc)


def test_cache_false_pins_no_buffers():
    from mpi_util import describe, run_mpi
    proc = run_mpi(2, "cache_worker.py", timeout=60)
    assert proc.returncode == 0 and proc.stdout.count("OK") == 2, describe(proc)
