"""Device (GPU) buffers and MPI: is the library CUDA-aware, staging through pinned host memory,
and which GPU each rank uses.

CUDA-aware MPI (Wang et al., "MVAPICH2-GPU: optimized GPU to GPU communication for InfiniBand
clusters", ISC 2011): the library takes device pointers and moves them itself (GPUDirect, or
its own pipelined staging). Where it does not, the caller stages: device -> pinned host, MPI
on host memory, host -> device. A message of n bytes then costs

    t_staged = 2 n / B_pcie + t_mpi(n)        against    t_direct = t_mpi(n)

(one device-to-host and one host-to-device copy over the bus, bandwidth B_pcie; pinned
(page-locked) memory is what lets those copies run at full bus speed, cupyx.empty_pinned).

Detection, once per process (cuda_aware()), first that answers:
  1. ENGINE_CUDA_AWARE_MPI=1|0, when set (the override);
  2. under ENGINE_DEVICE=gpu-emulated, the device double's mpi_cuda_aware()
     (ENGINE_GPU_DOUBLE_CUDA_AWARE, engine/device_double.py);
  3. mpi4py's MPI.Query_cuda_support(), where this mpi4py has it;
  4. MPIX_Query_cuda_support() of the loaded libmpi (Open MPI, MPICH >= 4), through ctypes;
  5. otherwise False: staging is always correct, only slower.

The staging pool (POOL). Pinned memory is slow to allocate (a driver call that page-locks
it), so staged host buffers are lent from a pool of raw byte buffers, one list per size
class (a power of two, at least 4 KiB), viewed as the caller's dtype. A buffer is lent
again only once nothing references it (the views a collective made of it, the MPI requests
holding them, the closures copying results back: all gone when the call completes), which
the pool reads from the buffer's reference count; so a repeated collective allocates
nothing new. Memory: at most KEEP buffers per class are kept, each under twice its request.

Ranks per GPU (select_gpu): the ranks on one node (the MPI_COMM_TYPE_SHARED split of
COMM_WORLD) are numbered 0, 1, ... (local rank); rank r uses device local_rank % count, so
4 ranks on a node with 2 GPUs use devices 0, 1, 0, 1, and several ranks may share one.
"""
import ctypes
import os
import sys

import numpy as np
from mpi4py import MPI

from engine import backend

_MIN_CLASS = 4096
KEEP = 4                    # buffers kept per size class


def _flag(text):
    return text.strip().lower() not in ("", "0", "false", "no", "off")


def _mpix_query():
    """MPIX_Query_cuda_support() of the libmpi this process has loaded, or None if no loaded
    library exports it."""
    handles = [None]                               # the process's global namespace first
    try:
        with open("/proc/self/maps") as f:
            handles += sorted({line.split()[-1] for line in f if "libmpi" in line.rsplit("/", 1)[-1]})
    except OSError:                                # not Linux: the global namespace only
        pass
    for path in handles:
        try:
            lib = ctypes.CDLL(path, mode=getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)) \
                if path else ctypes.CDLL(None)
            fn = lib.MPIX_Query_cuda_support
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_int, []
        return bool(fn())
    return None


def detect(env=None, mpi=MPI, mpix=_mpix_query):
    """(cuda_aware, how it was decided): the order of the module docstring. env: the
    environment (default os.environ); mpi: the mpi4py MPI module; mpix: the ctypes query."""
    env = os.environ if env is None else env
    if env.get("ENGINE_CUDA_AWARE_MPI") is not None:
        return _flag(env["ENGINE_CUDA_AWARE_MPI"]), "ENGINE_CUDA_AWARE_MPI"
    if backend.emulated():
        from engine import device_double
        return device_double.mpi_cuda_aware(), "the device double (ENGINE_GPU_DOUBLE_CUDA_AWARE)"
    query = getattr(mpi, "Query_cuda_support", None)
    if query is not None:
        try:
            return bool(query()), "MPI.Query_cuda_support"
        except Exception:  # pragma: no cover - depends on the MPI library
            pass
    try:
        found = mpix()
    except Exception:  # pragma: no cover - depends on the MPI library
        found = None
    if found is not None:
        return found, "MPIX_Query_cuda_support"
    return False, "no query answered (assumed not CUDA-aware)"


_detected = None


def cuda_aware():
    """Whether device buffers may be handed to MPI (decided once, see detect)."""
    global _detected
    if _detected is None:
        _detected = detect()
    return _detected[0]


def cuda_aware_source():
    """How cuda_aware() was decided (for logs and benchmark headers)."""
    cuda_aware()
    return _detected[1]


# ---- the pinned staging pool ---------------------------------------------------------------

def _refs(bucket, i):
    return sys.getrefcount(bucket[i])


_FREE_REFS = _refs([np.empty(0)], 0)      # a buffer only its pool's list holds, counted here


class PinnedPool:
    """Pinned host byte buffers by size class, lent while nothing else references them."""

    def __init__(self, keep=KEEP):
        self.keep = keep
        self.classes = {}          # size class (bytes) -> kept raw uint8 buffers
        self.allocated = 0         # pinned bytes allocated so far (kept or not)

    def take(self, nbytes):
        """A raw uint8 pinned buffer of at least nbytes, referenced by nobody else."""
        size = max(_MIN_CLASS, 1 << max(nbytes - 1, 0).bit_length())
        bucket = self.classes.setdefault(size, [])
        for i in range(len(bucket)):
            if _refs(bucket, i) == _FREE_REFS:
                return bucket[i]
        raw = backend.empty_pinned(size, np.uint8)
        self.allocated += size
        if len(bucket) < self.keep:
            bucket.append(raw)
        return raw

    def array(self, n, dtype):
        """A 1-D host array of n elements of dtype in a lent buffer."""
        nbytes = n * dtype.itemsize
        return self.take(nbytes)[:nbytes].view(dtype)

    def kept(self):
        """(buffers kept, their bytes)."""
        bufs = [b for bucket in self.classes.values() for b in bucket]
        return len(bufs), sum(b.nbytes for b in bufs)


POOL = PinnedPool()


def to_host(a):
    """A flat host copy of device array a, in a pinned buffer from POOL (one device-to-host copy)."""
    if a.size == 0:
        return np.empty(0, a.dtype)
    h = POOL.array(a.size, a.dtype)
    if not a.flags.c_contiguous:
        a = backend.get_array_module(a).ascontiguousarray(a)
    backend.copy_into(h.reshape(a.shape), a)
    return h


# ---- which GPU a rank uses ------------------------------------------------------------------

LAUNCHER_LOCAL = (("MPI_LOCALRANKID", "MPI_LOCALNRANKS"),                       # MPICH's Hydra
                  ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))  # Open MPI's prterun


def local_rank(comm=None):
    """(this rank's index among the ranks on its node, how many ranks the node has): what the
    launcher says (Hydra's MPI_LOCALRANKID, Open MPI's OMPI_COMM_WORLD_LOCAL_RANK; no message),
    else the MPI_COMM_TYPE_SHARED split of comm (default COMM_WORLD), a collective over comm."""
    for rank_var, size_var in LAUNCHER_LOCAL:
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    comm = MPI.COMM_WORLD if comm is None else comm
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


_selected = []


def select_gpu(comm=None):
    """Make device local_rank % device_count current for this process; returns its index.
    Every rank of comm calls it, before any device array is made (local_rank may be a
    collective over comm, on every call, so that ranks never disagree on whether it is). The
    device is chosen once per process: later calls (a job shrunk in place prepares again,
    collectives/ulfm.py; a test running train.main on several sub-communicators) keep the
    device the arrays already live on."""
    local, _ = local_rank(comm)
    if not _selected:
        count = backend.device_count()
        if count < 1:
            raise RuntimeError("--device gpu: CUDA reports no GPU on this node")
        _selected.append(local % count)
    backend.use_device(_selected[0])
    return _selected[0]
