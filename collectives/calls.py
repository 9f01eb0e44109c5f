"""A communicator's call bookkeeping: the numbers and tags of its calls (Calls) and the bytes
they send (Traffic).

Tags. A non-blocking call's messages carry the call's own tag (its number among the
communicator's non-blocking calls), so two collectives in flight at once, progressed in any
order, never match each other's messages. Every blocking call's messages carry one tag,
Calls.blocking: a rank is in one blocking call at a time and every rank makes them in the
same order, so between two ranks they match in the order both posted them, call after call,
whichever path (direct.py's or the general one) each rank runs a call on. Within a call,
too, messages between a pair of ranks match in posting order (MPI's non-overtaking rule),
which every algorithm respects. One fixed tag is what lets the fast path make its requests
once, persistent, and start them every call. So, as in MPI, a blocking call does not match
a non-blocking one (ENGINE_COMM_DEBUG names that mismatch, debug.py). A rank that left a
blocking call half done would leave messages the next one matches; it leaves only by
raising, and an uncaught exception aborts the job (watchdog.py).
"""


class Calls:
    """Numbers the collective calls of one communicator and gives their messages' tags (see
    the module docstring). All ranks make the same calls in the same order, so call number k
    is the same call everywhere. `seq` numbers the calls of the general path (what the debug
    checks and deadline messages name); tag(False) is `blocking`, one tag for every blocking
    call; tag(True) numbers the non-blocking calls, modulo `bound`, below `blocking`.
    bound: the MPI library's largest tag, at most 2^20."""
    __slots__ = ("seq", "spawned", "bound", "blocking")

    def __init__(self, bound):
        self.seq, self.spawned, self.bound, self.blocking = 0, 0, bound, bound

    def next(self):
        """The number of a new call."""
        seq = self.seq
        self.seq = seq + 1
        return seq

    def tag(self, async_op):
        """A new call's tag: `blocking`, or the next non-blocking call's."""
        if not async_op:
            return self.blocking
        n = self.spawned
        self.spawned = n + 1
        return n % self.bound


KINDS = ("all_reduce", "reduce_scatter", "all_gather", "all_to_all", "broadcast", "reduce", "barrier", "p2p")


class Traffic:
    """Payload bytes a communicator has sent (its algorithms' messages and its point-to-point
    sends; not the debug handshake's metadata, nor what algo="mpi" hands the library), in
    total and per kind of call (KINDS: the collective's name, or "p2p").

    A message pattern repeated call after call (a fast-path plan, direct.py) counts through a
    meter instead of add: a one-element list whose owner adds 1 per run (a third of add's
    cost, where a call costs a couple of microseconds); its runs turn into bytes when the
    totals are read, and when the owner closes it."""
    __slots__ = ("_sent", "_by_kind", "_meters")

    def __init__(self):
        self._sent = 0
        self._by_kind = dict.fromkeys(KINDS, 0)
        self._meters = {}                       # id(meter): (kind, bytes per run, meter)

    def add(self, kind, nbytes):
        self._sent += nbytes
        self._by_kind[kind] += nbytes

    def meter(self, kind, nbytes):
        """A run counter for a pattern of `nbytes` sent per run, counted as `kind`."""
        runs = [0]
        self._meters[id(runs)] = (kind, nbytes, runs)
        return runs

    def close(self, runs):
        """Count a meter's runs and forget it."""
        kind, nbytes, _ = self._meters.pop(id(runs))
        self.add(kind, runs[0] * nbytes)

    def _settle(self):
        for kind, nbytes, runs in self._meters.values():
            n, runs[0] = runs[0], 0
            self.add(kind, n * nbytes)

    @property
    def sent(self):
        self._settle()
        return self._sent

    @property
    def by_kind(self):
        """Bytes per kind (a copy)."""
        self._settle()
        return dict(self._by_kind)
