"""train.py and sample.py end to end, as subprocesses with tiny configs: training lowers the
loss, save -> resume is bitwise the uninterrupted run, bad input exits 2 with one line and
touches nothing, a NaN loss stops the run naming the step, TOML configs, sampling."""
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
    assert sorted(os.listdir(d / "out")) == ["latest", f"step_{KSTEP}", f"step_{STEPS}"]
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


def _corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    step = os.path.join(dst, f"step_{STEPS}")
    if how == "flip":
        path = os.path.join(step, "shard-0-of-1.safetensors")      # parallel/checkpoint/sharded.py's shard
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) - 3)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "manifest":
        with open(os.path.join(step, "manifest.json"), "w") as f:
            f.write('{"step": 3, ')
    elif how == "truncate":
        path = os.path.join(step, "shard-0-of-1.safetensors")
        with open(path, "r+b") as f:
            f.truncate(100)
    return dst


BAD = {   # name: (extra args, files to make, expected words in the error line)
    "missing data": (["--data", "{tmp}/nope.txt"], {}, "does not exist"),
    "empty data": (["--data", "{tmp}/empty.txt"], {"empty.txt": b""}, "empty"),
    "binary data": (["--data", "{tmp}/bin.txt"], {"bin.txt": b"\x00\x01\x02" * 1000}, "binary"),
    "invalid utf-8": (["--data", "{tmp}/latin1.txt"], {"latin1.txt": "caf\xe9 ".encode("latin-1") * 500}, "UTF-8"),
    "shorter than a block": (["--data", "{tmp}/short.txt"], {"short.txt": b"tiny corpus" * 5}, "too short"),
    "n_embd % n_head": (["--n-embd", "30", "--n-head", "4"], {}, "divisible"),
    "zero layers": (["--n-layer", "0"], {}, "n_layer"),
    "zero batch": (["--batch-size", "0"], {}, "batch_size must be positive"),
    "negative lr": (["--lr", "-1"], {}, "lr must be"),
    "bad dtype": (["--dtype", "float16"], {}, "invalid choice"),
    "unknown flag": (["--learning-rate", "1"], {}, "unrecognized"),
    "unknown toml key": (["--config", "{tmp}/c.toml"], {"c.toml": b"[train]\nlearning_rate = 1e-3\n"},
                         "not a known setting"),
    "toml wrong type": (["--config", "{tmp}/c.toml"], {"c.toml": b'lr = "fast"\n'}, "must be float"),
    "bad toml": (["--config", "{tmp}/c.toml"], {"c.toml": b"lr = = 3\n"}, "c.toml"),
    "pipeline layout": (["--pp", "2", "--n-layer", "1"], {}, "pp=2 stages need at least 2 layers"),
    "sequence layout": (["--sp", "2", "--block-size", "30"], {}, "not divisible into 2 x sp = 4 chunks"),
    "dp without the ranks": (["--dp", "2"], {}, "needs dp*pp*sp*tp = 2 ranks, but the job has 1"),
    "batch not divisible by dp": (["--dp", "3"], {}, "batch_size 8 is not divisible by dp 3"),
    "existing checkpoints": ([], {}, "already holds checkpoints"),
    "resume missing": (["--resume", "{tmp}/nothing"], {}, "does not exist"),
    "resume other shape": (["--resume", "{out}", "--n-embd", "64", "--max-steps", "99"], {}, "shape"),
    "resume other dtype": (["--resume", "{out}", "--dtype", "float64", "--max-steps", "99"], {}, "float32"),
    "resume finished": (["--resume", "{out}"], {}, "raise --max-steps"),
    "resume other tokenizer": (["--resume", "{out}", "--tokenizer", "char", "--max-steps", "99"], {}, "tokenizer"),
    "resume corrupt file": (["--resume", "{corrupt_flip}", "--max-steps", "99"], {}, "sha256"),
    "resume truncated file": (["--resume", "{corrupt_truncate}", "--max-steps", "99"], {}, "bytes"),
    "resume corrupt manifest": (["--resume", "{corrupt_manifest}", "--max-steps", "99"], {}, "corrupt"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line_and_touches_nothing(case, trained, corpus, tmp_path):
    d, _ = trained
    args, files, words = BAD[case]
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    paths = {"tmp": tmp_path, "out": d / "out"}
    for how in ("flip", "truncate", "manifest"):
        if f"{{corrupt_{how}}}" in " ".join(args):
            paths[f"corrupt_{how}"] = _corrupt_copy(d / "out", tmp_path / f"c_{how}", how)
    args = [a.format(**paths) for a in args]
    watched = [d / "out"] + [p for k, p in paths.items() if k.startswith("corrupt")]
    before = [snapshot(w) for w in watched]
    base = ["--data", corpus, *TINY, "--max-steps", STEPS, "--out-dir", d / "out", "--metrics", d / "full.jsonl"]
    r = run("train.py", *base, *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (case, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert r.stdout == ""
    assert [snapshot(w) for w in watched] == before
    assert len(metrics(d / "full.jsonl")) == STEPS


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
