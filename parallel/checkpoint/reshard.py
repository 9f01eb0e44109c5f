"""Where each tensor of a sharded checkpoint lives (parallel/checkpoint/sharded.py writes them):
the manifest's flat layouts, their checks against a model, and reading any range of any
layout BY PARAMETER NAME.

A layout is the flat buffer of one model part, sharded over ``world`` ranks (engine/flat.py
``shard_range``): ``world, align, buffers {dt: numel, padded}, params {name: dtype, offset,
numel, shape}, optim {dt: step}, shards [{file, ranges, bytes, sha256}], per_rank``. A
checkpoint saved without pipeline parallelism has one, at the top of its manifest; with
``--pp P`` it has one per stage, ``manifest["pipeline"]["stages"]`` (``stages_of``), whose
shards are named ``stage-<s>-of-<P>-shard-<r>-of-<N>.safetensors``:

    stage 0 buffer  [ wte | wpe | h.0 | h.1 | pad ]    stage 1 buffer  [ wte | h.2 | h.3 | ln_f | pad ]
    one process     [ wte | wpe | h.0 | h.1 | h.2 | h.3 | ln_f | pad ]

``saved_index`` maps every name to the first layout that holds it (wte: stage 0; the last
stage's copy is equal), and ``read_params`` fills any range [lo, hi) of a NEW layout (another
pp, dp, ZeRO stage or parameter order) parameter by parameter, reading each from the shards
that hold it; runs contiguous in both layouts are read at once, so at the saved layout it is
one read per stage, as a plain range read (``read_range``).
"""
import os

import numpy as np

from engine.backend import bfloat16
from engine.checkpoint import verify_file
from engine.flat import dtype_name, padded_size, shard_range
from engine.io import CheckpointError, load_safetensors, one_line

KEYS = (("params", "params"), ("m", "exp_avg"), ("v", "exp_avg_sq"))   # shard_state key, tensor prefix


def _np_dtype(name):
    return np.dtype(bfloat16()) if name == "bfloat16" else np.dtype(name)


def shard_file(rank, world, stage=None, tp=None):
    """A shard's file name; ``stage`` (s, P): pipeline stage s of P's; ``tp`` (t, T): tensor-
    parallel rank t of T's."""
    base = f"shard-{rank}-of-{world}.safetensors"
    if tp is not None:
        base = f"tp-{tp[0]}-of-{tp[1]}-{base}"
    return base if stage is None else f"stage-{stage[0]}-of-{stage[1]}-{base}"


def view_key(view):
    """((s, P) or None, (t, T) or None) of a layout: which stage and tensor-parallel rank saved it."""
    tp = view.get("tp")
    return (tuple(view["stage"]) if "stage" in view else None,
            (int(tp["rank"]), int(tp["size"])) if tp else None)


def stages_of(manifest):
    """The flat layouts of a manifest, one per pipeline stage: [manifest] when saved without
    pipeline parallelism, else manifest["pipeline"]["stages"] (each with the LAYOUT keys and
    "stage": [s, P])."""
    pipe = manifest.get("pipeline")
    return [manifest] if pipe is None else pipe["stages"]


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


def _check_structure(view, step_dir):
    """A stage layout's buffers, shards and ranges consistent with its world and align
    (ValueError / KeyError / TypeError on a malformed one); returns its params index."""
    world, align, buffers, shards = view["world"], view["align"], view["buffers"], view["shards"]
    stage, tp = view_key(view)
    for dt, b in buffers.items():
        if b["padded"] != padded_size(b["numel"], world, align):
            raise ValueError(f"{dt} buffer of {b['numel']} elements cannot be padded to {b['padded']}")
    if len(shards) != world:
        raise ValueError(f"{len(shards)} shards recorded for a world of {world}")
    for r, s in enumerate(shards):
        if s["file"] != shard_file(r, world, stage, tp) or any(
                list(s["ranges"][dt]) != list(shard_range(buffers[dt]["numel"], r, world, align)) for dt in buffers):
            raise ValueError(f"shard {r} ({s['file']}) does not hold the range of rank {r} of {world}")
    for dt in buffers:
        int(view["optim"][dt]["step"])
    return {k: (p["dtype"], p["offset"], p["numel"], tuple(p["shape"])) for k, p in view["params"].items()}


def saved_index(manifest, step_dir):
    """{name: (dtype, offset, numel, shape, view, parts)} of every saved parameter, each from
    the first layout (view index) that holds it (one-line CheckpointError if the manifest is
    malformed). A parameter that tensor parallelism sliced has offset, numel and view None,
    its FULL shape, and parts: [(view, offset, numel, local shape, slice)] of every tp rank
    of the first stage that holds it, slice = {"shape", "axis", "ranges"}: the local tensor
    along ``axis`` is the full one's rows [s, e) for each range, in order (then zero padding)."""
    try:
        saved, parts, first = {}, {}, {}
        views = stages_of(manifest)
        for si, view in enumerate(views):
            stage = view_key(view)[0]
            slices = (view.get("tp") or {}).get("slices", {})
            for k, v in _check_structure(view, step_dir).items():
                saved.setdefault(k, None)                     # the order names are first seen in
                if k not in slices:
                    saved[k] = saved[k] or v + (si, None)
                elif first.setdefault(k, stage) == stage:
                    parts.setdefault(k, []).append((si, v[1], v[2], v[3], slices[k]))
        for k, ps in parts.items():
            spec = ps[0][4]
            full = tuple(spec["shape"])
            if sum(e - s for p in ps for s, e in p[4]["ranges"]) != full[spec["axis"]]:
                raise ValueError(f"the tensor-parallel slices of {k} do not cover its {full[spec['axis']]} rows")
            saved[k] = (views[ps[0][0]]["params"][k]["dtype"], None, None, full, None, ps)
        steps = [{dt: int(o["step"]) for dt, o in v["optim"].items()} for v in views]
        if any(st != steps[0] for st in steps):
            raise ValueError(f"optimizer step counts differ between stages: {steps}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        where = f"checkpoint {step_dir}"
        raise CheckpointError(f"{where}: malformed manifest ({type(e).__name__}: {one_line(e)})") from None
    return saved


def check_layout(manifest, step_dir, index, dtypes, partial=False, slices=None):
    """One-line CheckpointError unless the checkpoint holds exactly the parameters of
    ``index`` ({name: (dtype, offset, numel, shape)}, FlatParameters.index) in ``dtypes``,
    with their names, dtypes and shapes (``partial``: at least them, e.g. one pipeline
    stage's; ``slices``: {name: slice} of the ones tensor parallelism cut, compared by their
    full shape). Offsets may differ: parameters are read by name."""
    slices = slices or {}
    where = f"checkpoint {step_dir}"
    saved = saved_index(manifest, step_dir)
    saved_dt, model_dt = sorted({v[0] for v in saved.values()}), sorted(dtypes)
    if saved_dt != model_dt and not (partial and set(model_dt) <= set(saved_dt)):
        raise CheckpointError(f"{where} holds {'+'.join(saved_dt)} parameters, the model is {'+'.join(model_dt)} "
                              "(another --dtype)")
    missing = [k for k in index if k not in saved]
    if missing:
        raise CheckpointError(f"{where} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                                                               else "") + " that the model has")
    extra = [k for k in saved if k not in index]
    if extra and not partial:
        raise CheckpointError(f"{where} has {extra[0]} that the model lacks")
    for k, (dt, off, n, shape) in index.items():
        shape = tuple(slices[k]["shape"]) if k in slices else tuple(shape)
        if saved[k][3] != tuple(shape):
            raise CheckpointError(f"{where} has {k} of shape {saved[k][3]}, the model expects {tuple(shape)} "
                                  "(a checkpoint of another model configuration)")
        if saved[k][0] != dt:
            raise CheckpointError(f"{where} stores {k} as {saved[k][0]}, the model has {dt} (another --dtype)")


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


def _along(a, axis):
    """a with ``axis`` moved first (a view), so slices along it are a[s:e]."""
    return np.moveaxis(a, axis, 0)


def _full(step_dir, views, saved, name, dtype, cache, verify):
    """{prefix: full array} of a saved parameter, its tensor-parallel parts put together."""
    key = ("full", name)
    if key not in cache:
        dt, off, n, shape, vi, parts = saved[name]
        if parts is None:
            got = read_range(step_dir, views[vi], dt, dtype, off, off + n, cache, verify)
            cache[key] = {p: a.reshape(shape) for p, a in got.items()}
        else:
            cache[key] = {p: np.zeros(shape, dtype=dtype) for _, p in KEYS}
            for vi, off, n, local, spec in parts:
                got = read_range(step_dir, views[vi], dt, dtype, off, off + n, cache, verify)
                for p, a in got.items():
                    src, dst, i = _along(a.reshape(local), spec["axis"]), _along(cache[key][p], spec["axis"]), 0
                    for s, e in spec["ranges"]:
                        dst[s:e] = src[i:i + e - s]
                        i += e - s
    return cache[key]


def _cut(full, spec, local):
    """This layout's slice (shape ``local``) of a full parameter: its ranges along the axis, then
    zero padding (a vocabulary padded to a multiple of tp)."""
    if spec is None:
        return full.reshape(-1)
    out = np.zeros(local, dtype=full.dtype)
    dst, src, i = _along(out, spec["axis"]), _along(full, spec["axis"]), 0
    for s, e in spec["ranges"]:
        dst[i:i + e - s] = src[s:e]
        i += e - s
    return out.reshape(-1)


def read_params(step_dir, manifest, saved, index, dt, dtype, lo, hi, cache, verify=True, slices=None):
    """{prefix: (hi - lo,) array}: elements [lo, hi) of a ``dt`` flat buffer of layout ``index``
    (FlatParameters.index), each parameter's part read BY NAME from where ``saved``
    (saved_index) says it was saved. Runs of parameters contiguous in both layouts are read
    at once: at the saved layout, one read_range per stage. A parameter tensor parallelism
    cut, when saved or now (``slices``: {name: slice} of this layout), is put together whole
    and cut again. Padding stays zero."""
    out = {prefix: np.zeros(hi - lo, dtype=dtype) for _, prefix in KEYS}
    slices = slices or {}
    views, runs = stages_of(manifest), []                     # [stage, saved start, dst start, length]
    for name, (d, off, n, shape) in sorted(index.items(), key=lambda kv: kv[1][1]):
        a, b = max(lo, off), min(hi, off + n)
        if d != dt or a >= b:
            continue
        if saved[name][5] is not None or name in slices:       # tensor-parallel: whole, then this slice
            full = _full(step_dir, views, saved, name, dtype, cache, verify)
            for _, prefix in KEYS:
                out[prefix][a - lo:b - lo] = _cut(full[prefix], slices.get(name), shape)[a - off:b - off]
            continue
        src = saved[name][1] + (a - off)
        run = runs[-1] if runs else None
        if run and run[0] == saved[name][4] and run[1] + run[3] == src and run[2] + run[3] == a - lo:
            run[3] += b - a
        else:
            runs.append([saved[name][4], src, a - lo, b - a])
    for si, src, dst, n in runs:
        got = read_range(step_dir, views[si], dt, dtype, src, src + n, cache, verify)
        for _, prefix in KEYS:
            out[prefix][dst:dst + n] = got[prefix]
    return out
