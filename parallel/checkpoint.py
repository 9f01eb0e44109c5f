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

Atomic across ranks (engine/checkpoint.py's protocol): rank 0 makes out/.tmp-step_<k>-<pid>;
every rank writes and fsyncs its shard there and reports its size and sha256; only when all
N have succeeded does rank 0 write the manifest and rename the directory to step_<k>, then
move ``latest``. A rank that dies mid-write leaves only the temporary directory (deleted by
the next save), so a checkpoint is whole or absent. Every exchange is a collective over
``comm`` (small JSON as uint8 arrays: nothing is pickled); a failure on any rank raises
the same one-line CheckpointError on every rank, so all of them exit alike.

Loading verifies the manifest, the layout against the model (names, dtypes, shapes,
offsets: another model configuration or dtype is refused), and the size and sha256 of
every shard it reads. ``consolidate`` assembles the full parameters (host, no MPI); the
entry point consolidate.py writes them as one safetensors file or a Hugging Face directory.
"""
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from engine.backend import bfloat16, to_numpy
from engine.checkpoint import begin_write, commit, file_info, read_manifest, resolve, verify_file
from engine.flat import dtype_name, padded_size, shard_range
from engine.io import CheckpointError, atomic_write_json, load_safetensors, save_safetensors

FORMAT = "mpi-transformer-engine/sharded-checkpoint"
FORMAT_VERSION = 1
RESERVED = ("format", "format_version", "step", "world", "align", "buffers", "params", "optim",
            "shards", "per_rank")
KEYS = (("params", "params"), ("m", "exp_avg"), ("v", "exp_avg_sq"))   # shard_state key, tensor prefix


def _np_dtype(name):
    return np.dtype(bfloat16()) if name == "bfloat16" else np.dtype(name)


def shard_file(rank, world):
    return f"shard-{rank}-of-{world}.safetensors"


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


def _one_line(e):
    return " ".join(str(e).split())


# -- save ------------------------------------------------------------------------------------
def save_sharded(out_dir, step, comm, flat, shard_state, manifest, per_rank=None, keep=None):
    """Every rank of ``comm``: write this rank's shard (``shard_state``, the structure of
    ZeroEngine.shard_state()) into out_dir/step_<step>; rank 0 adds the manifest (``manifest``:
    the caller's JSON keys; ``per_rank``: a JSON dict of this rank, e.g. its RNG state).
    Atomic and collective; returns the step directory on every rank."""
    clash = [k for k in manifest if k in RESERVED]
    if clash:
        raise ValueError(f"save_sharded: manifest key {clash[0]!r} is reserved")
    N, r = (1, 0) if comm is None else (comm.size, comm.rank)
    tmp, err = None, None
    if r == 0:
        try:
            tmp = begin_write(out_dir, step)
        except OSError as e:
            err = f"cannot create a checkpoint in {out_dir}: {_one_line(e)}"
    tmp, err = exchange(comm, [tmp, err])[0]                  # rank 0's answer, to all
    if err:
        raise CheckpointError(err)

    fpath = os.path.join(tmp, shard_file(r, N))
    try:                                                      # this rank's shard, fsynced
        tensors, ranges, steps = {}, {}, {}
        for dt in flat.dtypes:
            lo, hi = shard_range(flat.numel[dt], r, N, flat.align)
            ranges[dt] = [lo, hi]
            o = shard_state["optim"][dt]
            for key, prefix in KEYS:
                a = shard_state["params"][dt] if key == "params" else o[key]
                a = np.ascontiguousarray(to_numpy(a)).reshape(-1)                    # (S,) host
                if a.shape != (hi - lo,):
                    raise ValueError(f"{dt} {key} shard has {a.size} elements, range [{lo}, {hi}) needs {hi - lo}")
                tensors[f"{prefix}.{dt}"] = a
            steps[dt] = int(o["step"])
        save_safetensors(fpath, tensors, metadata={"format": FORMAT, "rank": str(r), "world": str(N)})
        info = dict(file=shard_file(r, N), ranges=ranges, steps=steps, **file_info(fpath))
    except (OSError, ValueError, TypeError, KeyError) as e:
        info = {"error": f"rank {r}: cannot write {fpath}: {type(e).__name__}: {_one_line(e)}"}
    infos = exchange(comm, {"shard": info, "per_rank": per_rank})
    err = next((i["shard"]["error"] for i in infos if "error" in i["shard"]), None)

    path = None
    if r == 0:
        try:
            if err is None:
                steps = infos[0]["shard"]["steps"]
                if any(i["shard"]["steps"] != steps for i in infos):
                    err = f"optimizer step counts differ between ranks: {[i['shard']['steps'] for i in infos]}"
            if err is None:
                atomic_write_json(os.path.join(tmp, "manifest.json"), dict(
                    manifest, format=FORMAT, format_version=FORMAT_VERSION, step=step, world=N,
                    align=flat.align,
                    buffers={dt: {"numel": int(flat.numel[dt]), "padded": padded_size(flat.numel[dt], N, flat.align)}
                             for dt in flat.dtypes},
                    params={name: {"dtype": dt, "offset": off, "numel": n, "shape": list(shape)}
                            for name, (dt, off, n, shape) in flat.index.items()},
                    optim={dt: {"step": s} for dt, s in steps.items()},
                    shards=[i["shard"] for i in infos],
                    per_rank=[i["per_rank"] for i in infos]))
                path = commit(out_dir, tmp, step, keep)
        except OSError as e:
            err = f"cannot write the checkpoint {tmp}: {_one_line(e)}"
        if err is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    path, err = exchange(comm, [path, err])[0]
    if err:
        raise CheckpointError(err)
    return path


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
        shards = opened.manifest["shards"]
        _check_sizes(opened.path, shards)
        for s in shards[r::N] if verify else ():
            verify_file(os.path.join(opened.path, s["file"]), s, f"checkpoint {opened.path}")
    except CheckpointError as e:
        err = _one_line(e)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        err = f"checkpoint {opened.path}: malformed manifest ({type(e).__name__}: {_one_line(e)})"
    agree(comm, err)
    return opened


def _check_sizes(step_dir, shards):
    """Every shard file present with the size the manifest records (cheap: no reading)."""
    for s in shards:
        fpath = os.path.join(step_dir, s["file"])
        if not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {step_dir} lacks {s['file']}")
        if os.path.getsize(fpath) != s["bytes"]:
            raise CheckpointError(f"{fpath} is {os.path.getsize(fpath)} bytes, the manifest says {s['bytes']} "
                                  "(truncated or corrupt)")


def check_params(opened, named_params):
    """check_layout against a model's named_parameters() before any flat buffer exists
    (the offsets FlatParameters will give: layout order, per dtype, shared ones once)."""
    index, ends, seen = {}, {}, set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        dt = dtype_name(p.data.dtype)
        index[name] = (dt, ends.get(dt, 0), int(p.data.size), tuple(p.data.shape))
        ends[dt] = ends.get(dt, 0) + int(p.data.size)
    check_layout(opened.manifest, opened.path, index, list(ends))


def check_layout(manifest, step_dir, index, dtypes):
    """One-line CheckpointError unless the checkpoint holds exactly the parameters of
    ``index`` ({name: (dtype, offset, numel, shape)}, FlatParameters.index) in ``dtypes``."""
    where = f"checkpoint {step_dir}"
    try:
        saved = {k: (p["dtype"], p["offset"], p["numel"], tuple(p["shape"])) for k, p in manifest["params"].items()}
        world, align, buffers, shards = manifest["world"], manifest["align"], manifest["buffers"], manifest["shards"]
        for dt, b in buffers.items():
            if b["padded"] != padded_size(b["numel"], world, align):
                raise ValueError(f"{dt} buffer of {b['numel']} elements cannot be padded to {b['padded']}")
        if len(shards) != world:
            raise ValueError(f"{len(shards)} shards recorded for a world of {world}")
        for r, s in enumerate(shards):
            if s["file"] != shard_file(r, world) or any(
                    list(s["ranges"][dt]) != list(shard_range(buffers[dt]["numel"], r, world, align)) for dt in buffers):
                raise ValueError(f"shard {r} ({s['file']}) does not hold the range of rank {r} of {world}")
        for dt in buffers:
            int(manifest["optim"][dt]["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {_one_line(e)})") from None
    saved_dt, model_dt = sorted(buffers), sorted(dtypes)
    if saved_dt != model_dt:
        raise CheckpointError(f"{where} holds {'+'.join(saved_dt)} parameters, the model is {'+'.join(model_dt)} "
                              "(another --dtype)")
    missing = [k for k in index if k not in saved]
    if missing:
        raise CheckpointError(f"{where} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                               else "") + " that the model has")
    extra = [k for k in saved if k not in index]
    if extra:
        raise CheckpointError(f"{where} has {extra[0]} that the model lacks")
    for k, (dt, off, n, shape) in index.items():
        if saved[k][3] != tuple(shape):
            raise CheckpointError(f"{where} has {k} of shape {saved[k][3]}, the model expects {tuple(shape)} "
                                  "(a checkpoint of another model configuration)")
        if saved[k][:3] != (dt, off, n):
            raise CheckpointError(f"{where} stores {k} as {saved[k][0]} at offset {saved[k][1]}, the model has "
                                  f"{dt} at {off} (another parameter order or dtype)")


def read_range(step_dir, manifest, dt, dtype, lo, hi, cache, verify=True):
    """{prefix: (hi - lo,) array} of elements [lo, hi) of the saved ``dt`` buffers (positions
    at or past numel stay zero: padding), read from every saved shard that overlaps."""
    out = {prefix: np.zeros(hi - lo, dtype=dtype) for _, prefix in KEYS}
    end = min(hi, manifest["buffers"][dt]["numel"])
    for s in manifest["shards"]:
        slo, shi = s["ranges"][dt]
        a, b = max(lo, slo), min(end, shi)
        if a >= b:
            continue
        fpath = os.path.join(step_dir, s["file"])
        if fpath not in cache:
            if verify:
                verify_file(fpath, s, f"checkpoint {step_dir}")
            cache[fpath] = load_safetensors(fpath)[0]
        for _, prefix in KEYS:
            t = cache[fpath].get(f"{prefix}.{dt}")
            if t is None or t.dtype != dtype or t.shape != (shi - slo,):
                got = "nothing" if t is None else f"{t.dtype} {tuple(t.shape)}"
                raise CheckpointError(f"{fpath}: tensor {prefix}.{dt} is {got}, the manifest needs "
                                      f"{np.dtype(dtype)} ({shi - slo},)")
            out[prefix][a - lo:b - lo] = t[a - slo:b - slo]
    return out


def load_sharded(path, comm, flat, verify=True):
    """Every rank of ``comm``: (shard_state of this rank at the CURRENT world size and flat
    layout, manifest, this rank's per_rank dict when saved at the same world size else None).
    Sizes are always checked, the sha256 of each shard read unless ``verify`` is False (the
    caller verified it with open_checkpoint). A collective: any rank's failure raises the same
    one-line CheckpointError on all."""
    N, r = (1, 0) if comm is None else (comm.size, comm.rank)
    state, manifest, err = None, None, None
    try:
        step_dir, manifest = read_sharded_manifest(path)
        check_layout(manifest, step_dir, flat.index, flat.dtypes)
        _check_sizes(step_dir, manifest["shards"])            # cheap checks of every shard, on every rank
        state, cache = {"params": {}, "optim": {}}, {}
        for dt in flat.dtypes:
            lo, hi = shard_range(flat.numel[dt], r, N, flat.align)
            got = read_range(step_dir, manifest, dt, flat.data[dt].dtype, lo, hi, cache, verify)
            state["params"][dt] = got["params"]                                      # (S',) each
            state["optim"][dt] = {"m": got["exp_avg"], "v": got["exp_avg_sq"],
                                  "step": int(manifest["optim"][dt]["step"])}
    except CheckpointError as e:
        err = _one_line(e)
    except (KeyError, TypeError, ValueError, OSError) as e:      # a manifest valid JSON but not ours
        err = f"checkpoint {path}: malformed ({type(e).__name__}: {_one_line(e)})"
    agree(comm, err)
    per_rank = manifest.get("per_rank") if manifest["world"] == N else None
    return state, manifest, per_rank[r] if isinstance(per_rank, list) and len(per_rank) == N else None


def consolidate(path, with_optim=False, verify=True):
    """The full parameters of a sharded checkpoint, {name: array of its shape} in layout order,
    read on one process (no MPI); with_optim: also ({dt: {"m", "v", "step"}} of the unpadded
    buffers, manifest). Every shard's size and sha256 is checked."""
    step_dir, manifest = read_sharded_manifest(path)
    try:
        index = {k: (p["dtype"], p["offset"], p["numel"], tuple(p["shape"])) for k, p in manifest["params"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {step_dir}: malformed manifest ({type(e).__name__}: {e})") from None
    check_layout(manifest, step_dir, index, list(manifest["buffers"]))
    cache, params, optim = {}, {}, {}
    for dt, b in manifest["buffers"].items():
        full = read_range(step_dir, manifest, dt, _np_dtype(dt), 0, b["numel"], cache, verify)   # (numel,)
        for name, (d, off, n, shape) in index.items():
            if d == dt:
                params[name] = full["params"][off:off + n].reshape(shape)
        optim[dt] = {"m": full["exp_avg"], "v": full["exp_avg_sq"], "step": int(manifest["optim"][dt]["step"])}
    params = {name: params[name] for name in index}
    return (params, optim, manifest) if with_optim else params
