"""No silent failure: the collective consistency check and the arrival watchdog.

A collective that ranks call differently (another op, count, dtype or root) or that one
rank never reaches does not fail: it hangs or returns garbage. Two opt-in guards turn
that into an error that names the ranks (read when a Communicator is created):

  ENGINE_COMM_DEBUG=1      before every collective all ranks exchange a signature
                           (call number, op, count, dtype, root, reduction, algorithm,
                           block counts) and every rank raises CollectiveMismatchError
                           naming the ranks that differ. A rank whose own arguments are
                           refused (a wrong out size, a read-only output ...) still takes
                           part, flagged: it raises its error, every other rank
                           CollectiveArgumentError naming it, and all stay in step.
  ENGINE_COMM_TIMEOUT=T    the same handshake, waited with a deadline of T seconds, and so
                           is every other wait of the Communicator (the steps of the
                           collectives' algorithms, point-to-point messages, non-blocking
                           handles): watchdog.py. A rank that has not arrived by then, and
                           is not itself waiting elsewhere, is named on stderr with the
                           rank that waited for it, and the job is aborted (MPI_Abort),
                           instead of hanging forever.

The handshake ("arrival") is non-blocking: each rank posts Irecv for every peer's
signature and Isend of its own to every peer on a private duplicate communicator, then
polls Testall (watchdog.wait_until under a timeout), moving in-flight collectives along.
The peers not heard from when the deadline passes are the ones the watchdog asks about.
Cost: 2(N-1) small messages per collective, only when a flag is set.
"""
import os
import time
import zlib
from collections import Counter

import numpy as np
from mpi4py import MPI

from . import ops
from .transport import ACTIVE, progress, test_all
from .watchdog import wait_until

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all", "barrier")
_TAG = 7
_FIELDS = 10  # seq, collective, count, dtype, root, reduction, algorithm, block counts, non-blocking, refused
ALGORITHMS = ("mpi", "ring", "recursive_doubling", "rabenseifner", "tree", "recursive_halving", "bruck",
              "pairwise", "dissemination")


class CollectiveMismatchError(RuntimeError):
    """Ranks called different collectives (or with a different count, dtype, root, op or algo)."""


class CollectiveArgumentError(CollectiveMismatchError):
    """Another rank refused its arguments to this collective (it raised the reason itself)."""


def counts_digest(counts):
    """A number naming a list of block counts in a signature (0: the default blocks)."""
    return 0 if counts is None else zlib.crc32(np.asarray(counts, np.int64).tobytes()) + 1


def env_flags():
    """(debug, timeout_seconds or None, trace) from the environment."""
    debug = os.environ.get("ENGINE_COMM_DEBUG", "0").strip() not in ("", "0")
    t = os.environ.get("ENGINE_COMM_TIMEOUT", "").strip()
    try:
        timeout = float(t) if t else None
    except ValueError:
        raise ValueError(f"ENGINE_COMM_TIMEOUT must be a number of seconds, got {t!r}") from None
    trace = os.environ.get("ENGINE_TRACE", "0").strip() not in ("", "0")
    return debug, (timeout if timeout and timeout > 0 else None), trace


def _describe(sig):
    seq, coll, count, dtype, root, red, algo, blocks, nonblocking, refused = (int(v) for v in sig)
    name = COLLECTIVES[coll] if 0 <= coll < len(COLLECTIVES) else f"collective#{coll}"
    if refused:
        return f"call #{seq} {name} with arguments it refused"
    args = [] if name == "barrier" else [f"count={count}", f"dtype={ops.dtype_name(dtype)}"]
    if root >= 0:
        args.append(f"root={root}")
    if red >= 0:
        args.append(f"op={ops.NAMES[red]}")
    if blocks:
        args.append(f"counts=#{blocks - 1:08x}")
    args.append(f"algo={ALGORITHMS[algo]}")
    if nonblocking:
        args.append("async_op=True")
    return f"call #{seq} {name}({', '.join(args)})"


def _ranks(rs):
    rs = sorted(rs)
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(str(r) for r in rs)


class Checker:
    """The arrival handshake of one Communicator."""

    def __init__(self, mpi_comm, label, party=None):
        """party: the Communicator's watchdog.Party under ENGINE_COMM_TIMEOUT, else None."""
        self.comm = mpi_comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.label, self.party = label, party
        world = MPI.COMM_WORLD.Get_group()
        self.world_ranks = MPI.Group.Translate_ranks(self.comm.Get_group(), list(range(self.size)), world)
        self.sigs = np.zeros((self.size, _FIELDS), np.int64)

    def _names(self, ranks):
        text = _ranks(ranks)
        if self.comm.Get_size() != MPI.COMM_WORLD.Get_size() or self.label != "world":
            text += f" (world {_ranks(self.world_ranks[r] for r in ranks)})"
        return text

    def arrive(self, seq, collective, count, dtype, root=-1, op=None, algo="mpi", blocks=0, async_op=False):
        """Exchange signatures with every rank; raise on mismatch, abort on timeout. A blocking
        and a non-blocking call do not match (as in MPI; their messages carry different tags,
        calls.Calls), so the form is in the signature too."""
        sig = self.sigs[self.rank]
        sig[:] = (seq, COLLECTIVES.index(collective), count, ops.dtype_code(dtype), root,
                  -1 if op is None else ops.NAMES.index(op.name), ALGORITHMS.index(algo), blocks,
                  1 if async_op else 0, 0)
        self._exchange(sig)
        self._compare()

    def refuse(self, seq, collective):
        """Arrive at call `seq` flagged as refusing its arguments (the caller then raises its
        error); every other rank raises CollectiveArgumentError."""
        sig = self.sigs[self.rank]
        sig[:] = (seq, COLLECTIVES.index(collective), -1, 0, -1, -1, 0, 0, 0, 1)
        self._exchange(sig)

    def agree(self, seq, collective, error):
        """A second handshake inside call `seq`, for arguments checked after its first messages
        (all_to_all's received counts): raise if any rank, this one included, refused."""
        sig = self.sigs[self.rank]
        sig[:] = (seq, COLLECTIVES.index(collective), -1, 0, -1, -1, 0, 0, 0, 1 if error else 0)
        self._exchange(sig)
        if error is not None:
            raise error
        self._compare()

    def _exchange(self, sig):
        peers = [k for k in range(self.size) if k != self.rank]
        recvs = [self.comm.Irecv([self.sigs[k], MPI.INT64_T], k, _TAG) for k in peers]
        sends = [self.comm.Isend([sig, MPI.INT64_T], k, _TAG) for k in peers]
        if self.party is None and not ACTIVE:
            MPI.Request.Waitall(recvs)
        else:
            def arrived():                      # moving in-flight collectives along meanwhile
                if test_all(recvs, self.party is not None):
                    return True
                progress(block=False)
                return False

            def missing():
                return [k for k, q in zip(peers, recvs) if q and not test_all([q], True)]
            if self.party is None:
                while not arrived():
                    time.sleep(0)
            else:
                wait_until(arrived, self.party, _describe(sig), missing)
        MPI.Request.Waitall(sends)

    def revoke(self):
        """ULFM: revoke this handshake's communicator (collectives/ulfm.py)."""
        self.comm.Revoke()

    def _compare(self):
        rows = [tuple(int(v) for v in s) for s in self.sigs]
        if all(row == rows[0] for row in rows):
            return
        refused = [k for k, row in enumerate(rows) if row[-1]]
        if refused:
            raise CollectiveArgumentError(
                f"{self._names(refused)} refused its arguments to {_describe(rows[refused[0]])} on "
                f"communicator '{self.label}' (size {self.size}); see its error. Every rank stops this call")
        groups = {}
        for k, row in enumerate(rows):
            groups.setdefault(row, []).append(k)
        counts = Counter({row: len(ks) for row, ks in groups.items()})
        majority = max(groups, key=lambda row: (counts[row], -min(groups[row])))
        parts = [f"{self._names(groups[majority])} called {_describe(majority)}"]
        parts += [f"{self._names(ks)} called {_describe(row)}" for row, ks in groups.items() if row != majority]
        raise CollectiveMismatchError(
            f"collective mismatch on communicator '{self.label}' (size {self.size}): " + "; but ".join(parts))
