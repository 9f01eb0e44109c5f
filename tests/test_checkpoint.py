"""engine/checkpoint.py: layout, latest pointer, verification, pruning, crash leftovers."""
import json
import os

import numpy as np
import pytest

from engine.backend import to_device
from engine.checkpoint import check_shapes, list_checkpoints, load_checkpoint, save_checkpoint
from engine.io import CheckpointError

MODEL = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float64)}
OPTIM = {"float32.exp_avg": np.zeros(6, np.float32)}


def save(out, step, keep=None):
    rng = np.random.default_rng(step)
    rng.random(3)
    model = {k: to_device(v) for k, v in MODEL.items()}      # device arrays (gpu-emulated) go to the host
    return save_checkpoint(str(out), step, model, OPTIM, {"rng": {"data": rng.bit_generator.state}}, keep=keep)


def test_layout_round_trip_and_latest(tmp_path):
    save(tmp_path, 5)
    path = save(tmp_path, 10)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_10", "step_5"]
    assert sorted(os.listdir(path)) == ["manifest.json", "model.safetensors", "optim.safetensors"]
    with open(tmp_path / "latest") as f:
        assert json.load(f) == {"step": 10, "dir": "step_10"}
    ck = load_checkpoint(str(tmp_path))                       # out dir -> follows latest
    assert ck.step == 10 and ck.path == path
    for k, v in MODEL.items():
        assert ck.model[k].dtype == v.dtype and np.array_equal(ck.model[k], v)
    rng = np.random.default_rng()
    rng.bit_generator.state = ck.manifest["rng"]["data"]    # the generator state survives JSON
    ref = np.random.default_rng(10)
    ref.random(3)
    assert rng.random() == ref.random()
    assert load_checkpoint(str(tmp_path / "step_5")).step == 5
    assert ck.manifest["format_version"] == 1 and len(ck.manifest["files"]["model.safetensors"]["sha256"]) == 64


def test_keep_last_k(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [3, 4]


def test_rewriting_a_step_and_stale_leftovers(tmp_path):
    save(tmp_path, 3)
    os.makedirs(tmp_path / ".tmp-step_4-999999999")          # a writer that died mid-save
    save(tmp_path, 3)                                         # resumed from an older step: replaced whole
    assert sorted(os.listdir(tmp_path)) == ["latest", "step_3"]
    assert load_checkpoint(str(tmp_path)).step == 3


@pytest.mark.parametrize("damage, words", [
    ("flip", "sha256"), ("truncate", "bytes"), ("manifest", "corrupt"), ("latest", "corrupt"),
    ("version", "format version"), ("missing", "lacks optim.safetensors"),
])
def test_corruption_is_one_line_error(tmp_path, damage, words):
    step = save(tmp_path, 7)
    model, optim, manifest = (os.path.join(step, n) for n in ("model.safetensors", "optim.safetensors", "manifest.json"))
    if damage == "flip":
        with open(model, "r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x7f")
    elif damage == "truncate":
        os.truncate(optim, 50)
    elif damage == "manifest":
        with open(manifest, "w") as f:
            f.write("{")
    elif damage == "latest":
        (tmp_path / "latest").write_text("not json")
    elif damage == "version":
        with open(manifest) as f:
            m = json.load(f)
        m["format_version"] = 99
        with open(manifest, "w") as f:
            json.dump(m, f)
    elif damage == "missing":
        os.remove(optim)
    with pytest.raises(CheckpointError, match=words) as e:
        load_checkpoint(str(tmp_path))
    assert "\n" not in str(e.value)


def test_check_shapes_names_the_tensor():
    check_shapes(MODEL, MODEL)
    with pytest.raises(CheckpointError, match=r"a.weight of shape \(2, 3\), the model expects \(3, 2\)"):
        check_shapes(MODEL, {"a.weight": np.zeros((3, 2)), "b.bias": np.zeros(4)})
    with pytest.raises(CheckpointError, match="lacks c"):
        check_shapes(MODEL, dict(MODEL, c=np.zeros(1)))
    with pytest.raises(CheckpointError, match="has b.bias that the model lacks"):
        check_shapes(MODEL, {"a.weight": MODEL["a.weight"]})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint("/nonexistent/ckpt")
