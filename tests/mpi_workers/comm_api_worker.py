"""The Communicator's API beyond the algorithm matrix, in one launch:

- non-blocking collectives (async_op=True) of every algorithm, several in flight at once and
  completed in a different order on different ranks (tags keep them apart), with test()
  polling;
- consecutive blocking calls (one tag for all) while ranks run them on different paths, and
  with non-blocking calls in flight;
- repeated calls on the same arrays (the direct fast path and its plans); plans built once per
  communicator and arrays (plan_stats), none shared between shapes, dtypes or communicators,
  dropped by free() and revoke();
- non-contiguous and multi-dimensional arrays, in place and out of place;
- argument errors; point-to-point send/recv/sendrecv/isend/irecv (bfloat16 too); split.

    mpiexec -n N python tests/mpi_workers/comm_api_worker.py
(collectives_worker.py also runs it, so pytest needs one launch per rank count)
"""
import gc
import weakref

import numpy as np
from mpi4py import MPI

from collectives import Communicator, cost, direct, transport, wait_all
from collectives.debug import env_flags
from engine.backend import bfloat16

comm = Communicator()
N, R = comm.size, comm.rank
failures = []


def expect(cond, msg):
    if not cond:
        failures.append(msg)
        print(f"[rank {R}] FAIL {msg}", flush=True)


def rank_data(count, dtype=np.float64, salt=0):
    return (np.arange(count) * (R + 1 + salt) % 17 - 8).astype(dtype)


def summed(count, dtype=np.float64, salt=0):
    return sum((np.arange(count) * (k + 1 + salt) % 17 - 8) for k in range(N)).astype(dtype)


def test_nonblocking():
    for count in (0, 1, 37, 3001):
        handles, wants = [], []
        for i, algo in enumerate(["auto", "mpi", *cost.algorithms("all_reduce")]):
            x = rank_data(count, salt=i)
            handles.append(comm.all_reduce(x, algo=algo, async_op=True))
            wants.append((f"all_reduce {algo} count={count}", summed(count, salt=i)))
        for algo in ["auto", "mpi", *cost.algorithms("all_gather")]:
            x = rank_data(count)
            handles.append(comm.all_gather(x, algo=algo, async_op=True))
            wants.append((f"all_gather {algo} count={count}",
                          np.concatenate([(np.arange(count) * (k + 1) % 17 - 8) for k in range(N)])))
        for algo in ["auto", "mpi", *cost.algorithms("reduce_scatter")]:
            x = rank_data(count * N + 1, salt=5)
            h = comm.reduce_scatter(x, algo=algo, async_op=True)
            full = summed(count * N + 1, salt=5)
            c = [(count * N + 1) // N + (1 if k < (count * N + 1) % N else 0) for k in range(N)]
            handles.append(h)
            wants.append((f"reduce_scatter {algo} count={count}", full[sum(c[:R]):sum(c[:R + 1])]))
        for algo in ["mpi", "tree"]:
            b = np.arange(count, dtype=np.float64) if R == N - 1 else np.zeros(count)
            handles.append(comm.broadcast(b, root=N - 1, algo=algo, async_op=True))
            wants.append((f"broadcast {algo}", np.arange(count, dtype=np.float64)))
        handles.append(comm.barrier(async_op=True))
        wants.append(("barrier", None))
        order = list(range(len(handles)))
        if R % 2:
            order.reverse()                      # complete in a different order on odd ranks
        for _ in range(3):
            for k in order:
                handles[k].test()
        for k in order:
            got = handles[k].wait()
            name, want = wants[k]
            expect(want is None or np.array_equal(got, want), f"non-blocking {name}: {got} != {want}")
        expect(all(h.done for h in handles), "handles not done after wait")
    x = np.ones(5)
    h = comm.all_reduce(x, async_op=True)
    while not h.test():
        pass
    expect(np.all(x == N) and wait_all([h])[0] is x, "polling test() until done")


def test_repeated():
    """The fast path replays a plan: fresh values every call, in and out of place (enough calls
    for an all-gather plan to try both placements of its own block and settle on one). The
    placement trial and the overlapped copy's pieces are scaled down (64 B, 24 B) so that small
    arrays take them (the overlapped copy in 1 to 334 pieces)."""
    trial, chunk = direct.PLACE_TRIAL_BYTES, direct.OVERLAP_CHUNK
    direct.PLACE_TRIAL_BYTES, direct.OVERLAP_CHUNK = 64, 24
    try:
        _repeated()
    finally:
        direct.PLACE_TRIAL_BYTES, direct.OVERLAP_CHUNK = trial, chunk


def _repeated():
    for count in (1, 5, 1000):
        x, out = np.empty(count), np.empty(count)
        g_in, g_out = np.empty(count), np.empty(count * N)
        rs_in, rs_out = np.empty(count * N), np.empty(count)
        for step in range(2 * direct.TRIALS + 2):
            x[:] = rank_data(count, salt=step)
            comm.all_reduce(x, out=out)
            expect(np.array_equal(out, summed(count, salt=step)), f"repeated all_reduce out step {step}")
            comm.all_reduce(x, op="avg")
            expect(np.allclose(x, summed(count, salt=step) / N), f"repeated all_reduce avg step {step}")
            g_in[:] = rank_data(count, salt=step)
            comm.all_gather(g_in, out=g_out)
            want = np.concatenate([(np.arange(count) * (k + 1 + step) % 17 - 8) for k in range(N)])
            expect(np.array_equal(g_out, want), f"repeated all_gather step {step}")
            rs_in[:] = rank_data(count * N, salt=step)
            comm.reduce_scatter(rs_in, out=rs_out, op="max")
            full = np.max([(np.arange(count * N) * (k + 1 + step) % 17 - 8) for k in range(N)], axis=0)
            expect(np.array_equal(rs_out, full[R * count:(R + 1) * count]), f"repeated reduce_scatter step {step}")
            rs_in[:] = rank_data(count * N, salt=step)
            res = comm.reduce_scatter(rs_in)
            expect(np.array_equal(res, summed(count * N, salt=step)[R * count:(R + 1) * count]),
                   f"repeated reduce_scatter in place step {step}")


def test_one_blocking_tag():
    """Every blocking call's messages carry one tag (calls.Calls), so consecutive blocking
    calls must match in order however each rank runs them: here even ranks hold a receive in
    flight (so their blocking calls run on the general path, as handles progressed with it)
    while odd ranks replay fast-path plans, call after call; then every rank keeps
    non-blocking calls in flight across blocking ones."""
    counts = (1, 5, 1000)
    bufs = [(np.empty(c), np.empty(c), np.empty(c * N), np.empty(c * N), np.empty(c)) for c in counts]

    def blocking_round(step, what):
        for (x, out, g_out, rs_in, rs_out), c in zip(bufs, counts):
            x[:] = rank_data(c, salt=step)
            comm.all_reduce(x, out=out)
            comm.all_gather(x, out=g_out)
            rs_in[:] = rank_data(c * N, salt=step)
            comm.reduce_scatter(rs_in, out=rs_out)
            want = np.concatenate([(np.arange(c) * (k + 1 + step) % 17 - 8) for k in range(N)])
            expect(np.array_equal(out, summed(c, salt=step)) and np.array_equal(g_out, want)
                   and np.array_equal(rs_out, summed(c * N, salt=step)[R * c:(R + 1) * c]),
                   f"one blocking tag, {what}: count {c} step {step}")
    for step in range(3):                       # plans made where the fast path applies
        blocking_round(step, "plain")
    partner = R + 1 if R % 2 == 0 else R - 1
    held = comm.irecv(np.empty(2), partner, tag=9) if R % 2 == 0 and partner < N else None
    expect(bool(transport.ACTIVE) == (held is not None), "one blocking tag: the held receive is in flight")
    for step in range(3, 6):                    # even ranks: general path; odd: the plans
        blocking_round(step, "paths differ by rank")
    if R % 2 and partner < N:
        comm.send(np.full(2, 7.0), partner, tag=9)
    if held is not None:
        expect(np.all(held.wait() == 7.0), "one blocking tag: the held receive")
    a = rank_data(10, salt=1)
    h = comm.all_reduce(a, async_op=True)      # in flight across blocking calls, on every rank
    for step in range(6, 8):
        blocking_round(step, "a non-blocking call in flight")
    g = comm.all_gather(rank_data(3), async_op=True)
    blocking_round(8, "two non-blocking calls in flight")
    expect(np.array_equal(g.wait(), np.concatenate([(np.arange(3) * (k + 1) % 17 - 8) for k in range(N)]))
           and np.array_equal(h.wait(), summed(10, salt=1)), "one blocking tag: the non-blocking calls")


def test_plans():
    """A plan is built on the second call on given arrays (the first records auto's choice) and
    replayed after; a reshaped view or a view of the same bytes as another dtype gets its own;
    another communicator builds its own; free() and revoke() drop them (the arrays they kept
    alive go). Where the fast path does not apply (N not a power of two, debug flags) none is made."""
    fast = N & (N - 1) == 0 and not any(env_flags())
    one = 1 if fast else 0
    a, b = comm.split(0, label="plans a"), comm.split(0, label="plans b")
    expect(a.plan_stats() == {"built": 0, "kept": 0}, f"a new communicator has no plans: {a.plan_stats()}")
    count = 6 * N
    x, out = np.empty(count), np.empty(count)

    def reduced(c, src, dst, dtype, calls, what):
        for step in range(calls):
            src[...] = rank_data(count, dtype, salt=step).reshape(src.shape)
            c.all_reduce(src, out=dst)
            expect(np.array_equal(dst.reshape(-1), summed(count, dtype, salt=step)), f"plans: {what} step {step}")
    reduced(a, x, out, np.float64, 6, "float64")
    expect(a.plan_stats() == {"built": one, "kept": one}, f"plans: 6 calls build one plan: {a.plan_stats()}")
    reduced(a, x.reshape(2, -1), out.reshape(2, -1), np.float64, 3, "reshaped")
    expect(a.plan_stats()["built"] == 2 * one, f"plans: a reshaped view gets its own: {a.plan_stats()}")
    reduced(a, x.view(np.int64), out.view(np.int64), np.int64, 3, "int64 view of the same bytes")
    expect(a.plan_stats() == {"built": 3 * one, "kept": 3 * one}, f"plans: a dtype view gets its own: {a.plan_stats()}")
    reduced(a, x, out, np.float64, 2, "float64 again")
    expect(a.plan_stats()["built"] == 3 * one, f"plans: the first plan is still replayed: {a.plan_stats()}")
    reduced(b, x, out, np.float64, 3, "float64 on another communicator")
    expect(b.plan_stats()["built"] == one and a.plan_stats()["built"] == 3 * one,
           f"plans: each communicator builds its own: a {a.plan_stats()} b {b.plan_stats()}")
    y = np.empty(count)
    kept = weakref.ref(y)
    reduced(b, y, out, np.float64, 2, "an array only the plan keeps")
    del y
    gc.collect()
    expect((kept() is not None) == fast, "plans: a plan keeps its arrays alive")
    b.free()
    gc.collect()
    expect(b.plan_stats()["kept"] == 0 and kept() is None, "plans: free() drops them and their arrays")
    try:
        a.revoke()
    except NotImplementedError:            # an MPI without ULFM (MPICH's wheel): the plans went first
        pass
    expect(a.plan_stats()["kept"] == 0, f"plans: revoke() drops them: {a.plan_stats()}")


def test_layouts():
    big = np.zeros((6, 2 * N + 3))
    view = big[:, ::2]                                   # non-contiguous
    view[...] = R + 1
    comm.all_reduce(view)
    expect(np.all(view == N * (N + 1) / 2) and np.all(big[:, 1::2] == 0), "all_reduce of a strided view")
    out = np.zeros((N * 6, 2 * N + 3))[:, ::2]
    comm.all_gather(np.full((6, view.shape[1]), float(R)), out=out)
    expect(all(np.all(out[6 * k:6 * k + 6] == k) for k in range(N)), "all_gather into a strided out")
    m = np.full((3, 4, 5), R, np.float32)
    g = comm.all_gather(m)
    expect(g.shape == (3 * N, 4, 5) and all(np.all(g[3 * k:3 * k + 3] == k) for k in range(N)),
           "all_gather of a 3-D array concatenates along axis 0")
    a = np.full((4, 3), R, np.int64)
    r = comm.reduce_scatter(np.ascontiguousarray(np.broadcast_to(np.arange(N * 2.0), (3, N * 2)).T),
                            out=np.empty((2, 3)))
    expect(np.array_equal(r, np.broadcast_to(N * np.arange(2.0 * R, 2.0 * R + 2)[:, None], (2, 3))),
           "reduce_scatter of a 2-D array splits the flattened array")
    comm.broadcast(a[:, 1], root=0)                       # strided, in place
    expect(np.all(a[:, 1] == 0) and np.all(a[:, 0] == R), "broadcast of a strided column")
    y = np.arange(N * 3.0) + 10 * R
    t = comm.all_to_all(y.reshape(N, 3))
    expect(t.shape == (N, 3) and np.array_equal(t[:, 0], 10 * np.arange(N) + 3 * R), "all_to_all 2-D")


def test_errors():
    def raises(exc, fn, what):
        try:
            fn()
        except exc:
            return
        expect(False, f"expected {exc.__name__}: {what}")
    raises(ValueError, lambda: comm.all_reduce(np.ones(3), out=np.ones(4)), "out size")
    raises(TypeError, lambda: comm.all_reduce(np.ones(3), out=np.ones(3, np.float32)), "out dtype")
    raises(ValueError, lambda: comm.all_reduce(np.ones(3), op="mean"), "unknown op")
    raises(ValueError, lambda: comm.all_reduce(np.ones(3), algo="nccl"), "unknown algo")
    raises(TypeError, lambda: comm.all_reduce([1.0, 2.0]), "a list is not an array")
    raises(TypeError, lambda: comm.all_reduce(np.array(["a"])), "string dtype")
    x = np.ones(8)
    raises(ValueError, lambda: comm.all_reduce(x[:6], out=x[2:]), "overlapping out")
    raises(ValueError, lambda: comm.reduce_scatter(np.ones((4, 4 * N))[:, ::2]), "in-place strided reduce_scatter")
    raises(ValueError, lambda: comm.all_gather(np.ones(2), counts=[1] * N), "counts[rank] != size")
    if N > 1:
        raises(ValueError, lambda: comm.all_to_all(np.ones(N + 1)), "indivisible all_to_all")


def test_p2p_and_split():
    if N > 1:
        right, left = (R + 1) % N, (R - 1) % N
        x = np.arange(4, dtype=bfloat16()) + R
        got = comm.sendrecv(x, right, recv_from=left)
        expect(got.dtype == x.dtype and np.array_equal(got, np.arange(4, dtype=bfloat16()) + left), "sendrecv bf16")
        h = comm.irecv(np.empty(3, np.int32), left, tag=5)
        s = comm.isend(np.full(3, R, np.int32), right, tag=5)
        expect(np.all(h.wait() == left) and s.wait() is None, "isend/irecv")
        if R == 0:
            comm.send(np.full(2, 42.0), 1, tag=1)
        if R == (N - 1 if N > 2 else 0):
            comm.send(np.full(2, 43.0), 1, tag=2)
        if R == 1:
            expect(np.all(comm.recv(np.empty(2), 0, tag=1) == 42.0), "send/recv")
            expect(np.all(comm.recv(np.empty(2), tag=2) == 43.0), "recv from any source")
        col = np.zeros((3, 2))
        if R == 0:
            comm.send(np.arange(3.0), N - 1, tag=3)
        if R == N - 1:
            comm.recv(col[:, 1], 0, tag=3)
            expect(np.array_equal(col[:, 1], np.arange(3.0)), "recv into a strided view")
    sub = comm.split(R % 2)
    expect(sub.size == (N + 1 - R % 2) // 2 and sub.rank == R // 2, "split sizes")
    v = np.full(3, float(R))
    sub.all_reduce(v)
    expect(np.all(v == sum(k for k in range(N) if k % 2 == R % 2)), "all_reduce on a split communicator")
    expect(comm.split(None) is None, "split(None) gives None")


def run():
    """Run every test here; returns the number of failures over all ranks."""
    for test in (test_nonblocking, test_repeated, test_one_blocking_tag, test_plans, test_layouts, test_errors, test_p2p_and_split):
        test()
    bad = MPI.COMM_WORLD.allreduce(len(failures))
    if R == 0:
        print(f"comm api N={N}: {bad} failures over all ranks", flush=True)
    return bad


if __name__ == "__main__":
    raise SystemExit(1 if run() else 0)
