"""train.py and sample.py end to end, as subprocesses with tiny configs: training lowers the
loss, save -> resume is bitwise the uninterrupted run, a NaN loss stops the run naming the
step, TOML configs, sampling. Bad input (exit 2, one line, nothing touched): test_bad_input.py."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2"]
STEPS, KSTEP = 24, 12


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def snapshot(directory):
    """{relative path: (sha256, mtime_ns)} of every file under directory."""
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, directory)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """An uninterrupted run of STEPS steps, checkpoints at KSTEP and STEPS, with dropout."""
    d = tmp_path_factory.mktemp("run")
    r = run("train.py", "--data", corpus, *TINY, "--dropout", "0.1", "--max-steps", STEPS, "--eval-interval", 6,
            "--ckpt-interval", KSTEP, "--keep", 0, "--out-dir", d / "out", "--metrics", d / "full.jsonl")
    assert r.returncode == 0, r.stderr
    return d, r


def test_training_lowers_the_loss_and_logs_every_step(trained):
    d, r = trained
    rows = metrics(d / "full.jsonl")
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert {"step", "loss", "lr", "ms_per_step", "tokens_per_s", "mfu", "peak_bytes"} <= row.keys()
        assert row["peak_bytes"] > 0 and 0 < row["mfu"] < 1 and row["tokens_per_s"] > 0
    assert [row["step"] for row in rows if "val_loss" in row] == [6, 12, 18, 24]
    first, last = rows[0]["loss"], sum(row["loss"] for row in rows[-4:]) / 4
    assert first > 5.0 and last < first - 1.5, (first, last)
    assert rows[-1]["val_loss"] < rows[5]["val_loss"]
    step_lines = [line for line in r.stdout.splitlines() if line.startswith("step") and "| loss" in line]
    assert len(step_lines) == STEPS and all("ms" in s and "tok/s" in s and "mfu" in s and "MiB" in s for s in step_lines)
    assert sorted(os.listdir(d / "out")) == ["latest", f"step_{KSTEP}", f"step_{STEPS}"]   # no loss.png:
    assert "done: " in r.stdout and "sample (" not in r.stdout      # ENGINE_RUN_EXTRAS=off (conftest.py)
    with open(d / "out" / "latest") as f:
        assert json.load(f)["step"] == STEPS


def test_resume_is_bitwise_identical(trained, corpus, tmp_path):
    """Interrupt after step KSTEP (copy the out dir back to that state), resume it with
    --resume OUT (follows latest): the losses of the rest equal the uninterrupted run's."""
    from engine.io import atomic_write_json
    d, _ = trained
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    shutil.rmtree(out / f"step_{STEPS}")
    atomic_write_json(str(out / "latest"), {"step": KSTEP, "dir": f"step_{KSTEP}"})
    r = run("train.py", "--data", corpus, *TINY, "--dropout", "0.1", "--max-steps", STEPS, "--eval-interval", 6,
            "--ckpt-interval", KSTEP, "--keep", 0, "--resume", out, "--out-dir", out,
            "--metrics", tmp_path / "resumed.jsonl")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / f'step_{KSTEP}'} at step {KSTEP}" in r.stdout
    full = {row["step"]: row for row in metrics(d / "full.jsonl")}
    resumed = metrics(tmp_path / "resumed.jsonl")
    assert [row["step"] for row in resumed] == list(range(KSTEP + 1, STEPS + 1))
    for row in resumed:
        assert row["loss"] == full[row["step"]]["loss"], row["step"]          # bitwise: JSON floats round-trip
        assert row.get("val_loss") == full[row["step"]].get("val_loss")
    a = snapshot(d / "out" / f"step_{STEPS}")
    b = snapshot(out / f"step_{STEPS}")
    assert a["shard-0-of-1.safetensors"][0] == b["shard-0-of-1.safetensors"][0]   # params, m, v: bitwise


def test_overwrite_replaces_old_checkpoints_after_the_first_new_one(trained, corpus, tmp_path):
    d, _ = trained
    out = tmp_path / "out"
    shutil.copytree(d / "out", out)
    r = run("train.py", "--data", corpus, *TINY, "--max-steps", "2", "--eval-iters", "1", "--out-dir", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["latest", "step_2"]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(corpus, tmp_path):
    from engine.checkpoint import list_checkpoints
    from parallel.checkpoint import consolidate, open_checkpoint
    out = tmp_path / "out"
    r = run("train.py", "--data", corpus, *TINY, "--lr", "1e30", "--min-lr", "0", "--warmup", "0",
            "--max-steps", "8", "--ckpt-interval", "1", "--keep", "0", "--out-dir", out)
    assert r.returncode == 1, r.stderr
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")][-1]
    bad_step = int(line.split(" at step ")[1].split(";")[0])
    assert 2 <= bad_step <= 8 and ("nan" in line or "inf" in line)
    consolidate(str(out))                                 # verifies every checksum
    ckpt = open_checkpoint(str(out))
    assert ckpt.step == bad_step - 1 and f"step_{bad_step - 1}" in line
    assert [s for s, _ in list_checkpoints(str(out))] == list(range(1, bad_step))


def test_toml_config_and_flag_override(corpus, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{corpus}"\nseed = 5\n[model]\nn_layer = 1\nn_head = 2\nn_embd = 16\nblock_size = 16\n'
                   f'[train]\nbatch_size = 4\nmax_steps = 2\neval_iters = 1\nout-dir = "{tmp_path / "out"}"\n'
                   f'metrics = "{tmp_path / "m.jsonl"}"\nbetas = [0.8, 0.9]\nckpt_interval = 1\nkeep = 2\n')
    r = run("train.py", "--config", cfg, "--max-steps", "3")
    assert r.returncode == 0, r.stderr
    assert [row["step"] for row in metrics(tmp_path / "m.jsonl")] == [1, 2, 3]
    with open(tmp_path / "out" / "step_3" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["config"]["model"]["n_embd"] == 16 and manifest["config"]["train"]["seed"] == 5
    assert manifest["config"]["train"]["betas"] == [0.8, 0.9] and manifest["step"] == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["latest", "step_2", "step_3"]      # keep = 2


def test_sample_prints_text_from_a_checkpoint(trained):
    d, _ = trained
    r = run("sample.py", "--ckpt", d / "out", "--prompt", "12 squared", "--max-new-tokens", "30", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("12 squared") and len(r.stdout) > len("12 squared") + 10
    again = run("sample.py", "--ckpt", d / "out", "--prompt", "12 squared", "--max-new-tokens", "30", "--seed", "1")
    assert again.stdout == r.stdout
    bad = run("sample.py", "--ckpt", d / "nothing")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")


def test_sample_from_a_hugging_face_directory(tmp_path):
    import numpy as np
    from models.gpt import GPT, GPTConfig
    from models.hf import save_hf
    from test_bpe import MERGES, make_vocab, write_files
    vocab = make_vocab()
    save_hf(GPT(GPTConfig(block_size=16, vocab_size=len(vocab), n_layer=1, n_head=2, n_embd=16),
                np.random.default_rng(0)), str(tmp_path))
    write_files(tmp_path, vocab)
    r = run("sample.py", "--hf", tmp_path, "--prompt", " the cat", "--max-new-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" the cat") and len(r.stdout) > len(" the cat")
    assert len(MERGES) == len(vocab) - 256
