"""train.py end to end with sharded checkpoints (parallel/checkpoint/sharded.py): a rank killed with
SIGKILL right after its step-k checkpoint (tests/mpi_workers/train_killed.py injects the kill),
resumed at the same rank count, reproduces the uninterrupted run's losses bitwise (dropout on:
the masks are counter-based, engine/random.py, so the step alone restores them); resumed at other rank counts and stages
(4 ranks stage 3 -> 2 ranks stage 1 -> 1 process) it matches one process within 1e-10
(float64), as the invariant says."""
import json
import os

from mpi_util import ROOT, describe, run_mpi

TRAIN = os.path.join(ROOT, "train.py")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "6", "--eval-interval", "3", "--keep", "0"]


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def corpus(tmp_path):
    path = tmp_path / "squares.txt"
    path.write_text("".join(f"{i} squared is {i * i}.\n" for i in range(2000)), encoding="utf-8")
    return str(path)


def train(n, tmp_path, name, *args, kill_at=None):
    script = (TRAIN,) if not kill_at else ("train_killed.py", kill_at)
    return run_mpi(n, *script, "--data", corpus(tmp_path), *TINY, "--dp", n, "--out-dir", tmp_path / "out",
                   "--metrics", tmp_path / f"{name}.jsonl", *args, timeout=180)


def killed(proc, step):
    return proc.returncode != 0 and f"killed after the step {step} checkpoint" in proc.stdout


def test_killed_run_resumed_at_the_same_n_is_bitwise_identical(tmp_path):
    args = ["--zero", "2", "--dropout", "0.1", "--ckpt-interval", "3"]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    full = train(2, tmp_path / "a", "full", *args)
    assert full.returncode == 0, describe(full)
    proc = train(2, tmp_path / "b", "run", *args, kill_at=3)
    assert killed(proc, 3), describe(proc)
    out = tmp_path / "b" / "out"
    assert sorted(os.listdir(out)) == ["latest", "step_3"]
    assert sorted(os.listdir(out / "step_3")) == ["manifest.json", "shard-0-of-2.safetensors",
                                                  "shard-1-of-2.safetensors"]
    proc = train(2, tmp_path / "b", "run", *args, "--resume", out)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, describe(proc)
    ref, got = rows(tmp_path / "a" / "full.jsonl"), rows(tmp_path / "b" / "run.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(ref, got):                          # bitwise: JSON floats round-trip exactly
        assert (a["loss"], a["grad_norm"], a.get("val_loss")) == (b["loss"], b["grad_norm"], b.get("val_loss")), a["step"]


def test_resume_across_rank_counts_and_stages_matches_one_process(tmp_path):
    for d in ("ref", "run"):
        (tmp_path / d).mkdir()
    ref = train(1, tmp_path / "ref", "m", "--ckpt-interval", "0")
    assert ref.returncode == 0, describe(ref)
    run, out = tmp_path / "run", tmp_path / "run" / "out"
    proc = train(4, run, "m", "--zero", "3", "--ckpt-interval", "2", kill_at=2)          # 4 ranks, stage 3
    assert killed(proc, 2), describe(proc)
    proc = train(2, run, "m", "--zero", "1", "--ckpt-interval", "2", "--resume", out, kill_at=4)   # 2, stage 1
    assert killed(proc, 4), describe(proc)
    assert "resumed from" in proc.stdout and json.loads((out / "latest").read_text())["step"] == 4
    proc = train(1, run, "m", "--ckpt-interval", "2", "--resume", out)                  # one process
    assert proc.returncode == 0, describe(proc)
    want, got = rows(tmp_path / "ref" / "m.jsonl"), rows(run / "m.jsonl")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(want, got):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-10 * abs(a[key]), (a["step"], key, a[key], b[key])
