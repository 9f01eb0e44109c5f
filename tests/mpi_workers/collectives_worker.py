"""Every hand-written collective against the MPI library's own (algo="mpi"), in one launch.

    mpiexec -n N python tests/mpi_workers/collectives_worker.py

For each algorithm: element counts 0, 1, N-1, 13 and 10007 (prime, not divisible by 2..8),
dtypes float16, bfloat16, float32, float64, int32, int64, ops sum, avg, max, min, prod,
in place and out of place. Integers, max and min must match MPI exactly; float sums and
products within the rounding bound of two (N-1)-step reductions in any order,
2 (N-1) u sum_i |x_i| (products: 2 N u |prod x_i|). The MPI oracle itself is checked against
the exact reduction of all ranks' inputs (gathered, computed in float64 / int64).
The segmenting and placement-trial thresholds are lowered so those paths run on this small data.

Up to 4 ranks every (count, dtype, op) combination runs; above, where 2 cores are heavily
oversubscribed and every message costs a scheduler time slice, a pairwise covering set
(every count with every dtype and every op, every dtype with every op) keeps the launch
short (--full runs everything). Then runs comm_api_worker.py's tests (non-blocking,
layouts, errors, point-to-point) unless --no-api. Prints one line per failure and a
summary; exits 1 on any failure.
"""
import hashlib
import sys

import numpy as np
from mpi4py import MPI

from collectives import Communicator, cost, direct, segments
from engine.backend import bfloat16

segments.SEGMENT_MIN, segments.SEGMENT_BYTES = 4096, 1024   # pipeline blocks >= 4 KiB in 1 KiB pieces
direct.PLACE_TRIAL_BYTES = 4096     # all-gathers >= 4 KiB try both placements of the own block

comm = Communicator()
N, R = comm.size, comm.rank
WORLD = MPI.COMM_WORLD
DTYPES = [np.dtype(np.float16), bfloat16(), np.dtype(np.float32), np.dtype(np.float64),
          np.dtype(np.int32), np.dtype(np.int64)]
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
OPS = ["sum", "avg", "max", "min", "prod"]
COUNTS = sorted({0, 1, max(N - 1, 0), 13, 10007})
FULL = N <= 4 or "--full" in sys.argv
failures, cases, digests = [], [0], []


def combos():
    """(count, dtype, op) cases: all of them, or a pairwise covering set."""
    for i, count in enumerate(COUNTS):
        for j, dtype in enumerate(DTYPES):
            for op in (OPS if FULL else [OPS[(i + j) % len(OPS)]]):
                yield count, dtype, op


def fail(msg):
    failures.append(msg)
    print(f"[rank {R}] FAIL {msg}", flush=True)


def data(count, dtype, op, salt):
    rng = np.random.default_rng([salt, R, count])
    if dtype.kind in "iu":
        v = rng.choice([-2, -1, 1, 2], count) if op == "prod" else rng.integers(-1000, 1000, count)
    else:
        v = rng.uniform(0.5, 1.5, count) if op == "prod" else rng.uniform(-1.0, 1.0, count)
    return v.astype(dtype)


def gathered(x):
    """Every rank's x as rows of an (N, count) array (raw bytes via MPI_Allgather)."""
    rows = np.empty((N, x.size), x.dtype)
    WORLD.Allgather([x, MPI.BYTE], [rows, MPI.BYTE])
    return rows


def exact(rows, op):
    """The reduction in float64 (floats) or int64 (ints), and the error scale of a float sum."""
    wide = rows.astype(np.int64 if rows.dtype.kind in "iu" else np.float64)
    if op in ("sum", "avg"):
        v = wide.sum(axis=0)
        if op == "avg":
            v = v // N if rows.dtype.kind in "iu" else v / N
        return v, np.abs(wide).sum(axis=0) / (N if op == "avg" else 1)
    if op == "prod":
        v = wide.prod(axis=0)
        return v, N * np.abs(v)
    return (wide.max(axis=0) if op == "max" else wide.min(axis=0)), None


def close(name, got, want, scale, dtype, op, steps):
    """got vs want: exact for ints/max/min; else within steps * u * scale (+ one rounding for avg)."""
    cases[0] += 1
    g = np.asarray(got).astype(np.float64 if dtype.kind == "f" or dtype.name == "bfloat16" else np.int64)
    w = np.asarray(want).astype(g.dtype)
    if g.shape != w.shape:
        return fail(f"{name}: shape {g.shape} != {w.shape}")
    if scale is None or dtype.kind in "iu":
        if not np.array_equal(g, w):
            bad = np.flatnonzero(g != w)[:3]
            fail(f"{name}: differs at {bad.tolist()}: got {g[bad].tolist()} want {w[bad].tolist()}")
        return
    u = UNIT[dtype.name]
    tol = steps * u * scale + (2 * u * np.abs(w) if op == "avg" else 0) + 1e-300
    bad = np.flatnonzero(np.abs(g - w) > tol)
    if bad.size:
        i = bad[:3]
        fail(f"{name}: beyond rounding bound at {i.tolist()}: got {g[i].tolist()} want {w[i].tolist()} "
             f"tol {np.broadcast_to(tol, g.shape)[i].tolist()}")


def same_everywhere(name, a):
    """Record a digest of a result every rank must hold bit for bit (checked at the end)."""
    digests.append((name, hashlib.sha1(np.ascontiguousarray(a).view(np.uint8)).hexdigest()))


def check_digests():
    everyone = WORLD.allgather([d for _, d in digests])
    for k, (name, d) in enumerate(digests):
        if any(other[k] != d for other in everyone):
            fail(f"{name}: ranks hold different bits")


def test_reductions():
    """all_reduce and reduce_scatter, every algorithm, count, dtype, op, in place and out of place."""
    ar_algos = ["auto", *cost.algorithms("all_reduce")]
    rs_algos = ["auto", *cost.algorithms("reduce_scatter")]
    for count, dtype, op in combos():
        counts = [count // N + (1 if i < count % N else 0) for i in range(N)]
        lo, hi = sum(counts[:R]), sum(counts[:R + 1])
        x = data(count, dtype, op, 1)
        want_exact, scale = exact(gathered(x), op)
        oracle = x.copy()
        comm.all_reduce(oracle, op=op, algo="mpi")
        tag = f"N={N} count={count} {dtype} {op}"
        close(f"mpi all_reduce vs exact {tag}", oracle, want_exact, scale, dtype, op, max(N - 1, 0))
        rs_oracle = comm.reduce_scatter(x, op=op, out=np.empty(counts[R], dtype), algo="mpi")
        close(f"mpi reduce_scatter vs exact {tag}", rs_oracle, want_exact[lo:hi],
              None if scale is None else scale[lo:hi], dtype, op, max(N - 1, 0))
        bound = 2 * max(N - 1, 0)
        for algo in ar_algos:
            got = x.copy()
            if comm.all_reduce(got, op=op, algo=algo) is not got:
                fail(f"all_reduce {algo} in place did not return its input")
            close(f"all_reduce {algo} in-place {tag}", got, oracle, scale, dtype, op, bound)
            same_everywhere(f"all_reduce {algo} {tag}", got)
            xin, out = x.copy(), np.empty_like(x)
            comm.all_reduce(xin, op=op, out=out, algo=algo)
            close(f"all_reduce {algo} out-of-place {tag}", out, oracle, scale, dtype, op, bound)
            if not np.array_equal(xin.view(np.uint8), x.view(np.uint8)):
                fail(f"all_reduce {algo} out-of-place modified its input {tag}")
        for algo in rs_algos:
            buf = x.copy()
            res = comm.reduce_scatter(buf, op=op, algo=algo)
            if res.size and not np.shares_memory(res, buf):
                fail(f"reduce_scatter {algo} in place returned a copy {tag}")
            close(f"reduce_scatter {algo} in-place {tag}", res, rs_oracle,
                  None if scale is None else scale[lo:hi], dtype, op, bound)
            xin = x.copy()
            out = comm.reduce_scatter(xin, op=op, out=np.empty(counts[R], dtype), algo=algo)
            close(f"reduce_scatter {algo} out-of-place {tag}", out, rs_oracle,
                  None if scale is None else scale[lo:hi], dtype, op, bound)
            if not np.array_equal(xin.view(np.uint8), x.view(np.uint8)):
                fail(f"reduce_scatter {algo} out-of-place modified its input {tag}")


def test_uneven_reduce_scatter():
    counts = [(3 * i + 1) % 5 for i in range(N)]          # includes empty blocks for N >= 4
    offs = np.concatenate([[0], np.cumsum(counts)])
    for dtype in (np.dtype(np.float64), np.dtype(np.int32), bfloat16()):
        x = data(int(offs[-1]), dtype, "sum", 2)
        want = comm.reduce_scatter(x, out=np.empty(counts[R], dtype), counts=counts, algo="mpi")
        rows = gathered(x)
        w, scale = exact(rows, "sum")
        for algo in ["auto", *cost.algorithms("reduce_scatter")]:
            got = comm.reduce_scatter(x.copy(), counts=counts, algo=algo)
            close(f"reduce_scatter uneven {algo} {dtype}", got, want, scale[offs[R]:offs[R + 1]], dtype, "sum",
                  2 * max(N - 1, 0))


def test_all_gather():
    algos = ["auto", "mpi", *cost.algorithms("all_gather")]
    uneven = [(5 * i + 2) % 4 for i in range(N)]
    for count in COUNTS:
        for dtype in DTYPES:
            x = data(count, dtype, "sum", 3)
            want = gathered(x).reshape(-1)
            for algo in algos:
                tag = f"all_gather {algo} N={N} count={count} {dtype}"
                got = comm.all_gather(x, algo=algo)                       # allocated output
                close(tag + " new", got.reshape(-1), want, None, dtype, "max", 0)
                out = np.full(N * count, 7, dtype)
                comm.all_gather(x, out=out, algo=algo)                    # out of place
                close(tag + " out", out, want, None, dtype, "max", 0)
                out = np.zeros(N * count, dtype)
                out[R * count:(R + 1) * count] = x
                comm.all_gather(out[R * count:(R + 1) * count], out=out, algo=algo)   # in place
                close(tag + " in-place", out, want, None, dtype, "max", 0)
        xs = data(uneven[R], np.dtype(np.float32), "sum", 4)
        want = np.concatenate([r[:uneven[i]] for i, r in enumerate(gathered(np.resize(xs, 4)))])
        for algo in algos:
            got = comm.all_gather(xs, counts=uneven, algo=algo)
            close(f"all_gather uneven {algo}", got, want, None, xs.dtype, "max", 0)


def test_rooted():
    roots = sorted({0, N - 1})
    for count in COUNTS:
        for dtype in DTYPES:
            for root in roots:
                x = data(count, dtype, "sum", 5 + root)
                want = gathered(x)[root]
                for algo in ["mpi", *cost.algorithms("broadcast")]:
                    b = x.copy()
                    comm.broadcast(b, root=root, algo=algo)
                    close(f"broadcast {algo} root={root} count={count} {dtype}", b, want, None, dtype, "max", 0)
    for count, dtype, op in combos():
        for root in roots:
            x = data(count, dtype, op, 6)
            ref = comm.reduce(x.copy(), root=root, op=op, algo="mpi")
            w, scale = exact(gathered(x), op)
            for algo in cost.algorithms("reduce"):
                tag = f"reduce {algo} root={root} count={count} {dtype} {op}"
                got = comm.reduce(x.copy(), root=root, op=op, algo=algo)
                xin = x.copy()
                out = comm.reduce(xin, root=root, op=op, out=np.empty_like(x), algo=algo)
                if R == root:
                    close(tag, got, ref, scale, dtype, op, 2 * max(N - 1, 0))
                    close(tag + " out", out, ref, scale, dtype, op, 2 * max(N - 1, 0))
                elif got is not None or out is not None:
                    fail(f"{tag}: non-root got a result")
                if not np.array_equal(xin.view(np.uint8), x.view(np.uint8)):
                    fail(f"{tag}: modified the input")


def test_all_to_all():
    for block in (0, 1, 13):
        for dtype in DTYPES:
            x = data(block * N, dtype, "sum", 7)
            want = comm.all_to_all(x, algo="mpi")
            for algo in ["auto", *cost.algorithms("all_to_all")]:
                tag = f"all_to_all {algo} block={block} {dtype}"
                close(tag, comm.all_to_all(x, algo=algo), want, None, dtype, "max", 0)
                y = x.copy()
                comm.all_to_all(y, out=y, algo=algo)
                close(tag + " in-place", y, want, None, dtype, "max", 0)
    send = [(R + 2 * j) % 4 for j in range(N)]             # rank i sends (i + 2j) % 4 elements to j
    recv = [(j + 2 * R) % 4 for j in range(N)]
    x = data(sum(send), np.dtype(np.int64), "sum", 8)
    want = comm.all_to_all(x, send_counts=send, recv_counts=recv, algo="mpi")
    for algo in ["auto", *cost.algorithms("all_to_all")]:
        close(f"all_to_all uneven {algo}", comm.all_to_all(x, send_counts=send, recv_counts=recv, algo=algo),
              want, None, x.dtype, "max", 0)
        close(f"all_to_all uneven {algo} counts exchanged", comm.all_to_all(x, send_counts=send, algo=algo),
              want, None, x.dtype, "max", 0)


if __name__ == "__main__":
    for test in (test_reductions, test_uneven_reduce_scatter, test_all_gather, test_rooted, test_all_to_all):
        test()
    check_digests()
    for algo in ("auto", "mpi", *cost.algorithms("barrier")):
        comm.barrier(algo=algo)
    bad = WORLD.allreduce(len(failures))
    if R == 0:
        print(f"collectives N={N}: {cases[0]} checks on rank 0, {bad} failures over all ranks", flush=True)
    if "--no-api" not in sys.argv:
        import comm_api_worker        # the API tests, in the same launch
        bad += comm_api_worker.run()
    raise SystemExit(1 if bad else 0)
