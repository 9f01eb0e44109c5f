"""The newest whole state of a job that lost ranks, from the buddy replicas its survivors hold
(replicas.py), written as an ordinary sharded checkpoint (sharded.py) that any layout resumes.

Given the store and the set of surviving world ranks (a dead rank's memory counts as lost,
even where its files are still readable, as on one test machine), every old rank q needs its
shard at one common step s, from

    its own slots        when q survived          rank-<q>/own-<i>.bin
    its buddy's slots    when buddy(q) survived   rank-<buddy(q)>/ward-<i>.bin

A slot counts only with its .json beside it and a crc32 that matches (replicas.py writes the
.json last). The newest s that every q has is the recovery point; none: both copies of some
shard are lost (the rank and its buddy died), and the caller falls back to the disk
checkpoint. ``write_recovered`` writes step_<s> through sharded.py's own pieces (shard files,
the manifest, the atomic commit), so loading it is the tested path of any resume: parameters
found by name, at any rank count, ZeRO stage or pipeline split. No MPI: one process (the
supervisor, or the shrunk job's rank 0) reads the store.
"""
import os

from engine.checkpoint import begin_write

from .replicas import crc32, rank_dir, read_json, unpack
from .sharded import publish, write_shard

import numpy as np


def _records(store, survivors):
    for r in sorted(survivors):
        got = read_json(os.path.join(rank_dir(store, r), "records.json"))
        if got is not None:
            return got
    return None


def _slots(store, holder, kind):
    """{step: (bin path, header)} of the whole slots of one kind held by world rank ``holder``."""
    out = {}
    for i in (0, 1):
        base = os.path.join(rank_dir(store, holder), f"{kind}-{i}")
        head = read_json(base + ".json")
        if head is not None and os.path.exists(base + ".bin"):
            out[int(head["step"])] = (base + ".bin", head)
    return out


def find_whole(store, survivors):
    """(step, {old rank: (bin path, header, "own" | "buddy <b>")}, records, manifest), the newest
    state every old rank's shard is whole at; or (None, reason, records, None)."""
    meta = _records(store, survivors)
    if meta is None:
        return None, f"no replica records in {store}", None, None
    records, buddies = meta["records"], {int(k): v for k, v in meta["buddies"].items()}
    have = {}
    for q in range(len(records)):
        opts = {}
        if q in survivors:
            opts.update({s: (p, h, "own") for s, (p, h) in _slots(store, q, "own").items()})
        b = buddies[q]
        if b in survivors and b != q:
            for s, (p, h) in _slots(store, b, "ward").items():
                opts.setdefault(s, (p, h, f"buddy {b}"))
        have[q] = opts
    common = set.intersection(*(set(o) for o in have.values())) if have else set()
    manifests = {s: h["manifest"] for q in survivors for s, (_, h) in _slots(store, q, "own").items()}
    for s in sorted(common & set(manifests), reverse=True):
        chosen = {q: have[q][s] for q in have}
        if all(_intact(p, h) for p, h, _ in chosen.values()):
            return s, chosen, records, manifests[s]
    if not any(_slots(store, r, "own") for r in survivors):
        return None, "no replica was taken yet", records, None
    lost = [q for q, o in have.items() if not o]
    why = (f"both copies of rank {lost[0]}'s shard are lost (rank {lost[0]} and its buddy rank {buddies[lost[0]]} "
           "are gone)" if lost
           else "the survivors' replicas have no step in common")
    return None, why, records, None


def _intact(path, head):
    buf = np.fromfile(path, dtype=np.uint8)
    return crc32(buf) == int(head["crc32"])


def write_recovered(store, survivors, out_dir, extra=None):
    """Write the newest whole state as out_dir/step_<s> (sharded.py's format; ``extra``: keys
    added to the manifest). Returns (path, step, {old rank: source}) or (None, reason, None)."""
    s, chosen, records, manifest = find_whole(store, survivors)
    if s is None:
        return None, chosen, None
    tmp = begin_write(out_dir, s)
    infos = []
    for q, (path, head, _) in sorted(chosen.items()):
        rec = records[q]
        tensors = unpack(np.fromfile(path, dtype=np.uint8), rec["spec"])
        info = dict(file=rec["file"], ranges=rec["ranges"], steps=head["steps"],
                    **write_shard(os.path.join(tmp, rec["file"]), tensors, rec["rank"], rec["world"]))
        infos.append({"shard": info, "per_rank": None, "rank": rec["rank"], "stage": rec["stage"],
                      "tp": rec["tp"], "layout": rec["layout"]})
    err = publish(tmp, out_dir, s, dict(manifest, **(extra or {})), infos)
    if err:
        return None, err, None
    return os.path.join(out_dir, f"step_{s}"), s, {q: src for q, (_, _, src) in chosen.items()}
