"""Randomized differential test of every collective against a reference computed without MPI.

    mpiexec -n 8 python tests/mpi_workers/collectives_fuzz.py --cases 5000        # the full sweep
    mpiexec -n 3 python tests/mpi_workers/collectives_fuzz.py --cases 1 --first 417 --seed 0   # one case again

Every rank draws the same sequence of cases from --seed: the collective (all_reduce,
reduce_scatter, all_gather, broadcast, reduce, all_to_all, sendrecv / isend+irecv), its
algorithm (each one the op accepts, auto and mpi), dtype (float16, bfloat16, float32,
float64, int32, int64), reduction (sum, avg, max, min, prod), element count (0, 1, small
primes, N-1, N+1, counts not divisible by N, uneven counts= lists), root, in place or
not, blocking or async_op=True, contiguous or strided input. Each rank's input is drawn
from (seed, case, rank), so every rank rebuilds all ranks' inputs and computes the
expected result with NumPy alone. Values are small integers (sums, products of -1, 1, 2
and avg's single division are exact in every dtype up to N = 8), so every result must
match exactly; all-reduce results must also be the same bits on every rank.

Prints "fuzz N=n: C cases, F failures (seed S)" on rank 0 and exits 1 on any failure;
a failing case prints its index and description (rerun it alone with --first/--cases 1).
tests/test_collectives_fuzz.py runs a bounded slice at N = 1, 2, 3, 5, 7, 8.
"""
import argparse
import sys
import traceback
import zlib

import numpy as np
from mpi4py import MPI

from collectives import Communicator, cost
from engine.backend import bfloat16

WORLD = MPI.COMM_WORLD
DTYPES = ["float16", "bfloat16", "float32", "float64", "int32", "int64"]
REDUCTIONS = ["sum", "avg", "max", "min", "prod"]
COLLECTIVES = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "sendrecv"]


def dtype_of(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def draw_case(rng, n):
    """One case as a dict of plain values (the same on every rank)."""
    op = COLLECTIVES[rng.integers(len(COLLECTIVES))]
    algos = ["auto", "mpi"] + (list(cost.algorithms(op)) if op != "sendrecv" else [])
    smalls = [0, 1, 2, 3, 5, 7, 13, 31, max(n - 1, 0), n + 1, 97]
    c = dict(op=op, algo=algos[rng.integers(len(algos))], dtype=DTYPES[rng.integers(len(DTYPES))],
             red=REDUCTIONS[rng.integers(len(REDUCTIONS))], count=int(smalls[rng.integers(len(smalls))]),
             root=int(rng.integers(n)), in_place=bool(rng.integers(2)), async_op=bool(rng.integers(2)),
             strided=bool(rng.integers(3) == 0), uneven=bool(rng.integers(2)))
    if op in ("all_gather", "all_to_all") and c["uneven"]:
        c["counts"] = rng.integers(0, 6, size=(n, n) if op == "all_to_all" else n).tolist()
        c["recv_given"] = bool(rng.integers(2))
    if op == "reduce_scatter" and c["uneven"]:
        c["counts"] = rng.integers(0, 6, size=n).tolist()
    return c


def values(seed, index, rank, count, dtype, red):
    """Rank `rank`'s input of case `index`: small integers, exact under every reduction."""
    rng = np.random.default_rng([seed, index, rank])
    v = rng.choice([-1, 1, 1, 2], count) if red == "prod" else rng.integers(-4, 5, count)
    return v.astype(np.float64).astype(dtype_of(dtype)) if dtype_of(dtype).kind != "i" else v.astype(dtype)


def reference(rows, red, n):
    """The reduction of rows (one per rank), exactly, in the rows' dtype."""
    wide = np.array([r.astype(np.int64) for r in rows]) if len(rows) else None
    if red in ("sum", "avg"):
        total = wide.sum(axis=0)
    elif red == "prod":
        total = wide.prod(axis=0)
    else:
        total = wide.max(axis=0) if red == "max" else wide.min(axis=0)
    dt = rows[0].dtype
    if red == "avg" and n > 1:
        if dt.kind in "iu":
            return (total // n).astype(dt)
        return np.divide(total.astype(dt), n, dtype=dt) if dt.name != "bfloat16" else \
            np.divide(total.astype(dt), np.array(n, dt))
    return total.astype(dt)


def strided(a, rng_bit):
    """a as a strided view of a larger array (same values), or a itself."""
    if not rng_bit or a.size == 0:
        return a
    big = np.zeros(2 * a.size, a.dtype)
    big[::2] = a
    return big[::2]


def equal(got, want):
    g, w = np.asarray(got), np.asarray(want)
    return g.shape == w.shape and np.array_equal(g.astype(np.float64), w.astype(np.float64))


def run_case(comm, seed, index, c):
    """Run one case; returns a failure description or None."""
    n, r = comm.size, comm.rank
    op, algo, red, dt, count = c["op"], c["algo"], c["red"], c["dtype"], c["count"]
    asy = c["async_op"]
    mine = lambda k=r, m=count: values(seed, index, k, m, dt, red)       # noqa: E731
    finish = (lambda h: h.wait()) if asy else (lambda res: res)

    if op == "all_reduce":
        x = strided(mine(), c["strided"])
        out = None if c["in_place"] else np.empty(count, x.dtype)
        got = finish(comm.all_reduce(x, op=red, out=out, algo=algo, async_op=asy))
        want = reference([mine(k) for k in range(n)], red, n)
        digest = np.array([zlib.crc32(np.ascontiguousarray(got).tobytes())], np.int64)
        same = WORLD.allreduce(int(digest[0]), op=MPI.MAX) == WORLD.allreduce(int(digest[0]), op=MPI.MIN)
        if not same:
            return f"ranks got different bits: {got}"
        return None if equal(got, want) and (out is None or got is out) else f"got {got}, want {want}"
    if op == "reduce_scatter":
        counts = c.get("counts")
        total = sum(counts) if counts else count
        blocks = counts or [total // n + (k < total % n) for k in range(n)]
        offs = np.cumsum([0] + blocks)
        x = mine(r, total)
        in_place = c["in_place"] and not c["strided"]
        x = x if in_place else strided(x, c["strided"])
        out = None if in_place else np.empty(blocks[r], x.dtype)
        got = finish(comm.reduce_scatter(x, op=red, out=out, counts=counts, algo=algo, async_op=asy))
        want = reference([mine(k, total) for k in range(n)], red, n)[offs[r]:offs[r + 1]]
        return None if equal(got, want) else f"got {got}, want {want}"
    if op == "all_gather":
        counts = c.get("counts")
        blocks = counts or [count] * n
        offs = np.cumsum([0] + blocks)
        mode = "in place" if c["in_place"] else "none" if c["uneven"] else "out"    # none: out allocated
        x = mine(r, blocks[r])
        out = None
        if mode == "in place":
            out = np.zeros(offs[n], x.dtype)
            out[offs[r]:offs[r + 1]] = x
            x = out[offs[r]:offs[r + 1]]
        elif mode == "out":
            out = np.empty(offs[n], x.dtype)
            x = strided(x, c["strided"])
        got = finish(comm.all_gather(x, out=out, counts=counts, algo=algo, async_op=asy))
        want = np.concatenate([mine(k, blocks[k]) for k in range(n)])
        return None if equal(np.ravel(got), want) else f"got {got}, want {want}"
    if op == "broadcast":
        x = strided(mine(), c["strided"])
        got = finish(comm.broadcast(x, root=c["root"], algo=algo, async_op=asy))
        want = mine(c["root"])
        return None if equal(got, want) and got is x else f"got {got}, want {want}"
    if op == "reduce":
        root = c["root"]
        x = strided(mine(), c["strided"])
        before = x.copy()
        out = None if c["in_place"] else np.empty(count, x.dtype)
        got = finish(comm.reduce(x, root=root, op=red, out=out, algo=algo, async_op=asy))
        if r != root:
            return None if got is None and equal(x, before) else f"non-root got {got}, x changed: {x} vs {before}"
        want = reference([mine(k) for k in range(n)], red, n)
        return None if equal(got, want) else f"got {got}, want {want}"
    if op == "all_to_all":
        m = c.get("counts")
        if m is None:
            b = count % 4
            m = [[b] * n for _ in range(n)]
        send, recv = m[r], [m[k][r] for k in range(n)]
        def block(k, j):                                     # rank k's block for rank j
            v = values(seed, index, k, sum(m[k]), dt, red)
            return v[sum(m[k][:j]):sum(m[k][:j + 1])]
        x = mine(r, sum(send))
        even = "counts" not in c
        kwargs = {} if even else dict(send_counts=send, recv_counts=recv if c["recv_given"] else None)
        if c["in_place"] and even:
            out = x                                          # out=x: through a copy
        else:
            x = strided(x, c["strided"])
            out = None if c["uneven"] else np.empty(sum(recv), x.dtype)
        got = finish(comm.all_to_all(x, out=out, algo=algo, async_op=asy, **kwargs))
        want = np.concatenate([block(k, r) for k in range(n)]) if n else None
        return None if equal(np.ravel(got), want) else f"got {got}, want {want}"
    if op == "sendrecv":
        right, left = (r + 1) % n, (r - 1) % n
        x = strided(mine(), c["strided"])
        if asy:
            h = comm.irecv(np.empty(count, x.dtype), left, tag=index % 1000)
            s = comm.isend(x, right, tag=index % 1000)
            got = h.wait()
            s.wait()
        else:
            got = comm.sendrecv(x, right, recv_from=left, tag=index % 1000)
        want = mine(left)
        return None if equal(got, want) else f"got {got}, want {want}"
    raise ValueError(op)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=200)
    p.add_argument("--first", type=int, default=0, help="skip the cases before this index")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    comm = Communicator()
    n, rank = comm.size, comm.rank
    rng = np.random.default_rng([args.seed, n])
    failures = 0
    for index in range(args.first + args.cases):
        c = draw_case(rng, n)
        if index < args.first:
            continue
        try:
            bad = run_case(comm, args.seed, index, c)
        except Exception:                        # noqa: BLE001 - one rank alone would hang the rest
            print(f"[rank {rank}] case {index} {c} raised:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
            WORLD.Abort(1)
        if bad is not None:
            failures += 1
            print(f"[rank {rank}] FAIL case {index} {c}: {bad}", flush=True)
    total = WORLD.allreduce(failures)
    if rank == 0:
        print(f"fuzz N={n}: {args.cases} cases, {total} failures (seed {args.seed})", flush=True)
    return 1 if total else 0


if __name__ == "__main__":
    raise SystemExit(main())
