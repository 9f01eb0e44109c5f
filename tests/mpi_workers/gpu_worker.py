"""The collectives on CuPy arrays (several ranks may share one GPU), against the host oracle.

    mpiexec -n N python tests/mpi_workers/gpu_worker.py
    ENGINE_CUDA_AWARE_MPI=1 mpiexec -n N python tests/mpi_workers/gpu_worker.py   # device buffers to MPI

Every algorithm, counts 0, 1, N-1, 13, 10007, dtypes float16/float32/float64/int32/int64
(CuPy has no bfloat16), ops sum/max, in place and out of place: the device result, copied
to the host, must equal the same collective run on host copies with algo="mpi" within the
bound of collectives_worker.py. By default the MPI is taken as not CUDA-aware, so device
buffers are staged through host memory (buffers.py).
"""
import numpy as np
from mpi4py import MPI

from collectives import Communicator, cost
from engine import backend

backend.set_device("gpu")
cp = backend.xp()
cp.cuda.Device(MPI.COMM_WORLD.Get_rank() % cp.cuda.runtime.getDeviceCount()).use()
comm = Communicator()
N, R = comm.size, comm.rank
UNIT = {"float16": 2.0 ** -11, "float32": 2.0 ** -24, "float64": 2.0 ** -53}
failures = []


def check(name, got, want, dtype, op, scale):
    g = backend.to_numpy(got).astype(np.float64).reshape(-1)
    w = np.asarray(want, np.float64).reshape(-1)
    tol = 0 if (dtype.kind in "iu" or op == "max") else 2 * max(N - 1, 0) * UNIT[dtype.name] * scale + 1e-300
    if g.shape != w.shape or np.any(np.abs(g - w) > tol):
        failures.append(name)
        print(f"[rank {R}] FAIL {name}", flush=True)


for count in sorted({0, 1, max(N - 1, 0), 13, 10007}):
    counts = [count // N + (1 if i < count % N else 0) for i in range(N)]
    lo, hi = sum(counts[:R]), sum(counts[:R + 1])
    for dtype in map(np.dtype, (np.float16, np.float32, np.float64, np.int32, np.int64)):
        for op in ("sum", "max"):
            rng = np.random.default_rng([R, count])
            h = (rng.integers(-100, 100, count) if dtype.kind in "iu" else rng.uniform(-1, 1, count)).astype(dtype)
            scale = MPI.COMM_WORLD.allreduce(np.abs(h.astype(np.float64)), op=MPI.SUM) if count else 0
            want = comm.all_reduce(h.copy(), op=op, algo="mpi")
            tag = f"count={count} {dtype} {op}"
            for algo in ["auto", *cost.algorithms("all_reduce")]:
                d = cp.asarray(h)
                check(f"all_reduce {algo} {tag}", comm.all_reduce(d, op=op, algo=algo), want, dtype, op, scale)
                o = cp.empty_like(d)
                comm.all_reduce(cp.asarray(h), op=op, out=o, algo=algo)
                check(f"all_reduce {algo} out {tag}", o, want, dtype, op, scale)
            for algo in ["auto", *cost.algorithms("reduce_scatter")]:
                got = comm.reduce_scatter(cp.asarray(h), op=op, algo=algo)
                check(f"reduce_scatter {algo} {tag}", got, want[lo:hi], dtype, op, scale[lo:hi] if count else 0)
        want = np.concatenate(MPI.COMM_WORLD.allgather(h[:counts[R]]))
        for algo in ["auto", *cost.algorithms("all_gather")]:
            got = comm.all_gather(cp.asarray(h[:counts[R]]), counts=counts, algo=algo)
            check(f"all_gather {algo} count={count} {dtype}", got, want, dtype, "max", 0)
        b = cp.asarray(h) if R == 0 else cp.zeros(count, dtype)
        comm.broadcast(b, root=0)
        check(f"broadcast count={count} {dtype}", b, MPI.COMM_WORLD.bcast(h, root=0), dtype, "max", 0)
bad = MPI.COMM_WORLD.allreduce(len(failures))
if R == 0:
    print(f"gpu collectives N={N}: {bad} failures over all ranks", flush=True)
raise SystemExit(1 if bad else 0)
