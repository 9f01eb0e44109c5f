"""Mesh(dp, pp, sp, tp): layout, per-axis communicators, neighbours; a wrong product fails on every rank."""
import pytest

from mpi_util import describe, run_mpi


@pytest.mark.parametrize("n, layout", [(8, (2, 2, 1, 2)), (8, (1, 2, 4, 1)), (6, (3, 2, 1, 1)), (1, (1, 1, 1, 1))])
def test_mesh_layout(n, layout):
    proc = run_mpi(n, "mesh_worker.py", *layout, timeout=120)
    assert proc.returncode == 0, describe(proc)
    assert "0 failures" in proc.stdout, describe(proc)


def test_mesh_wrong_product_fails_on_every_rank():
    proc = run_mpi(3, "mesh_worker.py", 2, 1, 1, 1, timeout=60)
    assert proc.returncode != 0, describe(proc)
    for r in range(3):
        assert f"rank {r} MeshError: Mesh(dp=2, pp=1, sp=1, tp=1) needs dp*pp*sp*tp = 2 ranks, but the job has 3" \
            in proc.stdout, describe(proc)
