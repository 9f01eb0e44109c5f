"""Argument errors and rank-dependent results of the collectives, in one launch per group:

    ENGINE_COMM_DEBUG=1 mpiexec -n 3 python tests/mpi_workers/hardening_worker.py debug
    mpiexec -n 3 python tests/mpi_workers/hardening_worker.py local
    mpiexec -n 2 python tests/mpi_workers/hardening_worker.py pair

debug: one rank's arguments are refused (out size, read-only output, root-only out of
reduce, all_to_all out after the count exchange) or differ (algo, all_gather counts):
every rank must raise (the refusing one its own error, the others
CollectiveMismatchError) and all stay in step for the next call.
local: errors every rank detects alike before any message (reduce's out on non-roots,
a read-only in-place all_reduce at N=3, complex dtypes, roots out of range) and
reduce_scatter(algo="mpi", op="avg") in place.
pair: algo="mpi" all_to_all with counts uniform on one rank only, mpi reduce_scatter into
an empty own block, and max/min/sum with signed zeros and NaN payloads: every rank the
same bits, for every algorithm. Prints "hardening GROUP N=n: k failures" on rank 0.
"""
import sys

import numpy as np
from mpi4py import MPI

from collectives import CollectiveMismatchError, Communicator, cost

comm = Communicator()
N, R = comm.size, comm.rank
WORLD = MPI.COMM_WORLD
failures = []


def fail(msg):
    failures.append(msg)
    print(f"[rank {R}] FAIL {msg}", flush=True)


def raises(exc, fn, what):
    try:
        fn()
    except exc:
        return
    except Exception as e:                  # noqa: BLE001 - report the wrong kind
        fail(f"{what}: expected {exc.__name__}, got {type(e).__name__}: {e}")
        return
    fail(f"{what}: expected {exc.__name__}, nothing raised")


def in_step(what):
    """A correct call after the refused one: every rank still agrees on the call sequence."""
    x = np.ones(4)
    comm.all_reduce(x, algo="ring")
    if not np.all(x == N):
        fail(f"after {what}: all_reduce gave {x}")


def same_everywhere(a, what):
    rows = np.empty((N, a.nbytes), np.uint8)
    WORLD.Allgather([np.ascontiguousarray(a).view(np.uint8).reshape(-1), MPI.BYTE], [rows, MPI.BYTE])
    if not all(np.array_equal(rows[0], rows[k]) for k in range(N)):
        fail(f"{what}: ranks got different bits: {[np.frombuffer(r, a.dtype) for r in rows]}")


def group_debug():
    last = R == N - 1
    err = ValueError if last else CollectiveMismatchError
    raises(err, lambda: comm.all_reduce(np.ones(4), out=np.ones(5 if last else 4)), "out size on one rank")
    in_step("out size")
    ro = np.ones(4)
    ro.flags.writeable = not last
    raises(err, lambda: comm.all_reduce(ro), "read-only in-place all_reduce on one rank")
    in_step("read-only")
    raises(err, lambda: comm.reduce(np.ones(4), root=N - 1, out=np.ones(3 if last else 4)), "reduce out on root only")
    in_step("reduce out")
    raises(CollectiveMismatchError, lambda: comm.all_reduce(np.ones(4), algo="tree" if last else "ring"),
           "algo differs on one rank")
    in_step("algo")
    counts = [1] * N
    counts[0 if last else 1] += 1
    raises(CollectiveMismatchError, lambda: comm.all_gather(np.ones(counts[R]), counts=counts),
           "all_gather counts differ, same total")
    in_step("counts")
    send = [1] * N
    raises(err, lambda: comm.all_to_all(np.ones(N), out=np.ones(N + int(last)), send_counts=send),
           "all_to_all out size against the exchanged counts on one rank")
    in_step("all_to_all out")
    raises(err, lambda: comm.broadcast(np.ones(2), root=0, algo="nccl" if last else "auto"), "unknown algo on one rank")
    in_step("unknown algo")
    recv = [1] * N
    recv[-1] += R == 0                    # rank 0 expects one more element from the last rank than it sends
    raises(ValueError if R == 0 else CollectiveMismatchError,
           lambda: comm.all_to_all(np.ones(N), send_counts=[1] * N, recv_counts=recv), "all_to_all recv_counts wrong")
    in_step("all_to_all recv_counts")


def group_local():
    raises(ValueError, lambda: comm.reduce(np.ones(4), root=0, out=np.ones(3)), "reduce out size on every rank")
    in_step("reduce out")
    ro = np.ones(5)
    ro.flags.writeable = False
    for algo in ["auto", "mpi", *cost.algorithms("all_reduce")]:
        raises(ValueError, lambda: comm.all_reduce(ro, algo=algo), f"read-only in-place all_reduce {algo}")
    raises(ValueError, lambda: comm.reduce_scatter(ro), "read-only in-place reduce_scatter")
    in_step("read-only")
    for dt in (np.complex64, np.complex128):
        raises(TypeError, lambda: comm.all_reduce(np.ones(3, dt), op="max"), f"{dt.__name__} all_reduce")
        raises(TypeError, lambda: comm.broadcast(np.ones(3, dt)), f"{dt.__name__} broadcast")
    for root in (N, -1, 1.5, True, "0"):
        for algo in ("auto", "tree", "mpi"):
            raises(ValueError, lambda: comm.broadcast(np.ones(3), root=root, algo=algo), f"broadcast root={root!r} {algo}")
            raises(ValueError, lambda: comm.reduce(np.ones(3), root=root, algo=algo), f"reduce root={root!r} {algo}")
    in_step("roots")
    for bad in ([1.5] + [0] * (N - 1), [True] + [0] * (N - 1)):
        raises(ValueError, lambda: comm.all_gather(np.ones(int(bad[0])), counts=bad), f"all_gather counts={bad}")
        raises(ValueError, lambda: comm.reduce_scatter(np.ones(int(bad[0])), counts=bad), f"reduce_scatter counts={bad}")
    in_step("counts")
    x = np.arange(1.0, 2 * N + 1) * (R + 1)            # sum over ranks: x0 * N(N+1)/2
    want = np.arange(1.0, 2 * N + 1)[2 * R:2 * R + 2] * (N + 1) / 2
    for algo in ["auto", "mpi", *cost.algorithms("reduce_scatter")]:
        got = comm.reduce_scatter(x.copy(), op="avg", algo=algo)
        if not np.allclose(got, want):
            fail(f"in-place reduce_scatter avg {algo}: {got} != {want}")


def group_pair():
    counts = [[1, 1], [1, 2]][R] if N == 2 else [1 + (R == k == N - 1) for k in range(N)]
    recv = [1 + (k == R == N - 1) for k in range(N)]
    x = np.arange(sum(counts), dtype=np.float64) + 10 * R
    got = comm.all_to_all(x, send_counts=counts, recv_counts=recv, algo="mpi")
    want = np.concatenate([np.arange(sum([1] * (N - 1) + [1 + (k == N - 1)]))[
        sum([1] * R):sum([1] * R) + recv[k]] + 10 * k for k in range(N)])
    if not np.array_equal(got, want):
        fail(f"mpi all_to_all, counts uniform on some ranks only: {got} != {want}")
    for size in (1, N + 1):          # balanced blocks: the last rank's block is empty at size 1
        for algo in ["auto", "mpi", *cost.algorithms("reduce_scatter")]:
            x = np.ones(size) * (R + 1)
            c = [size // N + (k < size % N) for k in range(N)]
            o = sum(c[:R])
            got = comm.reduce_scatter(x, out=x[o:o + c[R]], algo=algo)
            if not np.array_equal(got, np.full(c[R], N * (N + 1) / 2)):
                fail(f"reduce_scatter into its own (empty: {c[R] == 0}) block, {algo}, size {size}: {got}")
    for _ in range(2):                       # the second call would take the fast path (N = 2)
        ro = np.ones(7)
        ro.flags.writeable = False
        raises(ValueError, lambda: comm.all_reduce(ro), "read-only in-place all_reduce (fast path)")
        comm.all_reduce(np.ones(7))
    zeros = np.array([0.0, -0.0, 0.0, -0.0, np.nan, 1.0]) * (1 if R % 2 else -1)
    zeros[3] = -0.0
    nan = np.array([np.nan], np.float64).view(np.int64) | (R + 1)   # a NaN payload per rank
    for dtype in (np.float64, np.float32, np.float16):
        for op in ("max", "min", "sum", "prod"):
            for algo in ["auto", "auto", "mpi", *cost.algorithms("all_reduce")]:
                x = zeros.astype(dtype)
                if op in ("sum", "prod"):
                    x = np.concatenate([x, nan.view(np.float64).astype(dtype)])
                if op in ("sum", "prod") and algo == "mpi":
                    continue                 # the library's own NaN payloads: not ours to fix
                comm.all_reduce(x, op=op, algo=algo)
                same_everywhere(x, f"all_reduce {op} {np.dtype(dtype).name} {algo} of signed zeros / NaN")
                if algo == "mpi" and op in ("max", "min"):
                    want_neg = op == "min"
                    if np.signbit(x[0]) != want_neg or np.signbit(x[1]) != want_neg or not np.isnan(x[4]):
                        fail(f"mpi {op}(+0, -0): {x} (max(+0,-0) = +0, min = -0, NaN propagates)")


if __name__ == "__main__":
    group = sys.argv[1]
    {"debug": group_debug, "local": group_local, "pair": group_pair}[group]()
    bad = WORLD.allreduce(len(failures))
    if R == 0:
        print(f"hardening {group} N={N}: {bad} failures", flush=True)
    raise SystemExit(1 if bad else 0)
