"""Buddy replicas: every K steps each rank's checkpoint shard goes into a buddy rank's RAM, so
a job that loses a rank restarts from memory (recover.py) instead of from the disk checkpoint.

As Gemini (Wang et al., SOSP 2023: checkpoints in peers' CPU memory, recovery 13x faster than
from storage) and TorchFT (a replica's state from a healthy peer). What a rank replicates is
exactly what it would write into a sharded checkpoint (sharded.py): its range of the flat
parameters and of AdamW's m and v, 12 bytes per parameter / N in float32, plus the training
manifest (configs, tokenizer, the batcher's RNG state and data position, metrics), which is
the same on every rank. The dropout and sparse-layer noise needs no state: it is a function
of (seed, step, ...) (engine/random.py), so a run restored from a replica is exact.

Who holds whose.  Ranks are ordered round-robin over hosts (MPI_Get_processor_name), and each
rank's buddy is the next one in that order, its ward the previous one, so a buddy sits on
another host whenever there is one::

    hosts a: 0 1   b: 2 3      order 0 2 1 3      buddy 0->2, 2->1, 1->3, 3->0 (every pair crosses hosts)
    one host, N ranks          buddy r -> r + 1 mod N

The store (a directory on tmpfs, /dev/shm by default: RAM that outlives the process, so
nothing has to be written while MPI tears a failed job down; no disk is touched)::

    <dir>/rank-<r>/records.json       every rank's fixed shard record (file name, ranges, layout), and hosts
    <dir>/rank-<r>/own-<i>.bin|.json  this rank's shard at a replica step s, slot i = (s / K) mod 2
    <dir>/rank-<r>/ward-<i>.bin|.json the ward's shard at step s, as received from it

Double-buffered and checksummed.  At replica step s, slot i: the rank first finishes the
transfers of step s - K (they had K steps; a wait with the watchdog's deadline), deletes
own-i.json, copies its shard into own-i.bin (a memory map), writes own-i.json {step, crc32,
optimizer steps, manifest} atomically; then deletes ward-i.json and posts a non-blocking
receive of the ward's shard into ward-i.bin and a non-blocking send of own-i.bin to the buddy
(on a communicator of their own). When the receive completes (from whichever wait completes
it, finished at the latest by the step after s), ward-i.json is written with the sender's
crc32, which recover.py checks before it uses the copy (a corrupted copy is never used). A
.bin is whole exactly when its .json exists, and slot
i xor 1 still holds step s - K while slot i is rewritten: a failure during a copy leaves the
previous replica whole, and the newest whole state is never more than K completed steps old.

Cost per replica step: one copy and one crc32 of the shard on the sender (memory bandwidth),
the shard's bytes on the wire, two small file writes; 4 shards of RAM per rank (two slots of
its own, two of its ward's). K = 0 turns replicas off.
"""
import json
import os
import socket
import zlib

import numpy as np
from mpi4py import MPI

from engine.io import atomic_write_json

from .sharded import exchange

DATA_TAG, HEADER_TAG = 1, 2


def default_store():
    """A per-user directory on tmpfs (RAM) when the machine has /dev/shm, else the temp dir."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")
    return os.path.join(base, f"mte-replicas-{os.getuid()}")


def buddy_order(hosts):
    """World ranks ordered round-robin over their hosts (hosts[r]: rank r's host name)."""
    by_host = {}
    for r, h in enumerate(hosts):
        by_host.setdefault(h, []).append(r)
    queues, order = list(by_host.values()), []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def buddies(hosts):
    """{rank: its buddy} for the ranks on ``hosts``: the next rank in buddy_order."""
    order = buddy_order(hosts)
    return {r: order[(j + 1) % len(order)] for j, r in enumerate(order)}


def pack_spec(tensors):
    """[[name, dtype, count, byte offset]] of ``tensors`` in name order, and the total bytes."""
    spec, off = [], 0
    for name in sorted(tensors):
        a = tensors[name]
        spec.append([name, a.dtype.str, int(a.size), off])
        off += a.nbytes
    return spec, off


def unpack(buf, spec):
    """{name: 1-D array view of buf} (the inverse of the copy in BuddyReplicas.snapshot)."""
    return {name: buf[off:off + count * np.dtype(dt).itemsize].view(dt) for name, dt, count, off in spec}


def crc32(buf):
    return zlib.crc32(memoryview(buf).cast("B"))


def rank_dir(store, r):
    return os.path.join(store, f"rank-{r}")


def _memmap(path, nbytes):
    return np.memmap(path, dtype=np.uint8, mode="w+", shape=(max(nbytes, 1),))[:nbytes]


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class BuddyReplicas:
    """This rank's side of the buddy replicas (module docstring). ``world``: the job's
    Communicator; ``step``: the Step (parallel/step.py), whose shard() gives the record and the
    tensors; ``every``: K; ``store``: the directory. Building it is a collective."""

    def __init__(self, world, step, every, store):
        self.step, self.every, self.store = step, int(every), store
        self.rank, self.size = world.rank, world.size
        self.comm = world.split(0, label="replicas")        # its own messages never meet another's
        record, tensors, _ = step.shard()
        self.spec, self.nbytes = pack_spec(tensors)
        mine = dict(record, spec=self.spec, nbytes=self.nbytes, world_rank=self.rank)
        self.records = exchange(world, mine)                   # every rank's, by world rank
        self.hosts = [h for h in exchange(world, MPI.Get_processor_name() or socket.gethostname())]
        pairs = buddies(self.hosts)
        self.buddy = pairs[self.rank]
        self.ward = next(r for r, b in pairs.items() if b == self.rank)
        self.dir = rank_dir(store, self.rank)
        os.makedirs(self.dir, exist_ok=True)
        for i in (0, 1):                                        # stale slots of an earlier job
            _remove(self._path("own", i, ".json"))
            _remove(self._path("ward", i, ".json"))
        atomic_write_json(os.path.join(self.dir, "records.json"),
                          {"records": self.records, "hosts": self.hosts, "buddies": pairs, "every": self.every})
        ward_bytes = self.records[self.ward]["nbytes"]
        self.own = [_memmap(self._path("own", i, ".bin"), self.nbytes) for i in (0, 1)]
        self.wards = [_memmap(self._path("ward", i, ".bin"), ward_bytes) for i in (0, 1)]
        self.header = np.zeros(2 + len(record["ranges"]), np.int64)   # sent: step, crc32, optimizer steps
        self.ward_header = np.zeros_like(self.header)
        self.pending = None                                     # (step, [handles]) in flight
        self.copies, self.bad = 0, 0                            # replicas received whole, and corrupted

    def _path(self, kind, i, ext):
        return os.path.join(self.dir, f"{kind}-{i}{ext}")

    def after_step(self, s, manifest):
        """Call after every optimizer step s: a snapshot when K divides s, else a look at the
        transfers in flight. ``manifest()`` gives the training manifest (called only when needed)."""
        if s % self.every == 0:
            self.finish()
            self.snapshot(s, manifest())
        elif self.pending is not None:
            if s > self.pending[0] + 1:
                self.finish()                                   # at the latest the step after
            else:
                self.poll()

    def snapshot(self, s, manifest):
        """Copy this rank's shard into slot (s / K) mod 2, then send it to the buddy and receive
        the ward's into the same slot (non-blocking)."""
        i = (s // self.every) % 2
        _, tensors, steps = self.step.shard()
        own = self.own[i]
        _remove(self._path("own", i, ".json"))                  # slot i is no longer whole
        for name, view in unpack(own, self.spec).items():
            np.copyto(view, tensors[name])
        crc = crc32(own)
        atomic_write_json(self._path("own", i, ".json"), {"step": s, "crc32": crc, "steps": steps,
                                                          "of": self.rank, "manifest": manifest}, indent=None)
        _remove(self._path("ward", i, ".json"))
        self.header[:] = [s, crc] + [steps[dt] for dt in sorted(steps)]
        recv = [self.comm.irecv(self.ward_header, self.ward, HEADER_TAG),
                self.comm.irecv(self.wards[i], self.ward, DATA_TAG)]
        self.pending = (s, recv + [self.comm.isend(self.header, self.buddy, HEADER_TAG),
                                   self.comm.isend(own, self.buddy, DATA_TAG)])
        left = [len(recv)]

        def arrived():                      # from whichever wait completes the receives
            left[0] -= 1
            if left[0] == 0:
                self._commit(i, s)
        for h in recv:
            h.then(arrived)

    def poll(self):
        """Advance the transfers in flight (the ward's replica is committed as it completes)."""
        if self.pending is not None and all(h.test() for h in self.pending[1]):
            self.pending = None

    def finish(self):
        """Wait (with the watchdog's deadline) for the transfers in flight."""
        if self.pending is not None:
            for h in self.pending[1]:
                h.wait()
            self.pending = None

    def _commit(self, i, s):
        """The ward's replica of step s arrived in slot i: checked, then marked whole."""
        step, crc = int(self.ward_header[0]), int(self.ward_header[1])
        dts = sorted(self.records[self.ward]["ranges"])
        try:
            if step != s:                                       # never taken as whole
                self.bad += 1
                return
            steps = {dt: int(n) for dt, n in zip(dts, self.ward_header[2:])}
            atomic_write_json(self._path("ward", i, ".json"), {"step": s, "crc32": crc, "steps": steps,
                                                               "of": self.ward}, indent=None)
            self.copies += 1
        except OSError:
            self.bad += 1

    def close(self, remove=True):
        """At the end of a run that finished: wait for the transfers, drop this rank's store."""
        self.finish()
        self.own = self.wards = None
        if remove:
            for name in os.listdir(self.dir):
                _remove(os.path.join(self.dir, name))
            try:
                os.rmdir(self.dir)
                os.rmdir(self.store)                            # the last rank out removes the store
            except OSError:
                pass


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
