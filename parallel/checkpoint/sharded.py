"""Sharded checkpoints: each rank writes the shard of parameters and optimizer state it owns,
rank 0 a manifest; loadable at any rank count and any ZeRO stage; atomic; checksummed.

As ZeRO's partitioned checkpoints (Rajbhandari et al. 2019, arXiv 1910.02054, and
DeepSpeed's universal checkpoint) and PyTorch's distributed checkpoint: nobody gathers the
model, so saving costs each rank only its 16P/N bytes (float32 AdamW: params, m, v).

A shard is a flat range of the padded per-dtype buffers of engine/flat.py (the same range
ZeRO's reduce-scatter gives the rank; shard_range(numel, r, N, align)), so the layout
depends on N and align only, never on the stage::

    padded buffer (dt)   [ wte | wpe | h.0.ln_1.weight | ... | ln_f.bias | pad ]
    saved at N = 4       [ shard 0  | shard 1   | shard 2     | shard 3       ]
    loaded at N = 3      [ rank 0      | rank 1       | rank 2                 ]
                         rank r reads the saved shards overlapping its new range

    out/step_<k>/
      shard-<r>-of-<N>.safetensors   params.<dt>, exp_avg.<dt>, exp_avg_sq.<dt>: (S,) each, S = padded / N
      manifest.json                  format, step, world N, align, buffers {dt: numel, padded},
                                     params {name: dtype, offset, numel, shape} (flat.index),
                                     optim {dt: step}, shards [{file, ranges, bytes, sha256}],
                                     per_rank [JSON dict of each rank], and the caller's keys

Pipeline parallelism (train.py --pp P): each stage has its own flat buffers, sharded over
its dp (x sp) group, so the step directory holds one set of shards per stage,
``stage-<s>-of-<P>-shard-<r>-of-<N>.safetensors``, and the manifest, in place of the
top-level world/buffers/params/optim/shards/per_rank, a list ``pipeline.stages`` with those
keys for each stage (``stages_of``). Readers find each parameter BY NAME in the stage that
holds it (wte: the first stage's copy; the last stage's is equal), so a checkpoint loads into
any layout, pp x dp (x sp) with any ZeRO stage, and ``consolidate`` assembles one model.

Atomic across ranks (engine/checkpoint.py's protocol): rank 0 makes out/.tmp-step_<k>-<pid>;
every rank writes and fsyncs its shard there and reports its size and sha256; only when all
N have succeeded does rank 0 write the manifest and rename the directory to step_<k>, then
move ``latest``. A rank that dies mid-write leaves only the temporary directory (deleted by
the next save), so a checkpoint is whole or absent. Every exchange is a collective over
``comm`` (small JSON as uint8 arrays: nothing is pickled); a failure on any rank raises
the same one-line CheckpointError on every rank, so all of them exit alike.

Loading verifies the manifest, the layout against the model (names, dtypes, shapes: another
model configuration or dtype is refused), and the size and sha256 of every shard it reads;
a parameter whose place in the flat buffer differs (another pipeline stage, another
parameter order) is read by name from wherever it was saved (parallel/checkpoint/reshard.py:
the layouts, their checks, the reading). ``consolidate`` assembles the full parameters
(host, no MPI); the entry point consolidate.py writes them as one safetensors file or a
Hugging Face directory.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from engine.backend import to_numpy
from engine.checkpoint import begin_write, commit, file_info, read_manifest, resolve, verify_file
from engine.flat import padded_size, shard_range
from engine.io import CheckpointError, atomic_write_json, one_line, save_safetensors

from .reshard import (KEYS, _check_sizes, _np_dtype, check_layout, check_params,  # noqa: F401
                      read_params, read_range, saved_index, shard_file, stages_of, view_key)

FORMAT = "mpi-transformer-engine/sharded-checkpoint"
FORMAT_VERSION = 1
RESERVED = ("format", "format_version", "step", "world", "align", "buffers", "params", "optim",
            "shards", "per_rank", "pipeline")


# -- small JSON exchanges over the communicator (no pickle) --------------------------------
def exchange(comm, obj):
    """[obj of rank 0, ..., obj of rank N-1] on every rank: JSON bytes all-gathered as uint8."""
    data = np.frombuffer(json.dumps(obj).encode("utf-8"), dtype=np.uint8).copy()
    if comm is None or comm.size == 1:
        return [json.loads(data.tobytes())]
    lengths = comm.all_gather(np.array([data.size], dtype=np.int64))          # (N,)
    counts = [int(n) for n in lengths]
    out = comm.all_gather(data, counts=counts)                                # (sum counts,) uint8
    offs = np.concatenate([[0], np.cumsum(counts)])
    return [json.loads(out[offs[i]:offs[i + 1]].tobytes()) for i in range(len(counts))]


def agree(comm, error):
    """A collective: raise the lowest failing rank's error (a one-line str) on every rank."""
    errors = [e for e in exchange(comm, error) if e]
    if errors:
        raise CheckpointError(errors[0])


# -- save ------------------------------------------------------------------------------------
def save_sharded(out_dir, step, comm, flat, shard_state, manifest, per_rank=None, keep=None, group=None,
                 stage=None, tp=None):
    """Every rank of ``comm``: write this rank's shard (``shard_state``, the structure of
    ZeroEngine.shard_state()) into out_dir/step_<step>; rank 0 adds the manifest (``manifest``:
    the caller's JSON keys; ``per_rank``: a JSON dict of this rank, e.g. its RNG state).
    Pipeline stages: ``stage`` = (s, P) of this rank's stage, ``comm`` its dp (x sp) group, ``group``
    every rank of every stage (the world), whose rank 0 writes the manifest. Tensor parallelism:
    ``tp`` = (t, T, slices) of this rank, slices {name: slice} of the parameters it cut
    (parallel/tensor/model.py slice_specs), ``group`` the world; one layout per (stage, t).
    Atomic and collective (over ``group``, default ``comm``); returns the step directory."""
    clash = [k for k in manifest if k in RESERVED]
    if clash:
        raise ValueError(f"save_sharded: manifest key {clash[0]!r} is reserved")
    N, r = (1, 0) if comm is None else (comm.size, comm.rank)
    group = comm if group is None else group
    g = 0 if group is None else group.rank
    tmp, err = None, None
    if g == 0:
        try:
            tmp = begin_write(out_dir, step)
        except OSError as e:
            err = f"cannot create a checkpoint in {out_dir}: {one_line(e)}"
    tmp, err = exchange(group, [tmp, err])[0]                 # rank 0's answer, to all
    if err:
        raise CheckpointError(err)

    tpk = None if tp is None else (tp[0], tp[1])
    fname = shard_file(r, N, stage, tpk)
    try:                                                      # this rank's shard, fsynced
        tensors, ranges, steps = shard_tensors(flat, shard_state, r, N)
        info = dict(file=fname, ranges=ranges, steps=steps, **write_shard(os.path.join(tmp, fname), tensors, r, N))
    except (OSError, ValueError, TypeError, KeyError) as e:
        info = {"error": f"rank {r}: cannot write {os.path.join(tmp, fname)}: {type(e).__name__}: {one_line(e)}"}
    infos = exchange(group, {"shard": info, "per_rank": per_rank, "rank": r, "stage": stage, "tp": tpk,
                             "layout": None if r else flat_layout(flat, N, tp)})
    err = next((i["shard"]["error"] for i in infos if "error" in i["shard"]), None)

    path = None
    if g == 0:
        try:
            if err is None:
                err = publish(tmp, out_dir, step, manifest, infos, keep)
                path = None if err else os.path.join(out_dir, f"step_{step}")
        except OSError as e:
            err = f"cannot write the checkpoint {tmp}: {one_line(e)}"
        if err is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    path, err = exchange(group, [path, err])[0]
    if err:
        raise CheckpointError(err)
    return path


# -- the pieces of a save, also used to write a checkpoint from buddy replicas (replicas.py) --
def shard_tensors(flat, shard_state, r, N):
    """({"params.<dt>" | "exp_avg.<dt>" | "exp_avg_sq.<dt>": (S,) host array}, {dt: [lo, hi]},
    {dt: optimizer step}) of rank r of N: what its shard file holds."""
    tensors, ranges, steps = {}, {}, {}
    for dt in flat.dtypes:
        lo, hi = shard_range(flat.numel[dt], r, N, flat.align)
        ranges[dt] = [lo, hi]
        o = shard_state["optim"][dt]
        for key, prefix in KEYS:
            a = shard_state["params"][dt] if key == "params" else o[key]
            a = np.ascontiguousarray(to_numpy(a)).reshape(-1)                        # (S,) host
            if a.shape != (hi - lo,):
                raise ValueError(f"{dt} {key} shard has {a.size} elements, range [{lo}, {hi}) needs {hi - lo}")
            tensors[f"{prefix}.{dt}"] = a
        steps[dt] = int(o["step"])
    return tensors, ranges, steps


def write_shard(fpath, tensors, r, N):
    """Write (and fsync) one shard file; returns its {"sha256", "bytes"}."""
    save_safetensors(fpath, tensors, metadata={"format": FORMAT, "rank": str(r), "world": str(N)})
    return file_info(fpath)


def flat_layout(flat, N, tp=None):
    """The manifest's description of a flat layout sharded N ways (tp: (t, T, slices) or None)."""
    return dict(world=N, align=flat.align,
                buffers={dt: {"numel": int(flat.numel[dt]), "padded": padded_size(flat.numel[dt], N, flat.align)}
                         for dt in flat.dtypes},
                params={name: {"dtype": dt, "offset": off, "numel": n, "shape": list(shape)}
                        for name, (dt, off, n, shape) in flat.index.items()},
                **({} if tp is None else {"tp": {"rank": tp[0], "size": tp[1], "slices": tp[2]}}))


def publish(tmp, out_dir, step, manifest, infos, keep=None):
    """Write the manifest of the shards in ``tmp`` (``infos``: every rank's {"shard", "per_rank",
    "rank", "stage", "tp", "layout"}) and commit ``tmp`` as out_dir/step_<step>. Returns None, or
    a one-line error (nothing committed)."""
    steps = infos[0]["shard"]["steps"]
    if any(i["shard"]["steps"] != steps for i in infos):
        return f"optimizer step counts differ between ranks: {[i['shard']['steps'] for i in infos]}"
    views = []                                    # one per (stage, tp rank), in that order
    part = (lambda i: (tuple(i["stage"] or ()), tuple(i["tp"] or ())))
    for s, t in sorted({part(i) for i in infos}):
        mine = sorted((i for i in infos if part(i) == (s, t)), key=lambda i: i["rank"])
        views.append(dict(next(i["layout"] for i in mine if i["rank"] == 0),
                          optim={dt: {"step": n} for dt, n in steps.items()},
                          shards=[i["shard"] for i in mine], per_rank=[i["per_rank"] for i in mine],
                          **({"stage": list(s)} if s else {})))
    one = len(views) == 1 and not infos[0]["stage"] and not infos[0]["tp"]
    stage, tp = infos[0]["stage"], infos[0]["tp"]
    layout = views[0] if one else {"pipeline": {"pp": int(stage[1]) if stage else 1, "tp": int(tp[1]) if tp else 1,
                                                "stages": views}}
    atomic_write_json(os.path.join(tmp, "manifest.json"), dict(
        manifest, format=FORMAT, format_version=FORMAT_VERSION, step=step, **layout))
    commit(out_dir, tmp, step, keep)
    return None


# -- load ------------------------------------------------------------------------------------
def read_sharded_manifest(path):
    """(step directory, manifest) of a sharded checkpoint: ``path`` is an out dir (follows
    ``latest``) or a step_<k> dir. No collective; the layout is not checked yet."""
    step_dir = resolve(path)
    return step_dir, read_manifest(step_dir, FORMAT, FORMAT_VERSION)


@dataclass
class Opened:
    """A sharded checkpoint's step directory and manifest (no tensors read yet)."""
    path: str
    manifest: dict

    @property
    def step(self):
        return self.manifest["step"]


def open_checkpoint(path, comm=None, verify=True):
    """Opened(step dir, manifest) of the sharded checkpoint at ``path`` (out dir or step dir),
    every shard's presence and size checked and, with ``verify``, its sha256: the ranks of
    ``comm`` share the hashing (rank r hashes shards r, r + N, ...), then agree (a collective
    once the manifest has been read: every rank reads the same one and fails alike before it)."""
    opened = Opened(*read_sharded_manifest(path))
    err = None
    try:
        N, r = (1, 0) if comm is None else (comm.size, comm.rank)
        shards = [sh for v in stages_of(opened.manifest) for sh in v["shards"]]    # every stage's
        _check_sizes(opened.path, shards)
        for s in shards[r::N] if verify else ():
            verify_file(os.path.join(opened.path, s["file"]), s, f"checkpoint {opened.path}")
    except CheckpointError as e:
        err = one_line(e)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        err = f"checkpoint {opened.path}: malformed manifest ({type(e).__name__}: {one_line(e)})"
    agree(comm, err)
    return opened


def load_sharded(path, comm, flat, verify=True, group=None, stage=None, slices=None):
    """Every rank of ``comm``: (shard_state of this rank at the CURRENT world size and flat
    layout, manifest, this rank's per_rank dict when saved at the same layout else None).
    ``stage`` (s, P): ``flat`` holds pipeline stage s of P (a subset of the checkpoint's
    parameters), ``group`` every rank of every stage; ``slices`` {name: slice}: the parameters
    tensor parallelism cut on this rank (parallel/tensor/model.py slice_specs), read by their
    full shape from any tp layout. Sizes are always checked, the sha256 of
    each shard read unless ``verify`` is False (the caller verified it with open_checkpoint).
    A collective (over ``group``, default ``comm``): any rank's failure raises the same
    one-line CheckpointError on all."""
    N, r = (1, 0) if comm is None else (comm.size, comm.rank)
    state, manifest, err = None, None, None
    try:
        step_dir, manifest = read_sharded_manifest(path)
        check_layout(manifest, step_dir, flat.index, flat.dtypes, partial=stage is not None, slices=slices)
        saved = saved_index(manifest, step_dir)
        for view in stages_of(manifest):                      # cheap checks of every shard, on every rank
            _check_sizes(step_dir, view["shards"])
        state, cache = {"params": {}, "optim": {}}, {}
        for dt in flat.dtypes:
            lo, hi = shard_range(flat.numel[dt], r, N, flat.align)
            got = read_params(step_dir, manifest, saved, flat.index, dt, flat.data[dt].dtype, lo, hi, cache, verify,
                              slices)
            state["params"][dt] = got["params"]                                      # (S',) each
            state["optim"][dt] = {"m": got["exp_avg"], "v": got["exp_avg_sq"],
                                  "step": int(stages_of(manifest)[0]["optim"][dt]["step"])}
    except CheckpointError as e:
        err = one_line(e)
    except (KeyError, TypeError, ValueError, OSError) as e:      # a manifest valid JSON but not ours
        err = f"checkpoint {path}: malformed ({type(e).__name__}: {one_line(e)})"
    agree(comm if group is None else group, err)
    views = stages_of(manifest)
    here = (None if stage is None else tuple(stage), None)   # saved at this layout: its per-rank state
    view = None if slices else next((v for v in views if view_key(v) == here), None)
    per_rank = view.get("per_rank") if view is not None and view["world"] == N else None
    return state, manifest, per_rank[r] if isinstance(per_rank, list) and len(per_rank) == N else None


def _one_process_order(saved):
    """The names of ``saved`` (listed stage by stage) in one process's order. The interleaved
    schedule gives a stage the blocks of several chunks (pp = 2, v = 2: stage 0 holds h.0 and
    h.2), so blocks sort by layer; what precedes the first block (wte, wpe) stays first, what
    follows it elsewhere (ln_f) last. Without pipeline stages this is the saved order."""
    key, seen_block = {}, False
    for pos, name in enumerate(saved):
        m = re.match(r"transformer\.h\.(\d+)\.", name)
        seen_block = seen_block or m is not None
        key[name] = (1, int(m.group(1)), pos) if m else (2 if seen_block else 0, 0, pos)
    return sorted(saved, key=key.__getitem__)


def consolidate(path, with_optim=False, verify=True):
    """The full parameters of a sharded checkpoint, {name: array of its shape} in layout order,
    read on one process (no MPI); with_optim: also ({dt: {"m", "v", "step"}} of the unpadded
    buffers in one process's flat order, manifest). Pipeline checkpoints: every stage's
    parameters, wte once. Every shard's size and sha256 is checked."""
    step_dir, manifest = read_sharded_manifest(path)
    saved = saved_index(manifest, step_dir)
    index, ends = {}, {}                                      # one process's layout, by name
    for name in _one_process_order(saved):
        dt, shape = saved[name][0], saved[name][3]
        n = int(np.prod(shape, dtype=np.int64))
        index[name] = (dt, ends.get(dt, 0), n, shape)
        ends[dt] = ends.get(dt, 0) + n
    cache, params, optim = {}, {}, {}
    for dt, numel in ends.items():
        full = read_params(step_dir, manifest, saved, index, dt, _np_dtype(dt), 0, numel, cache, verify)   # (numel,)
        for name, (d, off, n, shape) in index.items():
            if d == dt:
                params[name] = full["params"][off:off + n].reshape(shape)
        optim[dt] = {"m": full["exp_avg"], "v": full["exp_avg_sq"],
                     "step": int(stages_of(manifest)[0]["optim"][dt]["step"])}
    params = {name: params[name] for name in index}
    return (params, optim, manifest) if with_optim else params
