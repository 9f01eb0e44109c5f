"""What a training run may do with its out dir, decided before any work: which checkpoint is
good, which checkpoints a run would replace, what a resumed run takes from its checkpoint's
manifest, and whether the outputs can be written at all.

- Good: a checkpoint is good when the loss of its step is finite and at most ``factor`` times
  the lowest training loss the run has seen (``LossWatch``; factor 0: any finite loss), and
  its validation loss, if it has one, is finite. The verdict is the manifest's ``"good"``;
  retention (engine/checkpoint.py ``prune``) never deletes the newest good checkpoint, so a
  diverged run (a loss of 1e24 is finite) cannot rotate the real ones out with ``--keep``.
- Replace: a run resumed from ``out/step_2`` into ``out`` would overwrite ``out/step_4`` (or
  prune it, or move ``latest`` off it); ``would_replace`` lists such checkpoints (every one of
  the out dir when the run does not continue from inside it) for the caller to refuse
  without an explicit ``--overwrite``.
- Resume: the manifest holds the run's ``config`` {"model", "parallel", "train"};
  ``resume_values`` takes the model config and the training fields that must match from it.
  A flag given explicitly that disagrees is refused with one line naming the field. The
  layout (dp, pp, sp, ZeRO) is not taken: a checkpoint resumes at any layout.
- Writable: ``check_outputs`` probes the out dir (every rank, as every rank writes its shard
  there) and rank 0's files, and every rank raises the same one-line ConfigError.
"""
import math
import os
import shutil

from engine.checkpoint import list_checkpoints, prune
from engine.config import ConfigError, flag
from engine.io import CheckpointError, load_json, unwritable

from .sharded import exchange, read_sharded_manifest

MUST_MATCH = ("dtype", "tokenizer")           # training fields the checkpoint fixes
FROM_RUN = ("data", "val_fraction")           # taken from the run unless given: the same batches


class LossWatch:
    """The running minimum of the training loss and the verdict on a checkpoint's step."""

    def __init__(self, factor, best=math.inf):
        self.factor, self.best = factor, best

    def see(self, loss):
        if math.isfinite(loss):
            self.best = min(self.best, loss)

    def why_not_good(self, rec):
        """None if the step of metrics ``rec`` makes a good checkpoint, else why not (a few words)."""
        loss, val = rec["loss"], rec.get("val_loss", 0.0)
        if not (math.isfinite(loss) and math.isfinite(val)):
            return f"loss {loss}" + (f", val loss {val}" if "val_loss" in rec else "")
        if self.factor and loss > self.factor * self.best:
            return f"loss {loss:.4g} > {self.factor:g} x the run's lowest {self.best:.4g}"
        return None


def _describe(path):
    try:
        loss = load_json(os.path.join(path, "manifest.json"))["metrics"]["loss"]
        return f"{os.path.basename(path)} (loss {loss:.4g})"
    except (CheckpointError, KeyError, TypeError, ValueError):
        return os.path.basename(path)


def would_replace(out_dir, ckpt=None):
    """[(step, path)] of the checkpoints in ``out_dir`` that a run resumed from ``ckpt`` (an
    Opened, or None: a fresh run) would overwrite, prune or hide behind ``latest``: those of
    later steps when ``ckpt`` is one of ``out_dir``'s (or continues it: a state recovered from
    buddy replicas, recover.py, names the out dir of its run), else every one."""
    found = list_checkpoints(out_dir)
    inside = ckpt is not None and os.path.realpath(out_dir) in (os.path.dirname(os.path.realpath(ckpt.path)),
                                                                ckpt.manifest.get("continues"))
    return [(s, p) for s, p in found if s > ckpt.step] if inside else found


def refuse_replacing(out_dir, ckpt, doomed):
    """The one-line ConfigError for ``doomed`` (would_replace's list, non-empty) without --overwrite."""
    if ckpt is not None and doomed and os.path.dirname(os.path.realpath(ckpt.path)) == os.path.realpath(out_dir):
        raise ConfigError(f"resuming from {ckpt.path} (step {ckpt.step}) would overwrite or delete the newer "
                          f"checkpoints in {out_dir}: {', '.join(_describe(p) for _, p in doomed)}; pass "
                          "--overwrite to replace them, or another --out-dir")
    raise ConfigError(f"out_dir {out_dir} already holds checkpoints ({_describe(doomed[-1][1])}, ...); "
                      f"pass --resume {out_dir} to continue, --overwrite to replace them, or another --out-dir")


def replace(out_dir, doomed, path, keep):
    """--overwrite, once the first new checkpoint ``path`` is written (rank 0): delete the
    ``doomed`` ones (would_replace's), then prune to the newest ``keep`` (0: all)."""
    for _, old in doomed:
        if os.path.abspath(old) != os.path.abspath(path):
            shutil.rmtree(old, ignore_errors=True)
    if keep:
        prune(out_dir, keep, protect=path)


def check_resumable(ckpt, tokenizer, max_steps):
    """One-line errors for a checkpoint the run cannot continue: another tokenizer, or finished."""
    if ckpt.manifest.get("tokenizer") != tokenizer.to_json():
        raise CheckpointError(f"checkpoint {ckpt.path} was trained with another tokenizer or vocabulary than the "
                              "data gives")
    if ckpt.step >= max_steps:
        raise ConfigError(f"checkpoint {ckpt.path} is at step {ckpt.step} >= max_steps {max_steps}; raise --max-steps")


def data_state(ckpt):
    """The batcher's state (engine/data.py Batcher.load_state_dict) from a checkpoint's manifest."""
    try:
        state = {"rng": ckpt.manifest["rng"]["data"], "position": int(ckpt.manifest["data"]["position"])}
        if not isinstance(state["rng"], dict):
            raise TypeError(f"rng state is {type(state['rng']).__name__}, not a dict")
        return state
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {ckpt.path}: bad data state in the manifest "
                              f"({type(e).__name__}: {e})") from None


def _same(a, b):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resume_values(values, given, path, model_fields):
    """``values`` ({"model", "train": {field: value}}, as engine/config.py parse_values gives
    them, ``given`` the fields set explicitly) completed from the run config in the manifest of
    the checkpoint at ``path``: every model field of ``model_fields`` and MUST_MATCH are the
    checkpoint's, FROM_RUN too unless given. A given value that disagrees: ConfigError."""
    step_dir, manifest = read_sharded_manifest(path)
    config = manifest.get("config")
    if not (isinstance(config, dict) and all(isinstance(config.get(k), dict) for k in ("model", "train"))):
        raise CheckpointError(f"checkpoint {step_dir}: its manifest holds no run config (model and train)")
    checked = [("model", k) for k in model_fields] + [("train", k) for k in MUST_MATCH]
    for title, name in checked + [("train", k) for k in FROM_RUN]:
        saved = config[title].get(name)
        if saved is None:
            continue
        if name in given.get(title, ()):
            if (title, name) in checked and not _same(values[title][name], saved):
                raise ConfigError(f"{flag(name)} {values[title][name]} disagrees with checkpoint {step_dir}, "
                                  f"trained with {name} {saved}; drop the flag to take the checkpoint's")
        else:
            values[title][name] = saved
    return values


def check_outputs(comm, out_dir, files, kept=()):
    """A collective over ``comm``: every rank probes ``out_dir`` (it writes its shard there),
    rank 0 also ``files`` ({flag name: path}, which it alone writes), and refuses to truncate
    a non-empty file of ``kept`` (the flag names whose file a fresh run would replace: another
    run's metrics). The lowest rank's verdict is raised as the same one-line ConfigError on
    every rank."""
    why = unwritable(out_dir, "dir")
    err = f"--out-dir {out_dir} {why}" if why else None
    if err is None and (comm is None or comm.rank == 0):
        for name, path in files.items():
            why = path and unwritable(path, "file")
            if why:
                err = f"{flag(name)} {path} {why}"
                break
            if path and name in kept and os.path.isfile(path) and os.path.getsize(path):
                err = (f"{flag(name)} {path} already holds another run's lines ({os.path.getsize(path)} bytes); "
                       "pass --overwrite to replace it, --resume to append to it, or another file")
                break
    errors = [e for e in exchange(comm, err) if e]
    if errors:
        raise ConfigError(errors[0])
