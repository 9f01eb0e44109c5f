"""Buddy replicas without MPI (parallel/checkpoint/replicas.py, recover.py): who holds whose
shard, the packing, and which state a recovery takes from a store -- the newest step every
shard has, never a copy whose crc32 does not match, and none when a rank and its buddy are gone."""
import json
import os

import numpy as np

from parallel.checkpoint.recover import find_whole
from parallel.checkpoint.replicas import buddies, crc32, pack_spec, rank_dir, unpack


def test_buddies_cross_hosts_and_form_one_ring():
    hosts = ["a", "a", "b", "b", "c"]
    pairs = buddies(hosts)
    assert sorted(pairs) == sorted(pairs.values()) == list(range(5))          # a permutation
    r, seen = 0, set()
    while r not in seen:                                                      # one cycle through all
        seen.add(r)
        r = pairs[r]
    assert seen == set(range(5))
    assert all(hosts[r] != hosts[b] for r, b in pairs.items() if r != 4)      # only the odd one out may not
    assert buddies(["h"] * 3) == {0: 1, 1: 2, 2: 0}


def test_pack_unpack_round_trip():
    tensors = {"params.float32": np.arange(5, dtype=np.float32), "exp_avg.float64": np.ones(3)}
    spec, nbytes = pack_spec(tensors)
    buf = np.zeros(nbytes, np.uint8)
    for name, view in unpack(buf, spec).items():
        np.copyto(view, tensors[name])
    assert all(np.array_equal(unpack(buf, spec)[k], v) for k, v in tensors.items())


def _store(tmp_path, n, steps, manifest=None):
    """A store of n ranks on one host (buddy r -> r + 1), each holding its own and its ward's
    slots at ``steps``; every shard is 4 float64 values r + step."""
    pairs = {r: (r + 1) % n for r in range(n)}
    spec, nbytes = pack_spec({"params.float64": np.zeros(4)})
    records = [{"rank": r, "world": n, "stage": None, "tp": None, "file": f"shard-{r}-of-{n}.safetensors",
                "ranges": {"float64": [4 * r, 4 * r + 4]}, "layout": None, "spec": spec, "nbytes": nbytes}
               for r in range(n)]
    for r in range(n):
        d = rank_dir(str(tmp_path), r)
        os.makedirs(d)
        with open(os.path.join(d, "records.json"), "w") as f:
            json.dump({"records": records, "hosts": ["h"] * n, "buddies": pairs, "every": 1}, f)
        ward = (r - 1) % n
        for i, s in enumerate(steps):
            for kind, of in (("own", r), ("ward", ward)):
                data = np.full(4, float(of + s)).view(np.uint8)
                data.tofile(os.path.join(d, f"{kind}-{i}.bin"))
                head = {"step": s, "crc32": crc32(data), "steps": {"float64": s}, "of": of}
                if kind == "own":
                    head["manifest"] = manifest or {"step_seen": s}
                with open(os.path.join(d, f"{kind}-{i}.json"), "w") as f:
                    json.dump(head, f)
    return str(tmp_path)


def test_newest_common_step_from_own_and_buddy_copies(tmp_path):
    store = _store(tmp_path, 3, [4, 6])
    step, chosen, _, manifest = find_whole(store, {0, 2})            # rank 1 died: its buddy 2 holds it
    assert step == 6 and manifest == {"step_seen": 6}
    assert {q: src for q, (_, _, src) in chosen.items()} == {0: "own", 1: "buddy 2", 2: "own"}


def test_a_corrupted_copy_is_never_used(tmp_path):
    store = _store(tmp_path, 3, [4, 6])
    path = os.path.join(rank_dir(store, 2), "ward-1.bin")            # rank 1's step-6 copy, on rank 2
    data = np.fromfile(path, np.uint8)
    data[3] ^= 1
    data.tofile(path)
    step, chosen, _, _ = find_whole(store, {0, 2})
    assert step == 4 and chosen[1][2] == "buddy 2"


def test_rank_and_its_buddy_lost(tmp_path):
    store = _store(tmp_path, 4, [2])
    step, why, _, _ = find_whole(store, {0, 3})                      # 1 and its buddy 2 are gone
    assert step is None and "both copies of rank 1's shard are lost" in why
