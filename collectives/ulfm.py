"""Shrinking a job in place when ranks die: MPI's User-Level Failure Mitigation (ULFM; Bland,
Bouteiller, Herault, Bosilca and Dongarra 2013, "Post-failure recovery of MPI communication
capability"), as Open MPI 5 implements it (mpiexec --with-ft ulfm --mca mpi_ft_detector true).

    a peer dies        -> a survivor's wait on it fails with ERR_PROC_FAILED; under enable(),
                          a watched wait raises PeerFailed (transport.py test_all)
    revoke_all()       -> this rank revokes every communicator it holds (Communicator.revoke):
                          every rank waiting on one of them fails too (ERR_REVOKED), so the
                          failure reaches every survivor, whichever communicator it waits on
    shrink(world)      -> MPI_Comm_agree (every survivor has stopped), then MPI_Comm_shrink:
                          a new world of the survivors, in their old order, and who they are
    exit_now(code, comm) -> the end without MPI_Finalize (which would wait for the dead), once
                          every rank of comm got there (linger): no last message dies unsent

The caller rebuilds its Mesh and Step on the new world (train.py: elastic/inplace.py). Cost:
the failure detector's heartbeat (mpi_ft_detector, milliseconds), one agreement and one
shrink, O(log N) messages each. The MPICH wheel's ULFM does not work (available() is False):
its users get relaunches (elastic/supervisor.py) instead.
"""
import os
import sys
import time

from mpi4py import MPI

from . import transport, watchdog
from .communicator import LIVE, Communicator
from .transport import PeerFailed

FAILED = tuple(getattr(MPI, n) for n in ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED") if hasattr(MPI, n))


def available():
    """Whether this job can shrink in place: Open MPI with ULFM, launched with fault tolerance
    on (mpiexec --with-ft ulfm sets OMPI_MCA_mpi_ft_enable=1 in every rank's environment)."""
    return (hasattr(MPI.Comm, "Shrink") and "Open MPI" in MPI.Get_library_version()
            and os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true"))


def library():
    """This MPI library's name and version, for messages ("MPICH Version: 5.0.2")."""
    return " ".join(MPI.Get_library_version().split()[:3])


def enable():
    """From now on a watched wait whose peer failed raises PeerFailed (instead of waiting for
    the watchdog's deadline)."""
    transport.ON_FAILURE[0] = "raise"


def is_failure(exc):
    """Whether an exception says a peer failed: PeerFailed, or MPI's own failure classes."""
    if isinstance(exc, PeerFailed):
        return True
    return isinstance(exc, MPI.Exception) and exc.Get_error_class() in FAILED


def revoke_all():
    """Revoke every communicator of this process (errors on already revoked ones are fine)."""
    for c in list(LIVE):
        try:
            c.revoke()
        except MPI.Exception:
            pass


def shrink(world):
    """The survivors of ``world`` (a Communicator) as a new Communicator, and their world ranks
    (ranks of ``world``) in order. Collective over the survivors."""
    revoke_all()
    transport.abandon_all()
    try:
        world.mpi.Agree(1)
    except MPI.Exception:
        pass                                     # a failure acknowledged; the shrink follows
    new = world.mpi.Shrink()
    survivors = MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), world.mpi.Get_group())
    watchdog.set_world(new)
    return Communicator(new, "world"), list(survivors)


def linger(comm, seconds=30.0):
    """Wait until every rank of ``comm`` (an mpi4py communicator) got here, at most ``seconds``;
    a failure on the way is ignored. Every rank calls it before one may end without MPI_Finalize:
    such a process can take its last, still unflushed message with it, and the peer's receive
    then fails with ERR_PROC_FAILED (a CI run of tests/mpi_workers/ulfm_smoke.py saw it). Every
    rank has all its data when it starts the barrier, so a failure inside it loses nothing."""
    try:
        req, end = comm.Ibarrier(), time.monotonic() + seconds
        while not req.Test() and time.monotonic() < end:
            time.sleep(0.001)
    except MPI.Exception:
        pass


def exit_now(code, comm=None):
    """End this process with ``code`` without MPI_Finalize, which waits for the dead ranks
    after a shrink (Open MPI); output is flushed first, and with ``comm`` every rank of it
    lingers (linger) until all are done."""
    if comm is not None:
        linger(comm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
