"""Mesh(dp, pp, sp, tp) on the world: layout, per-axis communicators, neighbours, errors.

    mpiexec -n N python tests/mpi_workers/mesh_worker.py DP PP SP TP

A layout whose product is not N must raise MeshError on every rank: each rank prints
"rank R MeshError: ..." and exits 3. Otherwise every rank checks its axes against an
independent enumeration of the grid and prints a summary from rank 0.
"""
import itertools
import sys

import numpy as np
from mpi4py import MPI

from collectives import Mesh, MeshError

dp, pp, sp, tp = (int(a) for a in sys.argv[1:5])
R = MPI.COMM_WORLD.Get_rank()
try:
    mesh = Mesh(dp=dp, pp=pp, sp=sp, tp=tp)
except MeshError as e:
    print(f"rank {R} MeshError: {e}", flush=True)
    raise SystemExit(3)

failures = []


def expect(cond, msg):
    if not cond:
        failures.append(msg)
        print(f"[rank {R}] FAIL {msg}", flush=True)


shape = {"dp": dp, "pp": pp, "sp": sp, "tp": tp}
# the documented layout, enumerated independently: tp fastest, then sp, dp, pp
grid = {}
for w, (p, d, s, t) in enumerate(itertools.product(range(pp), range(dp), range(sp), range(tp))):
    grid[w] = {"pp": p, "dp": d, "sp": s, "tp": t}
me = grid[R]
expect(mesh.coords == me, f"coords {mesh.coords} != {me}")
for axis, size in shape.items():
    group = sorted((w for w, c in grid.items() if all(c[a] == me[a] for a in shape if a != axis)),
                   key=lambda w: grid[w][axis])
    comm = getattr(mesh, f"{axis}_comm")
    expect(comm.size == size and getattr(mesh, f"{axis}_size") == size, f"{axis} size")
    expect(getattr(mesh, f"{axis}_rank") == me[axis] == comm.rank, f"{axis} rank")
    members = comm.all_gather(np.array([R]))
    expect(members.tolist() == group == mesh.axis(axis).world_ranks, f"{axis} group {members.tolist()} != {group}")
    r = me[axis]
    expect(getattr(mesh, f"{axis}_prev") == (r - 1 if r > 0 else None), f"{axis}_prev")
    expect(getattr(mesh, f"{axis}_next") == (r + 1 if r < size - 1 else None), f"{axis}_next")
    expect(getattr(mesh, f"{axis}_ring_prev") == (r - 1) % size, f"{axis}_ring_prev")
    expect(getattr(mesh, f"{axis}_ring_next") == (r + 1) % size, f"{axis}_ring_next")
    expect(getattr(mesh, f"{axis}_first") == (r == 0) and getattr(mesh, f"{axis}_last") == (r == size - 1),
           f"{axis} first/last")
    total = comm.all_reduce(np.array([float(R)]))
    expect(total[0] == sum(group), f"all_reduce over {axis}")
    expect(mesh.rank_of(**me) == R, "rank_of")
bad = MPI.COMM_WORLD.allreduce(len(failures))
if R == 0:
    print(f"mesh dp={dp} pp={pp} sp={sp} tp={tp}: {bad} failures", flush=True)
raise SystemExit(1 if bad else 0)
