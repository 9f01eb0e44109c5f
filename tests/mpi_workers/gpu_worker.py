"""The collectives and point-to-point messages on device arrays, against the host oracle; under
the device double also what crosses the host/device boundary (tests/test_collectives_gpu.py).

    ENGINE_DEVICE=gpu-emulated mpiexec -n N python tests/mpi_workers/gpu_worker.py   # staged
    ENGINE_DEVICE=gpu-emulated ENGINE_GPU_DOUBLE_CUDA_AWARE=1 mpiexec -n N ...       # device buffers to MPI
    ENGINE_DEVICE=gpu-emulated ENGINE_GPU_DOUBLE_DEVICES=2 mpiexec -n 4 ...          # ranks 0,1,0,1 on 2 GPUs
    mpiexec -n N python tests/mpi_workers/gpu_worker.py        # CuPy on a real GPU (several ranks may share one)

Each rank takes its GPU with collectives.devices.select_gpu (local rank % device count).
Every algorithm, counts 0, 1, N-1, 13, 10007, dtypes float16/float32/float64/int32/int64
(CuPy has no bfloat16), ops sum/max, in place and out of place; reduce, all_to_all, a
strided input, a non-blocking all-reduce, point-to-point send/recv/sendrecv/isend/irecv:
the device result, copied to the host, must equal the same operation on host copies within
the bound of collectives_worker.py. Then, per the MPI's CUDA awareness (devices.cuda_aware):
- the guard: a device array handed to MPI (transport.to_mpi) raises unless CUDA-aware;
- the staging pool: after one warm-up round of every kind of call, further rounds allocate
  no pinned memory (devices.POOL, and the double's memory.pinned_bytes);
- under the double: CUDA-aware calls cross the host/device boundary zero times; staged
  calls copy each staged buffer exactly once each way (in-place all_reduce: 1 d2h, 1 h2d).
"""
import numpy as np
from mpi4py import MPI

from collectives import Communicator, cost
from collectives.devices import POOL, cuda_aware, cuda_aware_source, select_gpu
from collectives.transport import DeviceBufferError, to_mpi
from engine import backend

backend.set_device("gpu")
cp = backend.xp()
world = MPI.COMM_WORLD
device = select_gpu()
comm = Communicator()
N, R = comm.size, comm.rank
AWARE = cuda_aware()
if backend.emulated():
    from engine.device_double import memory
else:
    memory = None
UNIT = {"float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
failures = []
crossed = [0, 0]          # calls under the double that moved host<->device data, all calls counted


def fail(name):
    failures.append(name)
    print(f"[rank {R}] FAIL {name}", flush=True)


def moves():
    return (memory.h2d, memory.d2h, memory.implicit_h2d, memory.h2d_bytes, memory.d2h_bytes)


def call(name, fn):
    """Run one collective or message; under the double count what crossed the boundary."""
    if memory is None:
        return fn()
    before = moves()
    result = fn()
    delta = [a - b for a, b in zip(moves(), before)]
    crossed[1] += 1
    if any(delta[:3]):
        crossed[0] += 1
        if AWARE:
            fail(f"{name}: host/device transfers {delta[:3]} under CUDA-aware MPI")
        elif delta[2]:
            fail(f"{name}: {delta[2]} implicit host->device conversions while staging")
    return result


def check(name, got, want, dtype, op, scale):
    g = backend.to_numpy(got).astype(np.float64).reshape(-1)
    w = np.asarray(want, np.float64).reshape(-1)
    tol = 0 if (dtype.kind in "iu" or op == "max") else 2 * max(N - 1, 0) * UNIT[dtype.name] * scale + 1e-300
    if g.shape != w.shape or np.any(np.abs(g - w) > tol):
        fail(name)


# ---- which device each rank took ---------------------------------------------------------------
devices = world.gather((device, backend.current_device()), root=0)
if R == 0:
    print(f"devices: {[d for d, _ in devices]} (of {backend.device_count()})", flush=True)
    if any(d != cur for d, cur in devices):
        fail(f"select_gpu returned one device, another is current: {devices}")
if R == 0:
    print(f"cuda-aware: {AWARE} ({cuda_aware_source()})", flush=True)

# ---- every algorithm against the library on host copies ----------------------------------------
for count in sorted({0, 1, max(N - 1, 0), 13, 10007}):
    counts = [count // N + (1 if i < count % N else 0) for i in range(N)]
    lo, hi = sum(counts[:R]), sum(counts[:R + 1])
    for dtype in map(np.dtype, (np.float16, np.float32, np.float64, np.int32, np.int64)):
        for op in ("sum", "max"):
            rng = np.random.default_rng([R, count])
            h = (rng.integers(-100, 100, count) if dtype.kind in "iu" else rng.uniform(-1, 1, count)).astype(dtype)
            scale = world.allreduce(np.abs(h.astype(np.float64)), op=MPI.SUM) if count else 0
            want = comm.all_reduce(h.copy(), op=op, algo="mpi")
            tag = f"count={count} {dtype} {op}"
            for algo in ["auto", *cost.algorithms("all_reduce"), "mpi"]:
                d = cp.asarray(h)
                got = call(f"all_reduce {algo}", lambda: comm.all_reduce(d, op=op, algo=algo))
                check(f"all_reduce {algo} {tag}", got, want, dtype, op, scale)
                o, d = cp.empty_like(d), cp.asarray(h)
                call(f"all_reduce {algo} out", lambda: comm.all_reduce(d, op=op, out=o, algo=algo))
                check(f"all_reduce {algo} out {tag}", o, want, dtype, op, scale)
            for algo in ["auto", *cost.algorithms("reduce_scatter"), "mpi"]:
                d = cp.asarray(h)
                got = call(f"reduce_scatter {algo}", lambda: comm.reduce_scatter(d, op=op, algo=algo))
                check(f"reduce_scatter {algo} {tag}", got, want[lo:hi], dtype, op, scale[lo:hi] if count else 0)
            for algo in ("auto", "mpi"):
                d = cp.asarray(h)
                got = call(f"reduce {algo}", lambda: comm.reduce(d, root=N - 1, op=op, algo=algo))
                if R == N - 1:
                    check(f"reduce {algo} {tag}", got, want, dtype, op, scale)
        want = np.concatenate(world.allgather(h[:counts[R]]))
        for algo in ["auto", *cost.algorithms("all_gather"), "mpi"]:
            d = cp.asarray(h[:counts[R]])
            got = call(f"all_gather {algo}", lambda: comm.all_gather(d, counts=counts, algo=algo))
            check(f"all_gather {algo} count={count} {dtype}", got, want, dtype, "max", 0)
        for algo in ("auto", "mpi"):
            b = cp.asarray(h) if R == 0 else cp.zeros(count, dtype)
            call(f"broadcast {algo}", lambda: comm.broadcast(b, root=0, algo=algo))
            check(f"broadcast {algo} count={count} {dtype}", b, world.bcast(h, root=0), dtype, "max", 0)

# ---- all_to_all, a strided input, non-blocking, point-to-point ----------------------------------
x = (np.arange(4 * N * N, dtype=np.float32) + 1000 * R).reshape(N, -1)
want = np.concatenate(world.alltoall(list(x)))
for algo in ("auto", "mpi"):
    d = cp.asarray(x)
    got = call(f"all_to_all {algo}", lambda: comm.all_to_all(d, algo=algo))
    check(f"all_to_all {algo}", got, want, x.dtype, "max", 0)
base = np.arange(40, dtype=np.float64).reshape(8, 5)
full = cp.asarray(base * (R + 1))
strided = full[::2, 1:4]                                  # (4, 3), not contiguous
call("all_reduce strided", lambda: comm.all_reduce(strided))
want = base * (R + 1)
want[::2, 1:4] = base[::2, 1:4] * (N * (N + 1) // 2)    # the rest of full is untouched
check("all_reduce strided", full, want, np.dtype(np.float64), "max", 0)
d = cp.full(1000, float(R + 1), dtype=cp.float32)
handle = call("all_reduce async", lambda: comm.all_reduce(d, async_op=True))
call("all_reduce async wait", handle.wait)
check("all_reduce async", d, np.full(1000, N * (N + 1) / 2), np.dtype(np.float32), "max", 0)
right, left = (R + 1) % N, (R - 1) % N
msg = cp.asarray(np.arange(257, dtype=np.int32) * (R + 1))
got = call("sendrecv", lambda: comm.sendrecv(msg, right, recv_from=left))
check("sendrecv", got, np.arange(257) * (left + 1), np.dtype(np.int32), "max", 0)
if N > 1:
    if R == 0:
        call("send", lambda: comm.send(msg, 1, tag=5))
        call("isend", lambda: comm.isend(msg * 2, 1, tag=6).wait())
    elif R == 1:
        into = cp.zeros(257, dtype=cp.int32)
        check("recv", call("recv", lambda: comm.recv(into, 0, tag=5)), np.arange(257), np.dtype(np.int32), "max", 0)
        h2 = call("irecv", lambda: comm.irecv(cp.zeros((257,), cp.int32), 0, tag=6))
        check("irecv", call("irecv wait", h2.wait), np.arange(257) * 2, np.dtype(np.int32), "max", 0)

# ---- the guard at the hand-off to MPI ------------------------------------------------------------
try:
    to_mpi(cp.zeros(3))
    if not AWARE:
        fail("to_mpi let a device array through to an MPI that is not CUDA-aware")
except DeviceBufferError as e:
    if AWARE:
        fail(f"to_mpi refused a device array under CUDA-aware MPI: {e}")

# ---- the staging pool stops growing after one warm-up round ---------------------------------------
COUNT = 10007
xs = cp.asarray(np.ones(COUNT, np.float32))
outs = cp.empty_like(xs)
blk = cp.asarray(np.ones(COUNT // N + 1, np.float32))
gathered = cp.empty(N * blk.size, cp.float32)
ROUND = [("all_reduce", lambda: comm.all_reduce(xs)),
         ("all_reduce out", lambda: comm.all_reduce(xs, out=outs, algo="ring")),
         ("reduce_scatter", lambda: comm.reduce_scatter(outs)),
         ("all_gather", lambda: comm.all_gather(blk, out=gathered)),
         ("broadcast", lambda: comm.broadcast(xs, root=0)),
         ("reduce", lambda: comm.reduce(xs, root=0, algo="mpi")),
         ("all_reduce async", lambda: comm.all_reduce(outs, async_op=True).wait()),
         ("sendrecv", lambda: comm.sendrecv(xs, right, out=outs, recv_from=left))]
growth = []
for rnd in range(4):
    pinned = (POOL.allocated, memory.pinned_bytes if memory is not None else 0)
    for name, fn in ROUND:
        if memory is not None and name == "all_reduce" and not AWARE:
            before = moves()
            fn()
            delta = [a - b for a, b in zip(moves(), before)]
            if delta != [1, 1, 0, xs.nbytes, xs.nbytes]:
                fail(f"staged in-place all_reduce of {xs.nbytes} B moved (h2d, d2h, implicit, h2d B, d2h B) "
                     f"= {delta}, expected one copy each way")
        else:
            call(f"{name} round {rnd}", fn)
    if rnd:
        growth.append(POOL.allocated - pinned[0] + (memory.pinned_bytes - pinned[1] if memory is not None else 0))
if any(growth):
    fail(f"the pinned pool grew after the warm-up round: {growth} bytes per round")
if AWARE and POOL.allocated:
    fail(f"CUDA-aware MPI staged through {POOL.allocated} pinned bytes")

bad = world.allreduce(len(failures))
staged = world.allreduce(crossed[0])
calls = world.allreduce(crossed[1])
if R == 0:
    kept = POOL.kept()
    print(f"boundary: {staged} of {calls} calls moved host<->device data (cuda-aware: {AWARE})", flush=True)
    print(f"pinned pool: {POOL.allocated} B allocated, {kept[0]} buffers kept ({kept[1]} B), "
          f"growth after warm-up {max(growth, default=0)} B", flush=True)
    print(f"gpu collectives N={N}: {bad} failures over all ranks", flush=True)
raise SystemExit(1 if bad else 0)
