"""The fast path: direct, blocking forms of the latency-optimal algorithms.

A short collective costs a few microseconds of MPI time, so every Python statement on the
way counts. For the common case (a blocking call on contiguous NumPy arrays, a
power-of-two rank count, algo="auto" having picked recursive doubling or halving, no
debug or trace flag) the Communicator hands the call to its DirectPath, which runs the
algorithm as a plain sequence of exchanges on MPI persistent requests: no generator,
handle, scratch pool or fold. Reductions take it up to MAX_BYTES (above, the general path
pipelines them in segments); an all-gather, which has nothing to pipeline, at every size.
Anything else returns None and takes the general path.

Plans. A training loop reduces the same buffers every step, so the first call on given
(input, output, op) checks everything and records a plan: the flat views, a scratch
buffer and, per step, a persistent receive and send (MPI_Recv_init, MPI_Send_init: the
message specs checked and bound once; what MPI-4's persistent collectives, MPI_Allreduce_init,
do for a whole collective), compiled into one function (Plan.run) with every name it needs
bound, so a replay is MPI_Start and MPI_Wait twice per step, the reductions and a few
hundred nanoseconds of Python. Persistent requests need a fixed tag: every blocking call's
messages carry the same one (calls.Calls), on either path. The Communicator's methods replay
the last plan of each kind themselves (a few identity checks: one call more would cost some
4% of an 8-byte all-reduce); the others are found by the identity of their arrays, which
fixes their shape, dtype and memory (the dtype is checked again on every call: it is the
one property NumPy lets change in place that changes the bytes); the algorithm is the one
auto chose for that size, the collective and op are in the key. A repeat call only checks
that the arrays are the same objects with the same dtype. A plan keeps its arrays alive;
each DirectPath keeps at most PLANS of them, dropping the oldest (its requests freed);
Communicator.revoke() and free() drop them all (plan_stats() counts what was built and what
is kept). A caller whose buffers live for one call only (tensor parallelism's activations)
passes cache=False: the plan runs once on MPI_Sendrecv and is dropped, so it pins nothing.

Placing the own block. An out-of-place all-gather must also copy its input into its own
block of the output, and the block can travel from either place:

    input first   step 1 sends the block straight from the input, then it is copied
    overlapped    step 1 is posted (Isend from the input, Irecv), the block is copied in
                  OVERLAP_CHUNK pieces with a test of the exchange after each, then waited:
                  the copy runs while the library moves the message
    copy first    the block is copied into the output, step 1 sends it from there (MPICH)

The messages are identical, so each rank may choose alone, and which is faster depends
on the machine and its state (how the MPI library moves messages between processes),
which the cost model cannot see. So below PLACE_TRIAL_BYTES the block goes input first,
and from it up a plan runs TRIALS consecutive calls overlapped and TRIALS copy first, timed,
and keeps the one with the lower median (the first call of each set, which follows the
other placement, left out): a per-rank choice by measurement. The measurements behind these
thresholds, and the command that repeats them, are in bench/collectives.py's docstring.

The plans send exactly the messages, with the same tag, that recursive_doubling.py and
rabenseifner.py send for these cases (below the segmenting threshold), so ranks on
either path interoperate. Reduction order is theirs too: the two partners of a recursive
doubling step both compute (lower rank's partial) op (higher rank's partial), so every
rank gets the same bits. Read the generator versions for the algorithms:

    step d = 1, 2, 4, ... N/2: partner = rank XOR d
    all-reduce      exchange everything, out = lower op higher
    all-gather      exchange the blocks of my group of d ranks for the partner group's
    reduce-scatter  (d = N/2 ... 1) send the half the partner keeps, reduce the half I keep

Cost: that of recursive_doubling.py and rabenseifner.py for a power of two (no fold);
plus, for a first call, building the plan.
"""
from statistics import median
from time import perf_counter

import numpy as np
from mpi4py import MPI

from . import segments
from .buffers import balanced, raw_bytes
from .ops import ACCEPTED, AVG, OPS, finish

MAX_BYTES = 1 << 20          # larger reductions take the general path (pooled, segmented)
PLACE_TRIAL_BYTES = 2 << 20  # all-gathers from this size time both placements (see above)
TRIALS = 4                   # calls timed per placement
OVERLAP_CHUNK = 4 << 20      # bytes of the own block copied between two tests of the exchange in flight
PLANS = 16
KIND = {"ar": "all_reduce", "ag": "all_gather", "rs": "reduce_scatter"}
_OP = OPS.get
_ndarray = np.ndarray


class Overlap:
    """In place of a step's reduce args: local copies (dst, src memoryviews, OVERLAP_CHUNK bytes
    each) made while that step's exchange is in flight (Isend/Irecv, tested between copies)."""
    __slots__ = ("copies",)

    def __init__(self, dst, src):
        self.copies = [(dst[i:i + OVERLAP_CHUNK], src[i:i + OVERLAP_CHUNK]) for i in range(0, len(dst), OVERLAP_CHUNK)]


class Plan:
    """steps: (peer, send bytes, recv bytes, reduce args or None) for one exchange each, or
    (None, dst bytes, src bytes, None) for a local copy; bytes are memoryviews (the cheapest
    message spec for mpi4py, and the cheapest copy)."""
    __slots__ = ("x", "out", "op", "dtype", "steps", "ufunc", "avg", "result", "final",
                 "placements", "times", "kind", "key", "reqs", "meter", "run")


def _flat(a):
    return a if a.ndim == 1 else a.reshape(-1)


def _disjoint(a, b):
    ba, bb = a.base, b.base
    return (a if ba is None else ba) is not (b if bb is None else bb) or not np.may_share_memory(a, b)


class DirectPath:
    """The fast path of one Communicator (which creates it only where it applies: a
    power-of-two size, no debug checks, no trace).

    mpi: the MPI communicator of the collectives' messages; calls: the Communicator's
    calls.Calls, whose blocking tag the plans' messages carry; choices: its algo="auto"
    choices (cost.Choices): a plan is made only where auto chose this algorithm; traffic: its
    calls.Traffic, which each kept plan counts its bytes on through a meter."""

    def __init__(self, mpi, rank, size, calls, choices, traffic=None):
        self.mpi, self.rank, self.size = mpi, rank, size
        self.calls, self.choices, self.traffic = calls, choices, traffic
        self.plans, self.last = {}, {}       # plans by arrays and op, and the last one of each kind
        self.built = 0                       # plans made so far (plan_stats)

    def clear(self):
        """Drop every plan (and so the arrays they keep alive), freeing its MPI requests."""
        for plan in self.plans.values():
            self._release(plan)
        self.plans.clear()
        self.last.clear()

    # ---- plans -----------------------------------------------------------------------------

    def _usable(self, x, out, name, nbytes, algo, limit=MAX_BYTES):
        """Whether a plan may be made: everything the general path would refuse (a read-only
        output included) goes there, to be refused before any message moves. A reduction
        (limit given) also needs a size the general path moves unsegmented (segments.py), so
        that a rank on either path sends the same messages."""
        return (type(x) is _ndarray and x.dtype in ACCEPTED and x.flags.c_contiguous and x.size
                and (limit is None or nbytes <= limit and nbytes < segments.SEGMENT_MIN)
                and self.choices.made(name, nbytes) == algo
                and (out if out is not None else x).flags.writeable
                and (out is None or (type(out) is _ndarray and out.dtype == x.dtype and out.flags.c_contiguous
                                     and _disjoint(x, out))))

    def _remember(self, key, plan, x, out, op, cache=True):
        plan.x, plan.out, plan.op, plan.dtype = x, out, op, x.dtype
        plan.kind, plan.key = KIND[key[-1]], key      # kind: what Traffic counts its messages as
        plan.reqs, plan.meter = [], None
        plan.run = self._compile(plan, persistent=cache)
        self.built += 1
        if not cache:                          # transient buffers (activations): run once, keep nothing
            return plan
        if len(self.plans) >= PLANS:           # the oldest goes
            old = self.plans.pop(next(iter(self.plans)))
            if self.last.get(old.key[-1]) is old:
                del self.last[old.key[-1]]
            self._release(old)
        self.plans[key] = self.last[key[-1]] = plan
        return plan

    def _find(self, kind, x, out, op):
        """The plan for these arrays: the last one of its kind, else by identity (None if none)."""
        plan = self.last.get(kind)
        if plan is None or plan.x is not x or plan.out is not out or plan.op is not op:
            plan = self.plans.get((id(x), id(out), op, kind))
            if plan is not None:
                self.last[kind] = plan
        if plan is not None and plan.dtype is not x.dtype:
            return None
        return plan

    def _compile(self, plan, persistent=True):
        """The plan as one function of no arguments: per step an exchange and (for reductions) a
        reduce, or a local copy; then avg's division. Every name is bound here, once.
        persistent: each exchange is a pair of MPI persistent requests, made here once and
        started every run (the recv, then the send; waited send first), which costs less per
        call than MPI_Sendrecv, and a plan of one exchange (N = 2) runs as a straight line;
        else (a plan run once) each exchange is a Sendrecv. Every message carries the blocking
        calls' tag (calls.Calls)."""
        self._release(plan)
        tag, kind, result, peers = self.calls.blocking, plan.kind, plan.result, self.size
        sent = sum(send.nbytes for peer, send, _, _ in plan.steps if peer is not None)
        traffic = self.traffic
        runs = [0]                               # runs[0] += 1 per run counts its bytes (Traffic.meter)
        if persistent and traffic is not None:
            runs = plan.meter = traffic.meter(kind, sent)
        steps = []                               # (peer, send, recv, reduce args, requests or None)
        for peer, send, recv, reduce_args in plan.steps:
            reqs = None
            if persistent and peer is not None:
                reqs = [self.mpi.Recv_init(recv, peer, tag), self.mpi.Send_init(send, peer, tag)]
                plan.reqs += reqs
            steps.append((peer, send, recv, reduce_args, reqs))
        ufunc, avg = plan.ufunc, ((OPS[AVG], plan.final) if plan.avg else None)
        first = steps[0] if steps else (None,) * 5
        exchange_first = first[0] is not None and type(first[3]) is not Overlap
        then_reduce = exchange_first and len(steps) == 1 and first[3] is not None   # all-reduce, reduce-scatter
        then_copy = exchange_first and len(steps) == 2 and steps[1][0] is None       # all-gather, input first
        if persistent and avg is None and (then_reduce or then_copy):   # N = 2: a straight line
            r, s = first[4]
            start_recv, start_send, wait_send, wait_recv = r.Start, s.Start, s.Wait, r.Wait
            if then_reduce:
                a, b, c = first[3]

                def run():
                    runs[0] += 1
                    start_recv()
                    start_send()
                    wait_send()
                    wait_recv()
                    ufunc(a, b, c)
                    return result
                return run
            _, dst, src, _, _ = steps[1]         # then the own block

            def run():
                runs[0] += 1
                start_recv()
                start_send()
                wait_send()
                wait_recv()
                dst[:] = src
                return result
            return run

        isend, irecv, sendrecv = self.mpi.Isend, self.mpi.Irecv, self.mpi.Sendrecv
        startall, testall, waitall = MPI.Prequest.Startall, MPI.Request.Testall, MPI.Request.Waitall
        steps = tuple(steps)

        def run():
            runs[0] += 1
            for peer, send, recv, reduce_args, reqs in steps:
                if peer is None:
                    send[:] = recv
                elif type(reduce_args) is Overlap:       # the exchange in flight while the copies run
                    if reqs is None:
                        reqs = [irecv(recv, peer, tag), isend(send, peer, tag)]
                    else:
                        startall(reqs)
                    for dst, src in reduce_args.copies:
                        dst[:] = src
                        testall(reqs)                    # moves the message on between copies
                    waitall(reqs)
                else:
                    if reqs is None:
                        sendrecv(send, peer, tag, recv, peer, tag)
                    else:
                        r, s = reqs
                        r.Start()
                        s.Start()
                        s.Wait()
                        r.Wait()
                    if reduce_args is not None:
                        ufunc(*reduce_args)
            if avg is not None:
                finish(avg[0], avg[1], peers)
            return result
        if not persistent and traffic is not None:    # a plan run once counts its bytes as it runs
            loop = run

            def run():
                traffic.add(kind, sent)
                return loop()
        return run

    def _release(self, plan):
        """Free the plan's persistent requests and close its meter (it runs no more, or is
        compiled anew)."""
        for req in plan.reqs:
            req.Free()
        plan.reqs = []
        if plan.meter is not None:
            self.traffic.close(plan.meter)
            plan.meter = None

    # ---- the collectives -------------------------------------------------------------------

    def all_reduce(self, x, op, out, cache=True):
        """Communicator.all_reduce's fast path; None when it does not apply. (The Communicator
        replays the last plan of each kind itself, before it calls here.)"""
        plan = self._find("ar", x, out, op)
        if plan is None:
            rop = _OP(op)
            if rop is None or type(x) is not _ndarray or (out is not None and out is not x and out.size != x.size) \
                    or not self._usable(x, out, "all_reduce", x.nbytes, "recursive_doubling"):
                return None
            src = _flat(x)
            buf = src if out is None or out is x else _flat(out)
            tmp = np.empty_like(buf)
            plan, steps, cur, d = Plan(), [], src, 1
            while d < self.size:       # d = 1, 2, 4, ...: exchange with rank XOR d, buf = lower op higher
                peer = self.rank ^ d
                args = (tmp, cur, buf) if peer < self.rank else (cur, tmp, buf)
                steps.append((peer, raw_bytes(cur), raw_bytes(tmp), args))
                cur, d = buf, d * 2
            if self.size == 1 and buf is not src:
                steps.append((None, raw_bytes(buf), raw_bytes(src), None))
            plan.steps, plan.ufunc, plan.avg, plan.final = steps, rop.ufunc, rop.name == AVG, buf
            plan.result = x if out is None else out
            plan = self._remember((id(x), id(out), op, "ar"), plan, x, out, op, cache)
        return plan.run()

    def all_gather(self, x, out, cache=True):
        """Communicator.all_gather's fast path (even blocks, out given); None when it does not apply."""
        plan = self._find("ag", x, out, None)
        if plan is None:
            if type(out) is not _ndarray or \
                    not self._usable(x, out, "all_gather", out.nbytes, "recursive_doubling", limit=None) \
                    or out.size != x.size * self.size:
                return None
            rank, k, buf = self.rank, x.size, _flat(out)
            plan, exchanges, d = Plan(), [], 1
            while d < self.size:       # exchange my group's d blocks for the partner group's
                mine, theirs = (rank & ~(d - 1)) * k, ((rank ^ d) & ~(d - 1)) * k
                exchanges.append((rank ^ d, raw_bytes(buf[mine:mine + d * k]), raw_bytes(buf[theirs:theirs + d * k]),
                                  None))
                d *= 2
            place = (None, raw_bytes(buf[rank * k:(rank + 1) * k]), raw_bytes(_flat(x)), None)
            copy_first = [place] + exchanges            # place, then step 1 sends from the output
            input_first = copy_first                    # (N = 1: the copy is all there is)
            if exchanges:                               # step 1 sends from the input, then place
                peer, _, recv, _ = exchanges[0]
                input_first = [(peer, raw_bytes(_flat(x)), recv, None), place] + exchanges[1:]
            plan.steps, plan.ufunc, plan.avg, plan.final = input_first, None, False, None
            plan.result = out
            plan.placements = None
            if exchanges and out.nbytes >= PLACE_TRIAL_BYTES:    # overlapped: step 1 in flight while placing
                peer, send, recv, _ = input_first[0]
                overlapped = [(peer, send, recv, Overlap(place[1], place[2]))] + exchanges[1:]
                plan.steps = overlapped
                if cache:                               # (a plan run once has nothing to choose)
                    plan.placements, plan.times = (overlapped, copy_first), ([], [])
            plan = self._remember((id(x), id(out), None, "ag"), plan, x, out, None, cache)
        if plan.placements is not None:
            return self._run_trial(plan)
        return plan.run()

    def _run_trial(self, plan):
        """Run an all-gather plan TRIALS times input first, then TRIALS times copy first, timed;
        then keep the faster (by median, each set's first call left out) for every later call."""
        times = plan.times
        which = len(times[0]) == TRIALS
        plan.steps = plan.placements[which]
        plan.run = self._compile(plan)
        t0 = perf_counter()
        result = plan.run()
        times[which].append(perf_counter() - t0)
        if len(times[1]) == TRIALS:
            plan.steps = plan.placements[median(times[1][1:]) < median(times[0][1:])]
            plan.placements, plan.run = None, self._compile(plan)
        return result

    def reduce_scatter(self, x, op, out, cache=True):
        """Communicator.reduce_scatter's fast path (balanced blocks); None when it does not apply."""
        plan = self._find("rs", x, out, op)
        if plan is None:
            rop = _OP(op)
            if rop is None or type(x) is not _ndarray or \
                    not self._usable(x, out, "reduce_scatter", x.nbytes, "recursive_halving"):
                return None
            size, rank = self.size, self.rank
            counts, offs = balanced(x.size, size)
            src = _flat(x)
            if out is None:
                work, dst = src, src[offs[rank]:offs[rank + 1]]
            elif out.size == counts[rank]:
                work, dst = (np.empty_like(src) if size > 2 else None), _flat(out)
            else:
                return None
            plan, steps, cur, lo, hi, d = Plan(), [], src, 0, size, size // 2
            while d:                   # keep the half my partner gives away, reduce it
                mid = lo + d
                keep, give = ((lo, mid), (mid, hi)) if rank < mid else ((mid, hi), (lo, mid))
                ka, kb, ga, gb = offs[keep[0]], offs[keep[1]], offs[give[0]], offs[give[1]]
                tmp = np.empty(kb - ka, src.dtype)
                target = dst if d == 1 else work[ka:kb]
                steps.append((rank ^ d, raw_bytes(cur[ga:gb]), raw_bytes(tmp), (tmp, cur[ka:kb], target)))
                cur, (lo, hi), d = work, keep, d // 2
            if size == 1 and out is not None:
                steps.append((None, raw_bytes(dst), raw_bytes(src), None))
            plan.steps, plan.ufunc, plan.avg, plan.final = steps, rop.ufunc, rop.name == AVG, dst
            plan.result = dst if out is None else out
            plan = self._remember((id(x), id(out), op, "rs"), plan, x, out, op, cache)
        return plan.run()
