"""How the supervisor learns which ranks died: each rank keeps one TCP connection open to it.

A rank (train.py, at start-up) connects to ELASTIC_CONTACT=host:port and sends "hello <world
rank> <pid>"; when its interpreter exits on its own (success, or an error it reported), it
sends "bye" first (atexit). A rank killed by a signal -- a dead machine, kill -9 -- cannot: the
kernel closes its connection at once, without the goodbye. The supervisor (Listener) records
every close with its time and whether it said goodbye. Launched with the launcher's automatic
clean-up off (MPICH: -disable-auto-cleanup), the survivors live on until the watchdog names
the missing rank and aborts the job, so a dead rank is one whose connection
closed without a goodbye before the watchdog spoke (elastic/supervisor.py lost_ranks, which
also covers MPICH ending the job at once). A stuck rank keeps its connection and is named by
the watchdog instead. No pickle: text lines.
"""
import atexit
import os
import socket
import threading
import time

ENV = "ELASTIC_CONTACT"
_conn = []


def hello(rank):
    """Connect to the supervisor named in the environment (no-op without one)."""
    where = os.environ.get(ENV)
    if not where or _conn:
        return
    host, port = where.rsplit(":", 1)
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.sendall(f"hello {rank} {os.getpid()}\n".encode())
    except OSError:
        return                                   # no supervisor to tell: nothing changes
    _conn.append(s)
    atexit.register(_bye)


def _bye():
    for s in _conn:
        try:
            s.sendall(b"bye\n")
            s.close()
        except OSError:
            pass


class Listener:
    """The supervisor's side: accepts the ranks' connections of one launch; ``closes`` lists
    (monotonic time, world rank, said goodbye) as connections end."""

    def __init__(self):
        self.server = socket.create_server(("", 0))
        self.address = f"{socket.gethostname()}:{self.server.getsockname()[1]}"
        self.closes, self.ranks = [], {}
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        rank, bye, buf = None, False, b""
        with conn:
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    words = line.decode(errors="replace").split()
                    if words[:1] == ["hello"] and len(words) == 3:
                        rank = int(words[1])
                        with self.lock:
                            self.ranks[rank] = int(words[2])
                    elif words == ["bye"]:
                        bye = True
        with self.lock:
            self.closes.append((time.monotonic(), rank, bye))

    def settle(self, timeout=2.0):
        """Wait (a little) until every rank that said hello has closed its connection."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if len(self.closes) >= len(self.ranks):
                    return
            time.sleep(0.01)

    def dead(self, before):
        """World ranks whose connection closed without a goodbye at least half a second before
        ``before`` (the time the watchdog reported a missing rank: the survivors were alive)."""
        with self.lock:
            return {r for t, r, bye in self.closes if not bye and r is not None and t <= before - 0.5}

    def first_dead(self):
        """The rank whose connection closed first, if it closed without a goodbye."""
        with self.lock:
            first = min(self.closes, default=None)
        return {first[1]} if first and not first[2] and first[1] is not None else set()

    def said_bye(self):
        with self.lock:
            return {r for _, r, bye in self.closes if bye}

    def close(self):
        self.server.close()
