"""What the launcher (mpiexec: MPICH's Hydra or Open MPI's prterun) tells a process before MPI
starts: its world rank and the world size, from the environment. Entry points read them to
let one rank print a configuration error that every rank finds alike."""
import os

RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def env_rank():
    """This process's world rank from the launcher's environment (0 without mpiexec)."""
    for k in RANK_VARS:
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    return 0


def env_world():
    """The world size from the launcher's environment (1 without mpiexec)."""
    return max(int(v) if v.isdigit() else 1 for v in (os.environ.get(k, "1") for k in SIZE_VARS))
