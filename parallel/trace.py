"""Chrome trace of a pipeline step: one row per rank, a box per forward, backward,
weight-gradient and communication wait (open the JSON in https://ui.perfetto.dev or
chrome://tracing). Format: the Trace Event Format's complete events
``{"ph": "X", "name", "cat", "pid", "tid", "ts", "dur"}`` in microseconds, plus one
``thread_name`` metadata event per rank.

Each rank records (kind, micro-batch, chunk, start, end) in seconds from its own origin;
``Tracer.start(comm)`` puts a barrier before taking the origin, so the rows line up to
within the barrier's skew. ``write_chrome_trace`` gathers the events as float64 arrays (no
pickling) with two all_gathers and rank 0 writes the file atomically (engine/io.py: a
temporary file, fsynced, renamed), so a reader never sees half a trace.

Kinds: F, B, W (a micro-batch's forward, input-gradient or full backward, weight gradient),
wait (blocked on a receive), sync (the pipeline's end of step: sends, tied wte, loss),
reduce (train.py: gradients averaged over dp) and optim (train.py: norm, clipping, AdamW).
"""
import json
import time

import numpy as np

from engine.io import atomic_write_text

KINDS = ("F", "B", "W", "wait", "sync", "reduce", "optim")
NAMES = {"F": "forward", "B": "backward", "W": "weight-grad", "wait": "comm wait", "sync": "grad sync",
         "reduce": "dp grad reduce", "optim": "optimizer"}
STEPS = ("F", "B", "W")                 # kinds drawn per micro-batch (F3, B0.1); the rest by kind


class Tracer:
    """Collects (kind, mb, chunk, t0, t1) events on one rank."""

    def __init__(self):
        self.events = []
        self.origin = time.perf_counter()

    def start(self, comm=None):
        """Reset; with a communicator, align the origin across its ranks with a barrier."""
        if comm is not None:
            comm.barrier()
        self.events, self.origin = [], time.perf_counter()
        return self

    def add(self, kind, mb, chunk, t0, t1):
        self.events.append((KINDS.index(kind), mb, chunk, t0 - self.origin, t1 - self.origin))

    def array(self):
        return np.array(self.events, dtype=np.float64).reshape(-1, 5)    # (n, 5)


def gather_events(tracer, comm):
    """Every rank's events, on every rank: list over ranks of (n_r, 5) arrays."""
    mine = tracer.array().reshape(-1)
    counts = comm.all_gather(np.array([mine.size], dtype=np.float64)).astype(int).tolist()
    if sum(counts) == 0:
        return [np.zeros((0, 5)) for _ in counts]
    allv = comm.all_gather(mine, counts=counts)
    out, at = [], 0
    for c in counts:
        out.append(allv[at:at + c].reshape(-1, 5))
        at += c
    return out


def chrome_events(per_rank, labels=None):
    """Trace Event Format list from per-rank (n, 5) event arrays."""
    ev = []
    for r, arr in enumerate(per_rank):
        label = labels[r] if labels else f"rank {r}"
        ev.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": r, "args": {"name": label}})
        for k, mb, c, t0, t1 in arr:
            kind = KINDS[int(k)]
            name = kind if kind not in STEPS else f"{kind}{int(mb)}" + (f".{int(c)}" if c else "")
            ev.append({"ph": "X", "name": name, "cat": NAMES[kind], "pid": 0, "tid": r,
                       "ts": round(t0 * 1e6, 3), "dur": round((t1 - t0) * 1e6, 3),
                       "args": {"micro_batch": int(mb), "chunk": int(c)}})
    return ev


def write_chrome_trace(path, tracer, comm, labels=None):
    """Gather every rank's events over ``comm`` (a collective) and write ``path`` on comm rank 0."""
    per_rank = gather_events(tracer, comm)
    if comm.rank == 0:
        atomic_write_text(path, json.dumps({"traceEvents": chrome_events(per_rank, labels), "displayTimeUnit": "ms"}))
    return per_rank


def mesh_labels(mesh):
    """One row label per world rank: its coordinates on the axes larger than 1."""
    if mesh.world.size == 1:
        return ["rank 0"]
    return [f"rank {r} (" + ", ".join(f"{a} {c}" for a, c in mesh.coords_of(r).items() if mesh.shape[a] > 1) + ")"
            for r in range(mesh.world.size)]
