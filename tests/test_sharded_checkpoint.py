"""parallel/checkpoint/sharded.py: sharded checkpoints saved at N ranks load at any other N (exactly),
damaged ones are refused on every rank with one line, a rank killed mid-save leaves nothing
half-written, and consolidate.py's output opens in our GPT and in Hugging Face GPT-2.
One launch of 4 ranks (tests/mpi_workers/ckpt_worker.py) runs the resharding cases."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from engine.autograd import no_grad
from engine.backend import to_numpy
from engine.io import CheckpointError, load_safetensors
from mpi_util import ROOT, describe, run_mpi

TRANSFORMERS_REASON = "transformers (with torch) is the interoperability oracle (pip install -e .[test])"
CASES = ["save N=4", "load N=4 -> N=4", "load N=4 -> N=2", "load N=4 -> N=1", "load N=4 -> N=3",
         "load N=4 align 1 -> N=2 align 8", "save N=1", "load N=1 -> N=3", "save N=3 align 4",
         "load N=3 -> N=4", "load N=3 -> N=1", "consolidate at 1 rank", "refuse tampered", "refuse truncated",
         "refuse missing", "refuse manifest", "refuse shape", "refuse depth", "refuse dtype",
         "failed save is absent", "save float32 with config"]


@pytest.fixture(scope="module")
def worked(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    proc = run_mpi(4, "ckpt_worker.py", d, timeout=120)
    return d, proc


def test_reshard_and_refusals_in_one_launch(worked):
    _, proc = worked
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("case ")]
    assert [ln[5:].rsplit(" ", 1)[0] for ln in lines] == CASES, describe(proc)
    assert all(ln.endswith(" ok") for ln in lines), describe(proc)
    assert proc.returncode == 0 and "0 failures" in proc.stdout, describe(proc)


def cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "consolidate.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


def logits(model, idx):
    model.eval()
    with no_grad():
        return model(idx)[0].numpy()


def test_consolidated_file_opens_in_the_single_process_model(worked, tmp_path):
    from models.gpt import GPT, GPTConfig
    from parallel.checkpoint import consolidate
    d, _ = worked
    r = cli(d / "hf", tmp_path / "model.safetensors", "--optim")
    assert r.returncode == 0, r.stderr
    tensors, meta = load_safetensors(str(tmp_path / "model.safetensors"))
    manifest = json.loads(meta["manifest"])
    assert manifest["step"] == 3 and manifest["format"] == "mpi-transformer-engine/consolidated"
    model = GPT(GPTConfig(**manifest["config"]["model"]), rng=1)
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("optim.")})
    params, optim, _ = consolidate(str(d / "hf"), with_optim=True)
    for k, v in model.state_dict().items():
        assert np.array_equal(to_numpy(v), params[k])
    assert np.array_equal(tensors["optim.float32.exp_avg"], optim["float32"]["m"])
    assert optim["float32"]["m"].shape == (sum(p.size for p in params.values()),) and optim["float32"]["step"] == 3


def test_consolidated_hf_directory_opens_in_transformers(worked, tmp_path):
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_REASON)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_REASON)
    from models.gpt import GPT, GPTConfig
    from parallel.checkpoint import consolidate
    d, _ = worked
    r = cli(d / "hf", tmp_path / "gpt2", "--hf")
    assert r.returncode == 0, r.stderr
    params, _, manifest = consolidate(str(d / "hf"), with_optim=True)
    ours = GPT(GPTConfig(**manifest["config"]["model"]), rng=1)
    ours.load_state_dict(params)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2")).eval()
    idx = np.random.default_rng(3).integers(0, 23, (2, 8))
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(logits(ours, idx), hf_logits, rtol=1e-5, atol=1e-5)


def test_consolidate_refuses_bad_input_in_one_line(worked, tmp_path):
    d, _ = worked
    r = cli(d / "bad-tampered", tmp_path / "x.safetensors")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "sha256" in r.stderr, r.stderr
    r = cli(tmp_path / "nowhere", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "does not exist" in r.stderr, r.stderr
    r = cli(d / "ckpts", tmp_path / "gpt2", "--hf")                 # no model config in its manifest
    assert r.returncode == 2 and "model config" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_a_rank_killed_mid_save_leaves_no_half_checkpoint(tmp_path):
    from parallel.checkpoint import consolidate, read_sharded_manifest
    out = tmp_path / "out"
    proc = run_mpi(3, "ckpt_kill.py", out, "kill", timeout=60)
    assert proc.returncode != 0 and "rank 1: shard written, dying" in proc.stdout, describe(proc)
    assert "step 2 published" not in proc.stdout
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == ["latest", "step_1"]
    assert json.loads((out / "latest").read_text())["dir"] == "step_1"
    step_dir, manifest = read_sharded_manifest(str(out))
    assert manifest["step"] == 1 and manifest["world"] == 3
    consolidate(str(out))                                          # whole: every checksum holds
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_sharded_manifest(str(next(out.glob(".tmp-step_2-*"))))  # the dead writer's leftovers
    proc = run_mpi(3, "ckpt_kill.py", out, "again", timeout=60)
    assert proc.returncode == 0, describe(proc)
    assert sorted(os.listdir(out)) == ["latest", "step_1", "step_2"]   # the leftovers are gone
    assert consolidate(str(out))["transformer.wte.weight"].shape == (23, 10)
