"""What an algorithm sees of a communicator, and how its steps are progressed.

Every hand-written collective is a *generator of steps*: it posts non-blocking sends and
receives and yields the list of requests it must see complete before its next step:

    def all_gather(t, ...):              # t: Transport for this one call
        ...
        yield t.sendrecv(block, right, into, left)   # () when already done (blocking mode)
        reduce(tmp, own, out)                        # runs once the step completed

One algorithm text serves both forms of a collective:
- blocking: `run(gen)` waits on each yielded list in turn (and `t.sendrecv` is a plain
  MPI_Sendrecv, cheaper than Irecv + Isend + Waitall for the short messages where latency
  counts);
- non-blocking: `Handle(gen)` advances the generator from `test()` and `wait()`. No helper
  thread: progress happens when the caller polls, like MPICH's own non-blocking collectives
  without an async progress thread, and nothing is shared between threads. (MPICH grants
  MPI_THREAD_MULTIPLE, but a progress thread would fight the training loop for the GIL and
  a core, and would make every scratch buffer and reduction a cross-thread hand-off.)

The progress engine. Ranks may complete their handles in different orders, and a rank
blocked on one collective must still move the others forward, or two ranks can each wait
for a step the other never posts. So every handle in flight is registered in ACTIVE, and
waiting (Handle.wait, and a blocking collective started while handles are in flight) runs
`progress`: advance every active handle, then MPI_Waitsome on all their pending requests.

Tags. A non-blocking call's messages carry a tag of its own, every blocking call's one tag
(calls.py says why both are safe); within a call, messages between a pair of ranks match
in posting order (MPI's non-overtaking rule), which every algorithm respects.

Deadlines (ENGINE_COMM_TIMEOUT, watchdog.py). A Handle made with a watchdog.Party waits
by polling against that deadline (Handle.wait), never in a blocking MPI call; a Transport
that is not blocking remembers the peer of each request it posts (`posted`), so a wait
that times out knows which ranks it is still waiting for. The Communicator then runs its
blocking collectives as such Handles too.

ENGINE_TRACE=1 prints one line per message: rank, peer, operation, bytes.

The hand-off to MPI. Every payload buffer reaches the library through `to_mpi` (the
Transport's moves here, library.py's message specs, p2p.py's sends and receives): a device
array there while the MPI is not CUDA-aware (devices.py) is a path that forgot to stage
(buffers.py), and raises DeviceBufferError instead of handing MPI a pointer it cannot read.
"""
import sys

import numpy as np
from mpi4py import MPI

from .calls import Traffic
from .devices import cuda_aware
from .watchdog import wait_until

BYTE = MPI.BYTE
_ndarray = np.ndarray


class DeviceBufferError(TypeError):
    """A device array reached MPI, which is not CUDA-aware."""


def to_mpi(buf):
    """buf, checked at the hand-off to MPI (see the module docstring)."""
    if type(buf) is not _ndarray and hasattr(buf, "__cuda_array_interface__") and not cuda_aware():
        raise DeviceBufferError(
            f"a device array ({buf.dtype}, {buf.size} elements) was handed to MPI, which is not CUDA-aware "
            "(collectives/devices.py; ENGINE_CUDA_AWARE_MPI=1 overrides): device buffers must be staged "
            "through host memory first (collectives/buffers.py flat_in / flat_out)")
    return buf


_SMALL_SCRATCH = 1 << 16          # below this many bytes a fresh np.empty is cheaper than the pool


class Pool:
    """Reusable scratch buffers (raw bytes) per array module, so large collectives neither
    allocate nor page-fault on every call. Buffers are checked out per call and returned."""

    def __init__(self):
        self.free = {}             # module name -> list of 1-D uint8 arrays

    def take(self, xp, nbytes):
        free = self.free.setdefault(xp.__name__, [])
        best = None
        for i, b in enumerate(free):
            if b.nbytes >= nbytes and (best is None or b.nbytes < free[best].nbytes):
                best = i
        if best is not None:
            return free.pop(best)
        return xp.empty(nbytes, dtype=xp.uint8)

    def give(self, xp, buf, keep=8):
        free = self.free.setdefault(xp.__name__, [])
        free.append(buf)
        if len(free) > keep:                     # forget the smallest beyond `keep` buffers
            del free[min(range(len(free)), key=lambda i: free[i].nbytes)]


class Transport:
    """One collective call's view: rank, size, tagged byte moves, scratch buffers."""
    __slots__ = ("comm", "rank", "size", "tag", "blocking", "label", "xp", "pool", "_held", "posted", "traffic",
                 "kind")

    def __init__(self, comm, rank, size, tag, blocking, label, xp, pool, traffic=None, kind="p2p"):
        self.comm, self.rank, self.size, self.tag, self.kind = comm, rank, size, tag, kind
        self.blocking, self.label, self.xp, self.pool = blocking, label, xp, pool
        self.traffic = Traffic() if traffic is None else traffic
        self._held = None
        self.posted = None if blocking else []        # (request, peer) of each request posted

    def isend(self, buf, dest):
        self.traffic.add(self.kind, buf.nbytes)
        if type(buf) is not _ndarray:
            to_mpi(buf)
        req = self.comm.Isend([buf, BYTE], dest, self.tag)
        if self.posted is not None:
            self.posted.append((req, dest))
        return req

    def irecv(self, buf, source):
        if type(buf) is not _ndarray:
            to_mpi(buf)
        req = self.comm.Irecv([buf, BYTE], source, self.tag)
        if self.posted is not None:
            self.posted.append((req, source))
        return req

    def sendrecv(self, sbuf, dest, rbuf, source):
        """Send sbuf to dest while receiving rbuf from source; returns the requests to wait on
        (none in blocking mode, where it is one MPI_Sendrecv)."""
        self.traffic.add(self.kind, sbuf.nbytes)
        if type(sbuf) is not _ndarray or type(rbuf) is not _ndarray:
            to_mpi(sbuf), to_mpi(rbuf)
        if self.blocking:
            self.comm.Sendrecv([sbuf, BYTE], dest, self.tag, [rbuf, BYTE], source, self.tag)
            return ()
        reqs = (self.comm.Irecv([rbuf, BYTE], source, self.tag), self.comm.Isend([sbuf, BYTE], dest, self.tag))
        self.posted.append((reqs[0], source))
        self.posted.append((reqs[1], dest))
        return reqs

    def scratch(self, n, dtype):
        """A 1-D scratch array of n elements, valid until the call completes."""
        nbytes = n * dtype.itemsize
        if nbytes < _SMALL_SCRATCH:
            return self.xp.empty(n, dtype=dtype)
        raw = self.pool.take(self.xp, nbytes)
        if self._held is None:
            self._held = []
        self._held.append(raw)
        return raw[:nbytes].view(dtype)

    def release(self):
        if self._held:
            for raw in self._held:
                self.pool.give(self.xp, raw)
            self._held = None


class TracingTransport(Transport):
    """Transport that prints `[trace] rank R -> P op label bytes` for every message."""
    __slots__ = ()

    def _log(self, arrow, peer, what, nbytes):
        print(f"[trace] rank {self.rank} {arrow} {peer} {what} {self.label} tag={self.tag} {nbytes} B",
              file=sys.stderr, flush=True)

    def isend(self, buf, dest):
        self._log("->", dest, "isend", buf.nbytes)
        return Transport.isend(self, buf, dest)

    def irecv(self, buf, source):
        self._log("<-", source, "irecv", buf.nbytes)
        return Transport.irecv(self, buf, source)

    def sendrecv(self, sbuf, dest, rbuf, source):
        self._log("->", dest, "send", sbuf.nbytes)
        self._log("<-", source, "recv", rbuf.nbytes)
        return Transport.sendrecv(self, sbuf, dest, rbuf, source)


ACTIVE = []          # handles in flight in this process, oldest first
ON_FAILURE = ["wait"]   # what a watched wait does when a request fails (a peer died): see test_all


def abandon_all():
    """Forget every handle in flight (collectives/ulfm.py, after revoking their communicators:
    they can never complete, and progress() must not trip over them again)."""
    ACTIVE.clear()


class PeerFailed(RuntimeError):
    """A peer of a request failed (MPI reported ERR_PROC_FAILED or ERR_REVOKED) while failures
    raise (collectives/ulfm.py): the job can shrink and go on."""


def test_all(reqs, watched):
    """MPI_Testall(reqs). When a request fails because its peer died, a watched wait (one with
    the watchdog's deadline) either keeps the request pending -- ON_FAILURE "wait", the default:
    the watchdog, not an exception on the first survivor to notice, names the dead rank when the
    deadline passes -- or raises PeerFailed -- "raise", set by collectives/ulfm.py where the MPI
    can shrink the job. An unwatched wait raises MPI's own exception."""
    try:
        if ON_FAILURE[0] != "raise":
            return MPI.Request.Testall(reqs)
        statuses = [MPI.Status() for _ in reqs]       # ULFM may complete a request in error
        done = MPI.Request.Testall(reqs, statuses)
        bad = next((st.Get_error() for st in statuses if st.Get_error() != MPI.SUCCESS), None) if done else None
        if bad is not None:
            raise MPI.Exception(bad)
        return done
    except MPI.Exception as e:
        if not watched:
            raise
        if ON_FAILURE[0] == "raise":
            raise PeerFailed(f"a peer failed: {e.Get_error_string()}") from None
        return False


def run(gen):
    """Drive a step generator to completion, blocking on each step's requests (only when no
    handle is in flight: otherwise wrap it in a Handle and wait, see the docstring)."""
    waitall = MPI.Request.Waitall
    for reqs in gen:
        if reqs:
            waitall(reqs)


def progress(block=False):
    """Advance every handle in flight; with block=True first wait until a request completes."""
    if block:
        pending = [q for h in ACTIVE for q in h._reqs if q]
        if pending:
            MPI.Request.Waitsome(pending)
    for h in list(ACTIVE):
        h._advance(block=False)


class Handle:
    """A collective in flight. `test()` advances it without blocking and says whether it is
    done; `wait()` finishes it and returns its result (the output array, or None).
    watch: the communicator's watchdog.Party (None: no deadline); what: the wait's name in a
    timeout report; peers: the ranks it waits for (default: the transport's posted requests
    still pending, else every other rank of the communicator)."""

    def __init__(self, gen, finish=None, transport=None, watch=None, what=None, peers=None):
        self._gen, self._finish, self._t = gen, finish, transport
        self._watch, self._what, self._peers = watch, what, peers
        self._reqs = ()
        self._result = None
        self._then = []
        self.done = False
        ACTIVE.append(self)
        self._advance(block=False)

    def _complete(self):
        self.done = True
        self._gen = None
        ACTIVE.remove(self)
        finish, t, self._finish, self._t = self._finish, self._t, None, None   # a kept handle pins no buffer
        try:
            if finish is not None:
                self._result = finish()
        finally:
            if t is not None:
                t.release()
        for fn in self._then:
            fn()

    def _advance(self, block):
        while not self.done:
            if self._reqs:
                if block and len(ACTIVE) == 1:
                    MPI.Request.Waitall(self._reqs)
                elif not test_all(self._reqs, self._watch is not None):
                    if not block:
                        return False
                    progress(block=True)
                    continue
            try:
                self._reqs = next(self._gen)
            except StopIteration:
                self._reqs = ()
                self._complete()
        return True

    def then(self, fn):
        """Call fn() once this handle completes, from whichever wait or test completes it (at
        once if it is done already)."""
        if self.done:
            fn()
        else:
            self._then.append(fn)
        return self

    def test(self):
        """Advance every handle in flight without blocking; whether this one is done."""
        progress(block=False)
        return self.done

    def wait(self):
        if self._watch is None:
            self._advance(block=True)
        elif not self.done:
            wait_until(self._progressed, self._watch, self._what or "a non-blocking call", self._pending)
        return self._result

    def _progressed(self):
        progress(block=False)
        return self.done

    def _pending(self):
        """The ranks this handle still waits for (asked only when its deadline passed)."""
        if self.done:
            return []
        if self._peers is not None:
            return list(self._peers)
        if self._t is not None and self._t.posted:
            peers = sorted({peer for q, peer in self._t.posted if q and not q.Test()})
            if peers:
                return peers
        return [r for r in range(self._watch.size) if r != self._watch.rank]

    is_completed = test   # torch.distributed.Work name


class Completed(Handle):
    """The handle of work that finished at once (e.g. a collective over zero elements)."""

    def __init__(self, result=None):
        self._gen = self._finish = self._t = self._watch = None
        self._reqs, self._result, self.done = (), result, True


def wait_all(handles):
    """Wait for every handle; returns their results in order."""
    return [h.wait() for h in handles]
