"""Point-to-point messages of a Communicator: send, recv, sendrecv, isend, irecv.

Arrays travel as raw bytes (MPI.BYTE) through mpi4py's buffer methods, so every dtype
(bfloat16 included) moves without pickling; the receiver provides an array of the right
shape and dtype, as with torch.distributed.recv. User messages use their own duplicate of
the MPI communicator, so they can never match a collective's internal messages.
Device arrays are staged through pinned host buffers unless the MPI is CUDA-aware
(buffers.py, devices.py); every buffer passes transport.to_mpi's check on its way to MPI.
Under ENGINE_COMM_TIMEOUT every blocking form waits by polling against the deadline and a
handle's wait() does too (watchdog.py), naming the peer that never came.
"""
import sys

from mpi4py import MPI

from engine import backend

from .buffers import as_array, flat_in, flat_out, staging
from .transport import ACTIVE, Completed, Handle, to_mpi

BYTE = MPI.BYTE


def _finish_writebacks(wbs, result):
    for w in wbs:
        w()
    return result


class PointToPoint:
    """Mixin for Communicator: needs self._p2p (an MPI communicator), self.rank, self._trace,
    self._watch (the watchdog.Party under ENGINE_COMM_TIMEOUT: every wait has its deadline)."""

    def _log(self, arrow, peer, what, nbytes, tag):
        if self._trace:
            print(f"[trace] rank {self.rank} {arrow} {peer} {what} p2p tag={tag} {nbytes} B",
                  file=sys.stderr, flush=True)

    def send(self, x, dst, tag=0):
        """Blocking send of array x to rank dst."""
        x = as_array(x, "send buffer")
        _, stage = staging(x)
        buf = to_mpi(flat_in(x, stage))
        if ACTIVE or self._watch is not None:   # handles in flight, or a deadline: wait by polling
            self.isend(x, dst, tag).wait()
            return
        self._log("->", dst, "send", buf.nbytes, tag)
        self._traffic.add("p2p", buf.nbytes)
        self._p2p.Send([buf, BYTE], dst, tag)

    def recv(self, x, src=None, tag=0):
        """Blocking receive into array x (shape and dtype as sent) from rank src (None: any
        rank). Returns x."""
        return self.irecv(x, src, tag).wait()

    def isend(self, x, dst, tag=0):
        """Non-blocking send; x must not be modified until handle.wait()."""
        x = as_array(x, "send buffer")
        _, stage = staging(x)
        buf = to_mpi(flat_in(x, stage))
        self._log("->", dst, "isend", buf.nbytes, tag)
        self._traffic.add("p2p", buf.nbytes)
        req = self._p2p.Isend([buf, BYTE], dst, tag)

        def steps(keep=buf):                  # a staged host copy must outlive the request
            yield (req,)
        return Handle(steps(), watch=self._watch, what=f"send(tag={tag}) to rank {dst}", peers=(dst,))

    def irecv(self, x, src=None, tag=0):
        """Non-blocking receive into x; handle.wait() returns x."""
        x = as_array(x, "receive buffer")
        _, stage = staging(x)
        wbs = []
        buf = to_mpi(flat_out(x, stage, wbs))
        source = MPI.ANY_SOURCE if src is None else src
        self._log("<-", source, "irecv", buf.nbytes, tag)
        req = self._p2p.Irecv([buf, BYTE], source, tag)

        def steps():
            yield (req,)
        peers = None if src is None else (src,)       # any source: every other rank
        return Handle(steps(), lambda: _finish_writebacks(wbs, x), watch=self._watch,
                      what=f"recv(tag={tag}) from {'any rank' if src is None else f'rank {src}'}", peers=peers)

    def sendrecv(self, x, peer, out=None, recv_from=None, tag=0):
        """Send x to `peer` while receiving an array like x (or into out) from `recv_from`
        (default: the same peer). Returns the received array."""
        x = as_array(x, "send buffer")
        if out is None:
            out = backend.get_array_module(x).empty_like(x)
        _, stage = staging(x, out)
        sbuf = to_mpi(flat_in(x, stage))
        wbs = []
        rbuf = to_mpi(flat_out(out, stage, wbs))
        source = peer if recv_from is None else recv_from
        self._log("->", peer, "send", sbuf.nbytes, tag)
        self._log("<-", source, "recv", rbuf.nbytes, tag)
        self._traffic.add("p2p", sbuf.nbytes)
        if ACTIVE or self._watch is not None:
            reqs = [self._p2p.Irecv([rbuf, BYTE], source, tag), self._p2p.Isend([sbuf, BYTE], peer, tag)]

            def steps():
                yield reqs
            Handle(steps(), watch=self._watch, what=f"sendrecv(tag={tag}) with rank {peer}",
                   peers=tuple(sorted({peer, source}))).wait()
        else:
            self._p2p.Sendrecv([sbuf, BYTE], peer, tag, [rbuf, BYTE], source, tag)
        return _finish_writebacks(wbs, out)

    @staticmethod
    def completed(result=None):
        """A handle that is already done (for uniform code paths)."""
        return Completed(result)
