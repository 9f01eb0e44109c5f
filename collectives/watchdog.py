"""The deadline on every blocking wait, and who is to blame when it passes.

ENGINE_COMM_TIMEOUT=T (read when a Communicator is made, debug.env_flags; train.py
--comm-timeout sets it) arms it on that Communicator: every wait that does not finish at
once -- the collectives' arrival handshake (debug.py), each step of a collective's
algorithm, a point-to-point send or receive, a non-blocking handle's wait() (the pipeline
executor's and ring attention's waits are these) -- polls its requests (MPI_Test and a
clock, yielding the core between polls) until they complete or T seconds pass. Unarmed,
waits are MPI's own blocking calls, as before.

Who did not arrive. A rank can wait for a healthy peer that is itself waiting for the
stopped one (dp x pp: a dp all-reduce waits for a stage blocked in a pipeline receive from
the stopped stage); naming that peer would be false. So a rank, while it polls, also answers
one question, asked on MPI_COMM_WORLD under a reserved tag: what are you waiting for (its
call, the world ranks it still waits for, how long it has waited, how long until its own
deadline)? When its deadline passes, a rank asks the ranks it waits for, and theirs in turn;
a waiting rank answers within milliseconds, and one silent for ANSWER_GRACE seconds is not
waiting anywhere: stopped, dead, or busy outside any wait. Then:

  - a rank it waits for itself is silent: that rank did not arrive, and this one waited for
    it directly; it reports (one line naming the missing rank and the waiting one, each by
    its rank on the communicator's label and by world rank), sleeps ABORT_GRACE so the
    launcher forwards the line, and calls MPI_Abort;
  - no silent rank is reachable and it is on a cycle of waits: a deadlock; it reports the cycle;
  - otherwise it is not the one to report: it keeps waiting, its deadline moved past those
    of the ranks it reached (one of them waits directly for the missing rank, and reports).

So a rank that is waiting is never named as missing. A reporter first sends every rank a
notice and listens NOTICE_GRACE seconds: of two reporters only the lower world rank prints,
and a rank that has seen a notice stays silent until the abort. Cost: nothing while waits
finish at once; a wait that polls makes one MPI_Iprobe every SERVE_EVERY seconds.
"""
import sys
import time

from mpi4py import MPI

ABORT_GRACE = 1.0      # seconds between the report and MPI_Abort (MPICH may drop unforwarded output)
ANSWER_GRACE = 1.0     # seconds a rank has to answer before it counts as not waiting anywhere
NOTICE_GRACE = 0.2     # seconds a reporter listens for a lower rank's notice before it prints
SERVE_EVERY = 0.005    # seconds between looks for questions while a wait polls
TAG = 32_001           # reserved for the watchdog's messages on MPI_COMM_WORLD (MPI guarantees tags < 32768)

_WORLD = MPI.COMM_WORLD
_ME = _WORLD.Get_rank()
_sent = []             # requests of the watchdog's own messages in flight
_state = {"qid": 0, "notice": None, "inquiry": None}


def _abort_on_uncaught(kind, value, tb):
    """sys.excepthook of a multi-rank job: an exception no one caught ends the whole job now,
    with a line naming the rank. Without it the rank exits into MPI_Finalize, which waits for
    peers that wait (up to their deadline, or forever unarmed) for it."""
    _previous_hook(kind, value, tb)
    if not issubclass(kind, (KeyboardInterrupt, SystemExit)):
        print(f"rank {_ME} (of {_WORLD.Get_size()}): uncaught {kind.__name__}; aborting the job",
              file=sys.stderr, flush=True)
        time.sleep(ABORT_GRACE)
        _WORLD.Abort(1)


_previous_hook = sys.excepthook
if _WORLD.Get_size() > 1:
    sys.excepthook = _abort_on_uncaught


def set_world(mpi_comm):
    """Ask and answer on ``mpi_comm`` from now on (collectives/ulfm.py: the shrunk world)."""
    global _WORLD, _ME
    _WORLD, _ME = mpi_comm, mpi_comm.Get_rank()
    _sent.clear()


def _ranks(rs):
    rs = sorted(rs)
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(str(r) for r in rs)


class Party:
    """What the watchdog knows of one communicator: its label, size, this rank, the world
    rank of each of its ranks, and the timeout (seconds) of its waits."""

    def __init__(self, mpi_comm, label, timeout):
        self.label, self.timeout = label, timeout
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.world_ranks = MPI.Group.Translate_ranks(mpi_comm.Get_group(), list(range(self.size)),
                                                     _WORLD.Get_group())
        self.is_world = self.size == _WORLD.Get_size() and label == "world"

    def names(self, ranks):
        """'rank 2', or 'ranks 0,1 (world ranks 4,5)' off the world communicator."""
        text = _ranks(ranks)
        if not self.is_world:
            text += f" (world {_ranks(self.world_ranks[r] for r in ranks)})"
        return text


class Wait:
    """One wait in progress: its communicator, what it is (e.g. 'call #3 all_reduce(...)'),
    and a function giving the ranks of that communicator it still waits for."""
    __slots__ = ("party", "what", "pending", "since", "deadline")

    def __init__(self, party, what, pending):
        self.party, self.what, self.pending = party, what, pending
        self.since = time.monotonic()
        self.deadline = self.since + party.timeout

    def answer(self, now):
        p = self.party
        return (p.label, p.size, p.rank, self.what, [(r, p.world_ranks[r]) for r in self.pending()],
                now - self.since, self.deadline - now)


def _post(msg, dest):
    """Send a watchdog message; to a dead rank it may fail (MPICH), which is an answer too:
    that rank stays silent."""
    try:
        _sent[:] = [q for q in _sent if not q.Test()]
    except MPI.Exception:
        _sent.clear()
    try:
        _sent.append(_WORLD.isend(msg, dest, TAG))
    except MPI.Exception:
        pass


def _probe(status):
    try:
        return _WORLD.Iprobe(MPI.ANY_SOURCE, TAG, status)
    except MPI.Exception:                        # a dead rank (ULFM): nothing to answer
        return False


def _serve(wait, now):
    """Answer questions, file answers and notices that arrived (one Iprobe when none did)."""
    status = MPI.Status()
    while _probe(status):
        src = status.Get_source()
        msg = _WORLD.recv(source=src, tag=TAG)
        if msg[0] == "q":
            _post(("a", msg[1], wait.answer(now)), src)
        elif msg[0] == "a":
            inquiry = _state["inquiry"]
            if inquiry is not None and inquiry.qid == msg[1]:
                inquiry.answered(src, msg[2])
        elif msg[0] == "n" and (_state["notice"] is None or src < _state["notice"][0]):
            _state["notice"] = (src, now)


class Inquiry:
    """The questions one rank asks when its deadline passes, and what it decides."""

    def __init__(self, wait, now):
        _state["qid"] += 1
        self.qid, self.wait = _state["qid"], wait
        self.mine = [(r, wait.party.world_ranks[r]) for r in wait.pending()]     # (rank, world rank)
        self.asked, self.answers = {}, {}
        for _, wr in self.mine:
            self._ask(wr, now)
        _state["inquiry"] = self

    def _ask(self, wr, now):
        if wr != _ME and wr not in self.asked:
            self.asked[wr] = now
            _post(("q", self.qid), wr)

    def answered(self, src, answer):
        now = time.monotonic()
        self.answers[src] = answer
        for _, wr in answer[4]:
            self._ask(wr, now)

    def decide(self, now):
        """None while answers may still come; else ('report', line) or ('defer', seconds)."""
        silent = [wr for wr, t in self.asked.items() if wr not in self.answers]
        if any(now - self.asked[wr] < ANSWER_GRACE for wr in silent):
            return None
        _state["inquiry"] = None
        w, p = self.wait, self.wait.party
        waited = round(now - w.since, 1)
        me = p.names([p.rank])
        missing = [r for r, wr in self.mine if wr in silent]
        if missing:
            return "report", (f"ENGINE_COMM_TIMEOUT: {p.names(missing)} never arrived at {w.what} on communicator "
                              f"'{p.label}' (size {p.size}): {me} waited {waited:g} s; aborting the job")
        cycle = self._cycle()
        if cycle and not silent:
            links = "; ".join(f"world rank {wr} waits at {a[3]} on '{a[0]}' for world {_ranks(x for _, x in a[4])}"
                              for wr, a in ((wr, self.answers[wr]) for wr in cycle))
            return "report", (f"ENGINE_COMM_TIMEOUT: deadlock: {me} waited {waited:g} s at {w.what} on communicator "
                              f"'{p.label}' for world rank {cycle[0]}; {links}; aborting the job")
        later = max([a[6] for a in self.answers.values()] + [0.0])
        return "defer", later + ANSWER_GRACE + NOTICE_GRACE + ABORT_GRACE + 1.0

    def _cycle(self):
        """World ranks on a path of answered waits from a rank this one waits for back to this
        one, or None."""
        parent, todo = {}, []
        for _, wr in self.mine:
            if wr in self.answers and wr not in parent:
                parent[wr] = None
                todo.append(wr)
        while todo:
            wr = todo.pop()
            for _, nxt in self.answers[wr][4]:
                if nxt == _ME:
                    path = [wr]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if nxt in self.answers and nxt not in parent:
                    parent[nxt] = wr
                    todo.append(nxt)
        return None


def _report(wait, line):
    """Tell every rank, let a lower reporter win, print the line, abort the job."""
    for r in range(_WORLD.Get_size()):
        if r != _ME:
            _post(("n",), r)
    end = time.monotonic() + NOTICE_GRACE
    while time.monotonic() < end:
        _serve(wait, time.monotonic())
        time.sleep(0.002)
    notice = _state["notice"]
    if notice is not None and notice[0] < _ME:
        return                                   # a lower rank reports; wait on, silent
    print(line, file=sys.stderr, flush=True)
    time.sleep(ABORT_GRACE)                      # let the launcher forward the line before the teardown
    _WORLD.Abort(1)


def wait_until(test, party, what, pending):
    """Poll test() (True once the wait is over; it may advance other work) until it says so.
    party: the communicator's Party (its timeout is the deadline); what: the wait's name in a
    report; pending(): the ranks of that communicator still waited for. Aborts the job as the
    module docstring says when the deadline passes; returns normally otherwise."""
    if test():
        return
    wait = Wait(party, what, pending)
    inquiry, polls, next_serve = None, 0, 0.0
    sleep, monotonic = time.sleep, time.monotonic
    while not test():
        now = monotonic()
        if now >= next_serve:
            _serve(wait, now)
            next_serve = now + SERVE_EVERY
        if inquiry is not None:
            decision = inquiry.decide(now)
            if decision is not None:
                inquiry = None
                if decision[0] == "report":
                    _report(wait, decision[1])
                    wait.deadline = now + 10.0 + ABORT_GRACE     # silent: the lower reporter aborts the job
                else:
                    wait.deadline = now + decision[1]
        elif now > wait.deadline:
            if _state["notice"] is not None:                   # another rank reported; it was not aborted?
                if now - _state["notice"][1] > 10.0:
                    _WORLD.Abort(1)
            else:
                inquiry = Inquiry(wait, now)
        polls += 1
        sleep(0 if polls < 100 else 0.0002 if polls < 1000 else 0.001)
    if inquiry is not None and _state["inquiry"] is inquiry:
        _state["inquiry"] = None
