"""Training checkpoints: safetensors files plus a JSON manifest, written atomically.

Layout of an output directory::

    out/
      latest                 {"step": 200, "dir": "step_200"}   (replaced atomically)
      step_100/
        model.safetensors    parameters by name (HF GPT-2 names)
        optim.safetensors    optimizer state (AdamW m and v) by name
        manifest.json        format version, step, configs, tokenizer, RNG states, data
                             position and the sha256 and size of each file above
      step_200/ ...

A checkpoint is first written into ``out/.tmp-step_<N>-<pid>/``; every file is fsynced,
the directory is renamed to ``step_<N>`` (atomic on POSIX) and only then does ``latest``
move to it. A crash at any moment leaves ``latest`` pointing at a complete, verified
checkpoint. Nothing is pickled: tensors are safetensors (engine/io.py), the rest JSON.

The directory protocol (``begin_write`` -> write and fsync files -> ``commit``), the
``latest`` pointer (``resolve``), pruning and file verification (``file_info``,
``verify_file``) are shared with the sharded, multi-rank checkpoints of
parallel/checkpoint/sharded.py, which only add who writes which file.

``load_checkpoint`` verifies the format version, every file's size and sha256, and (via
``check_shapes``) the tensor names and shapes against the model, raising engine.io's
``CheckpointError`` with one line that names the checkpoint and the problem.
"""
import json
import os
import re
import shutil
from dataclasses import dataclass

import numpy as np

from .io import CheckpointError, atomic_write_json, fsync_dir, load_safetensors, save_safetensors, sha256_file

FORMAT = "mpi-transformer-engine/checkpoint"
FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class Checkpoint:
    path: str          # the step directory
    manifest: dict
    model: dict        # name -> np.ndarray
    optim: dict        # name -> np.ndarray

    @property
    def step(self):
        return self.manifest["step"]


def list_checkpoints(out_dir):
    """[(step, path)] of the complete step directories in ``out_dir``, oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for name in os.listdir(out_dir):
        m = _STEP_DIR.match(name)
        if m and os.path.isfile(os.path.join(out_dir, name, "manifest.json")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def save_checkpoint(out_dir, step, model_state, optim_state, manifest, keep=None):
    """Write ``out_dir/step_<step>`` atomically, point ``latest`` at it and keep the newest
    ``keep`` step directories (all when None). Arrays may live on the device; they are
    copied to the host. Returns the step directory."""
    tmp = begin_write(out_dir, step)
    files = {}
    for fname, tensors in (("model.safetensors", model_state), ("optim.safetensors", optim_state)):
        fpath = os.path.join(tmp, fname)
        save_safetensors(fpath, {k: _host(v) for k, v in tensors.items()}, metadata={"format": FORMAT})
        files[fname] = file_info(fpath)
    manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION, step=step, files=files)
    atomic_write_json(os.path.join(tmp, "manifest.json"), manifest)
    return commit(out_dir, tmp, step, keep)


def begin_write(out_dir, step, pid=None):
    """Make (empty) the temporary directory ``out_dir/.tmp-step_<step>-<pid>`` a checkpoint is
    written into, after deleting the leftovers of writers that died. Returns its path."""
    pid = os.getpid() if pid is None else pid
    os.makedirs(out_dir, exist_ok=True)
    _remove_stale(out_dir)
    tmp = os.path.join(out_dir, f".tmp-step_{step}-{pid}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit(out_dir, tmp, step, keep=None):
    """Publish a fully written (every file fsynced) temporary directory: fsync it, rename it
    to ``step_<step>`` (atomic on POSIX; an existing one is replaced whole), move ``latest``
    and prune to the newest ``keep`` (the newest good one always stays). Returns the step directory."""
    fsync_dir(tmp)
    name = f"step_{step}"
    final = os.path.join(out_dir, name)
    old = None
    if os.path.exists(final):                  # rewriting a step (resumed from an older one)
        old = os.path.join(out_dir, f".old-{name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    atomic_write_json(os.path.join(out_dir, "latest"), {"step": step, "dir": name})
    if old:
        shutil.rmtree(old, ignore_errors=True)
    if keep is not None:
        prune(out_dir, keep, protect=final)
    return final


def file_info(fpath):
    """{"sha256", "bytes"} of a written file, as manifests record it."""
    return {"sha256": sha256_file(fpath), "bytes": os.path.getsize(fpath)}


def verify_file(fpath, info, what):
    """One-line CheckpointError unless ``fpath`` exists with the size and sha256 of ``info``
    (a manifest's record); ``what`` names the checkpoint in the message."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{what}: the manifest records no size and checksum for {os.path.basename(fpath)}")
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{what} lacks {os.path.basename(fpath)}")
    size = os.path.getsize(fpath)
    if size != info.get("bytes"):
        raise CheckpointError(f"{fpath} is {size} bytes, the manifest says {info.get('bytes')} (truncated or corrupt)")
    if sha256_file(fpath) != info.get("sha256"):
        raise CheckpointError(f"{fpath} fails its sha256 check (corrupt or modified)")


def _remove_stale(out_dir):
    """Delete the .tmp-/.old- directories left by writers that died (their pid is gone)."""
    for name in os.listdir(out_dir):
        m = re.match(r"^\.(tmp|old)-step_\d+-(\d+)$", name)
        if not m or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
        except OSError:
            pass


def is_good(step_dir):
    """A checkpoint's verdict on itself: its manifest's "good" (train.py records whether its
    loss was finite and had not diverged); True for a manifest without the field, False for
    one that cannot be read."""
    try:
        with open(os.path.join(step_dir, "manifest.json")) as f:
            return json.load(f).get("good", True) is not False
    except (OSError, ValueError, AttributeError):
        return False


def prune(out_dir, keep, protect=None):
    """Delete all but the newest ``keep`` step directories, never ``protect`` and never the
    newest good one (``is_good``): a run whose loss diverged keeps the checkpoint to go back to."""
    ckpts = list_checkpoints(out_dir)
    good = next((p for _, p in reversed(ckpts) if is_good(p)), None)
    spared = {os.path.abspath(p) for p in (protect, good) if p is not None}
    for _, path in ckpts[:max(len(ckpts) - keep, 0)]:
        if os.path.abspath(path) not in spared:
            shutil.rmtree(path, ignore_errors=True)


def resolve(path):
    """The step directory that ``path`` names: itself, or the target of its ``latest``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isfile(os.path.join(path, "manifest.json")):
        return path
    pointer = os.path.join(path, "latest")
    if not os.path.isfile(pointer):
        raise CheckpointError(f"{path} holds no checkpoint (neither manifest.json nor a latest pointer)")
    try:
        with open(pointer) as f:
            target = json.load(f)["dir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(target, str) or not _STEP_DIR.match(target):
        raise CheckpointError(f"{pointer} names {target!r}, not a step_<N> directory")
    step_dir = os.path.join(path, target)
    if not os.path.isfile(os.path.join(step_dir, "manifest.json")):
        raise CheckpointError(f"{pointer} points at {step_dir}, which holds no manifest.json")
    return step_dir


def read_manifest(step_dir, fmt=FORMAT, version=FORMAT_VERSION):
    """The manifest of a step directory, checked to be of format ``fmt`` and ``version``."""
    path = os.path.join(step_dir, "manifest.json")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint manifest {path} is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path} is not a {fmt} manifest" + (f" (it is {got})" if got else ""))
    if manifest.get("format_version") != version:
        raise CheckpointError(f"{path} has format version {manifest.get('format_version')}, "
                              f"this code reads version {version}")
    return manifest


def load_checkpoint(path, verify=True):
    """Load the checkpoint at ``path`` (an out dir: follows ``latest``; or a step dir),
    checking every file's size and sha256 against the manifest."""
    step_dir = resolve(path)
    manifest = read_manifest(step_dir)
    arrays = {}
    for fname in ("model.safetensors", "optim.safetensors"):
        fpath = os.path.join(step_dir, fname)
        info = manifest.get("files", {}).get(fname)
        if info is None or not os.path.isfile(fpath):
            raise CheckpointError(f"checkpoint {step_dir} lacks {fname}")
        if verify:
            verify_file(fpath, info, f"checkpoint {step_dir}")
        arrays[fname], _ = load_safetensors(fpath)
    return Checkpoint(step_dir, manifest, arrays["model.safetensors"], arrays["optim.safetensors"])


def check_shapes(saved, expected, what="checkpoint"):
    """One-line CheckpointError unless ``saved`` has exactly the names and shapes of
    ``expected`` (both dicts name -> array)."""
    missing = [k for k in expected if k not in saved]
    if missing:
        raise CheckpointError(f"{what} lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + " that the model has")
    extra = [k for k in saved if k not in expected]
    if extra:
        raise CheckpointError(f"{what} has {extra[0]} that the model lacks")
    for k, a in expected.items():
        if tuple(saved[k].shape) != tuple(a.shape):
            raise CheckpointError(f"{what} has {k} of shape {tuple(saved[k].shape)}, the model expects "
                                  f"{tuple(a.shape)} (a checkpoint of another model configuration)")


def _host(a):
    from .backend import to_numpy
    return np.ascontiguousarray(to_numpy(a))
