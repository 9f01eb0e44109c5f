"""Bad input and failing outputs of train.py, table-driven: each case's argv, exit code and one
line (a substring), and a hash of the watched directories (every file's path and content)
before and after: nothing may change. The one-rank cases loop inside this process
(train.main(argv), tests/mpi_workers/bad_inputs.py); the cases where ranks matter (one
verdict on every rank) loop inside one mpiexec launch. Also: a checkpoint save failing
mid-run on one rank (full disk, read-only out dir: injected, as root ignores permission
bits), a diverged but finite loss, resuming from the manifest's config, refusing to replace
newer checkpoints, and the data's notes."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from mpi_util import WORKERS, describe, run_mpi

sys.path.insert(0, WORKERS)
from bad_inputs import run_cases, run_one, tree_hash  # noqa: E402

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--mem-trace-interval", "1000"]


@pytest.fixture(scope="module")
def out(tmp_path_factory, corpus):
    """A run of 4 steps with checkpoints step_2 and step_4 (read only: tests copy it)."""
    d = tmp_path_factory.mktemp("trained") / "out"
    rc, stdout, lines = run_one(["--data", corpus, *TINY, "--max-steps", "4", "--ckpt-interval", "2",
                                 "--keep", "0", "--eval-interval", "2", "--out-dir", str(d)])
    assert rc == 0, (stdout, lines)
    return str(d)


@pytest.fixture(scope="module")
def read_only(tmp_path_factory, out):
    """A read-only tmpfs holding a copy of ``out`` at ro/out, or None where mount is not allowed."""
    ro = tmp_path_factory.mktemp("ro")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(ro)], capture_output=True).returncode:
        yield None
        return
    try:
        shutil.copytree(out, ro / "out")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        yield str(ro)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def corrupt(src, dst, how):
    shutil.copytree(src, dst)
    step = os.path.join(dst, "step_4")
    shard = os.path.join(step, "shard-0-of-1.safetensors")
    if how == "flip":
        with open(shard, "r+b") as f:
            f.seek(-3, 2)
            b = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([b[0] ^ 0xFF]))
    elif how == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(100)
    else:
        with open(os.path.join(step, "manifest.json"), "w") as f:
            f.write('{"step": 3, ')
    return dst


# name: (extra argv, exit code, words of the one line). {tmp}: this test's directory (watched
# whole), {out}: the trained run (watched), {file}: a regular file, {ro}: a read-only tmpfs.
CASES = {
    # flags and TOML
    "unknown flag": (["--learning-rate", "1"], 2, "unrecognized"),
    "bad choice": (["--dtype", "float16"], 2, "invalid choice"),
    "zero batch": (["--batch-size", "0"], 2, "batch_size must be positive"),
    "negative lr": (["--lr", "-1"], 2, "lr must be"),
    "n_embd % n_head": (["--n-embd", "30", "--n-head", "4"], 2, "divisible"),
    "zero layers": (["--n-layer", "0"], 2, "n_layer"),
    "negative good factor": (["--good-factor", "-1"], 2, "good_factor must be >= 0"),
    "unknown toml key": (["--config", "{tmp}/unknown.toml"], 2, "not a known setting"),
    "toml wrong type": (["--config", "{tmp}/type.toml"], 2, "must be float"),
    "bad toml": (["--config", "{tmp}/bad.toml"], 2, "bad.toml"),
    # data
    "missing data": (["--data", "{tmp}/nope.txt"], 2, "does not exist"),
    "empty data": (["--data", "{tmp}/empty.txt"], 2, "empty"),
    "binary data": (["--data", "{tmp}/bin.txt"], 2, "binary"),
    "invalid utf-8": (["--data", "{tmp}/latin1.txt"], 2, "UTF-8"),
    "shorter than a block": (["--data", "{tmp}/short.txt"], 2, "too short"),
    # layouts
    "pipeline layout": (["--pp", "2", "--n-layer", "1"], 2, "pp=2 stages need at least 2 layers"),
    "sequence layout": (["--sp", "2", "--block-size", "30"], 2, "not divisible into 2 x sp = 4 chunks"),
    "dp without the ranks": (["--dp", "2"], 2, "needs dp*pp*sp*tp = 2 ranks, but the job has 1"),
    "batch not divisible by dp": (["--dp", "3"], 2, "batch_size 8 is not divisible by dp 3"),
    # compressed communication (parallel/config.py check_compression)
    "quant weights without zero": (["--quant-weights", "int8"], 2, "--quant-weights int8 needs --zero 1, 2 or 3"),
    "bf16 without zero": (["--comm-dtype", "bf16"], 2, "--comm-dtype bf16 needs --zero 1, 2 or 3"),
    "feedback without quant grads": (["--zero", "3", "--error-feedback"], 2, "--error-feedback needs --quant-grads"),
    "quant grads with pp": (["--zero", "1", "--pp", "2", "--quant-grads", "int4"], 2,
                            "--quant-grads int4 with --pp or --tp is not supported"),
    "quant weights with tp": (["--zero", "1", "--tp", "2", "--quant-weights", "int8"], 2,
                              "--quant-weights int8 with --pp or --tp is not supported"),
    "bf16 with nothing left": (["--zero", "3", "--quant-weights", "int8", "--quant-grads", "int4", "--comm-dtype",
                                "bf16"], 2, "leaves nothing to carry as bfloat16"),
    "node size without grads": (["--zero", "3", "--quant-weights", "int8", "--quant-node-size", "2"], 2,
                                "--quant-node-size 2 needs compressed gradients"),
    "node size not dividing": (["--zero", "2", "--quant-grads", "int8", "--quant-node-size", "3"], 2,
                               "--quant-node-size 3 does not divide the 1 ranks"),
    "zero quant block": (["--zero", "2", "--quant-grads", "int8", "--quant-block", "0"], 2, "quant_block must be >= 1"),
    # elastic training (train.py, parallel/checkpoint/replicas.py, collectives/ulfm.py)
    "replicas on one process": (["--replica-every", "5"], 2, "replica_every needs 2 or more ranks"),
    "negative replica interval": (["--replica-every", "-1"], 2, "replica_every must be >= 0"),
    "shrink without ulfm": (["--on-failure", "shrink"], 2, "on_failure shrink needs an MPI that can shrink a job"),
    # the Terraformer's layers (models/terraformer.py)
    "lsh chunk": (["--attention", "lsh", "--lsh-chunk", "5"], 2, "block_size (32) must be divisible by lsh_chunk (5)"),
    "lsh odd buckets": (["--attention", "lsh", "--lsh-chunk", "8", "--lsh-buckets", "3"], 2, "must be 1 or even"),
    "lsh buckets do not fit": (["--attention", "lsh", "--lsh-chunk", "8", "--lsh-buckets", "10"], 2,
                               "lsh_buckets (10) does not fit: 4 chunks of 8"),
    "reversible odd split": (["--reversible", "--rev-streams", "split", "--n-embd", "33", "--n-head", "3"], 2,
                             "n_embd (33) is odd: reversible split streams take half"),
    "reversible split heads": (["--reversible", "--rev-streams", "split", "--n-embd", "36", "--n-head", "4"], 2,
                               "split streams of n_embd / 2 = 18 channels: GPTConfig.n_embd (18) must be divisible"),
    "terraformer pp": (["--reversible", "--pp", "2"], 2, "--pp 2 with --reversible is not supported yet"),
    "terraformer sp": (["--attention", "lsh", "--lsh-chunk", "8", "--sp", "2"], 2,
                       "--sp 2 with --attention lsh is not supported yet"),
    "terraformer tp": (["--loss-sparsity", "4", "--tp", "2"], 2, "--tp 2 with --loss-sparsity is not supported yet"),
    # outputs that cannot be written (1)
    "out dir under a file": (["--out-dir", "{file}/out"], 2, "--out-dir {file}/out lies under {file}, which is a file"),
    "out dir is a file": (["--out-dir", "{file}"], 2, "is a file, not a directory"),
    "out dir in /proc": (["--out-dir", "/proc/out"], 2, "--out-dir /proc/out cannot be written"),
    "out dir in /proc/self": (["--out-dir", "/proc/self/a/b"], 2, "no file can be created in /proc/self"),
    "out dir in /sys": (["--out-dir", "/sys/out"], 2, "/sys (Permission denied)"),
    "out dir read-only": (["--out-dir", "{ro}/new"], 2, "Read-only file system"),
    "resume into a read-only dir": (["--resume", "{ro}/out", "--out-dir", "{ro}/out", "--max-steps", "6"], 2,
                                    "Read-only file system"),
    "metrics under a file": (["--metrics", "{file}/m.jsonl"], 2, "--metrics {file}/m.jsonl lies under"),
    "metrics is a directory": (["--metrics", "{tmp}"], 2, "is a directory"),
    "metrics in /proc": (["--metrics", "/proc/m.jsonl"], 2, "--metrics /proc/m.jsonl cannot be written"),
    "metrics read-only": (["--metrics", "{ro}/m.jsonl"], 2, "Read-only file system"),
    "metrics read-only file": (["--metrics", "/proc/self/status"], 2, "cannot be opened for writing"),
    "metrics of another run": (["--metrics", "{tmp}/old.jsonl"], 2, "--metrics {tmp}/old.jsonl already holds another"),
    "trace in a missing dir": (["--trace", "{tmp}/no/t.json"], 2, "--trace {tmp}/no/t.json its directory"),
    "trace under a file": (["--trace", "{file}/t.json"], 2, "lies under"),
    # checkpoints
    "existing checkpoints": (["--out-dir", "{out}"], 2, "already holds checkpoints"),
    "resume replaces newer (2)": (["--resume", "{out}/step_2", "--out-dir", "{out}", "--lr", "0.05"], 2,
                                  "would overwrite or delete the newer checkpoints in {out}: step_4 (loss"),
    "resume missing": (["--resume", "{tmp}/nothing"], 2, "does not exist"),
    "resume other n_embd (4)": (["--resume", "{out}", "--n-embd", "64"], 2,
                                "--n-embd 64 disagrees with checkpoint {out}/step_4, trained with n_embd 32"),
    "resume other dropout (4)": (["--resume", "{out}", "--dropout", "0.1"], 2, "dropout 0.0"),
    "resume other dtype (4)": (["--resume", "{out}", "--dtype", "float64"], 2, "trained with dtype float32"),
    "resume other tokenizer (4)": (["--resume", "{out}", "--tokenizer", "char"], 2, "trained with tokenizer byte"),
    "resume finished": (["--resume", "{out}", "--max-steps", "4"], 2, "raise --max-steps"),
    "resume corrupt file": (["--resume", "{tmp}/flip"], 2, "sha256"),
    "resume truncated file": (["--resume", "{tmp}/truncate"], 2, "bytes"),
    "resume corrupt manifest": (["--resume", "{tmp}/manifest"], 2, "corrupt"),
}
# where ranks matter: one verdict on every rank (rank 0 alone probes --metrics), at once
MPI_CASES = {
    "mpi out dir in /proc": (["--dp", "2", "--out-dir", "/proc/out"], 2, "--out-dir /proc/out cannot be written"),
    "mpi metrics under a file": (["--dp", "2", "--metrics", "{file}/m.jsonl"], 2, "lies under"),
    "mpi resume replaces newer": (["--dp", "2", "--resume", "{out}/step_2", "--out-dir", "{out}"], 2,
                                  "would overwrite or delete the newer checkpoints"),
    "mpi bad layout": (["--dp", "4"], 2, "needs dp*pp*sp*tp = 4 ranks, but the job has 2"),
}
FILES = {"unknown.toml": b"[train]\nlearning_rate = 1e-3\n", "type.toml": b'lr = "fast"\n', "bad.toml": b"lr = = 3\n",
         "empty.txt": b"", "bin.txt": b"\x00\x01\x02" * 1000, "latin1.txt": "caf\xe9 ".encode("latin-1") * 500,
         "short.txt": b"tiny corpus" * 5, "a-file": b"not a directory", "old.jsonl": b'{"step": 1}\n'}


def prepare_cases(table, tmp, out, ro, corpus):
    """([{"name", "argv", "watch"}], {name: (code, words)}, the names skipped: no read-only mount)."""
    for name, content in FILES.items():
        (tmp / name).write_bytes(content)
    for how in ("flip", "truncate", "manifest"):
        corrupt(out, tmp / how, how)
    paths = dict(tmp=str(tmp), out=out, file=str(tmp / "a-file"), ro=ro)
    base = ["--data", corpus, *TINY, "--max-steps", "8", "--out-dir", str(tmp / "fresh"),
            "--metrics", str(tmp / "m.jsonl")]
    cases, expect, skipped = [], {}, []
    for name, (args, code, words) in table.items():
        if ro is None and any("{ro}" in a for a in args):
            skipped.append(name)
            continue
        watch = [str(tmp), out] + ([ro] if ro else [])
        cases.append(dict(name=name, argv=base + [a.format(**paths) for a in args], watch=watch))
        expect[name] = (code, words.format(**paths))
    return cases, expect, skipped


def check(results, expect):
    bad = []
    for r in results:
        code, words = expect[r["name"]]
        lines = r["lines"][0]
        ok = (all(rc == code for rc in r["rcs"]) and len(lines) == 1 and lines[0].startswith("error: ")
              and words in lines[0] and all(ls == lines for ls in r["lines"]) and r["same"]
              and all(s == "" for s in r["stdout"]))
        if not ok:
            bad.append(f"{r['name']}: rcs {r['rcs']} same {r['same']} lines {r['lines']} (want {code}, {words!r})")
    assert not bad, "\n".join(bad)
    assert len(results) == len(expect)


def test_bad_input_table_one_rank(tmp_path, out, read_only, corpus):
    cases, expect, skipped = prepare_cases(CASES, tmp_path, out, read_only, corpus)
    check(run_cases(cases), expect)
    if skipped:
        pytest.skip(f"ran {len(cases)} cases; no read-only tmpfs (mount refused): skipped {skipped}")


def test_bad_input_table_every_rank(tmp_path, out, corpus):
    cases, expect, _ = prepare_cases(MPI_CASES, tmp_path, out, None, corpus)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = run_mpi(2, "bad_inputs.py", tmp_path / "cases.json", timeout=120)
    assert proc.returncode == 0, describe(proc)
    check([json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")], expect)


@pytest.mark.parametrize("mode, rank", [("enospc", 1), ("enospc", 0), ("erofs", 0)])
def test_a_save_failing_mid_run_stops_every_rank_with_one_line(mode, rank, tmp_path, corpus):
    """A full disk on one rank (its shard half written) or a read-only out dir at step 3: every
    rank stops at once (not after the watchdog's timeout), one line names the path and the
    last good checkpoint, and the out dir holds step_1, step_2 and latest only: no temp dir."""
    o = tmp_path / "out"
    proc = run_mpi(2, "train_save_fails.py", 3, rank, mode, "--data", corpus, *TINY, "--dp", "2", "--max-steps", "6",
                   "--ckpt-interval", "1", "--keep", "0", "--out-dir", o, timeout=90,
                   env={"ENGINE_COMM_TIMEOUT": "300"})
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, describe(proc)
    assert ("No space left on device" if mode == "enospc" else "Read-only file system") in errors[0], errors
    assert str(o) in errors[0] and f"(last good checkpoint: {o / 'step_2'})" in errors[0], errors
    assert "Traceback" not in proc.stderr, describe(proc)
    assert sorted(os.listdir(o)) == ["latest", "step_1", "step_2"], os.listdir(o)
    with open(o / "latest") as f:
        assert json.load(f)["dir"] == "step_2"


def test_a_diverged_finite_loss_is_not_good_and_never_rotates_the_last_good_out(tmp_path, corpus, monkeypatch,
                                                                                capsys):
    """From step 4 on the loss is 6.9e24 (finite): those checkpoints are recorded as not good,
    and --keep 2 keeps step_3, the newest good one, besides the newest two."""
    import train
    build = train.build_step

    def diverging(*a, **k):
        step = build(*a, **k)
        fb = step.forward_backward
        step.forward_backward = lambda batches, step=0: 6.9e24 if step >= 4 else fb(batches, step=step)
        return step
    monkeypatch.setattr(train, "build_step", diverging)
    o = tmp_path / "out"
    rc, stdout, lines = run_one(["--data", corpus, *TINY, "--max-steps", "6", "--ckpt-interval", "1", "--keep", "2",
                                 "--out-dir", str(o)])
    assert rc == 0, (stdout, lines)
    assert sorted(os.listdir(o)) == ["latest", "step_3", "step_5", "step_6"]
    good = {s: json.load(open(o / f"step_{s}" / "manifest.json"))["good"] for s in (3, 5, 6)}
    assert good == {3: True, 5: False, 6: False}
    assert "not good: loss 6.9e+24 > 4 x the run's lowest" in stdout and f"last good: {o / 'step_3'}" in stdout
    import sample                                         # sampling from it (latest) says so
    assert sample.main(["--ckpt", str(o), "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"note: checkpoint {o / 'step_6'} is not a good one (loss 6.9e+24") and err.count("\n") == 1


def test_resume_takes_the_model_config_from_the_manifest(tmp_path, out, corpus):
    """--resume DIR without the model flags: the checkpoint's model, dtype and data are used."""
    o = tmp_path / "out"
    shutil.copytree(out, o)
    rc, stdout, lines = run_one(["--resume", str(o), "--out-dir", str(o), "--max-steps", "6", "--ckpt-interval", "2",
                                 "--batch-size", "8", "--eval-iters", "1", "--lr", "1e-2", "--min-lr", "1e-3",
                                 "--warmup", "2"])
    assert rc == 0, (stdout, lines)
    assert f"resumed from {o / 'step_4'} at step 4" in stdout and f"data: {corpus}" in stdout
    saved = json.load(open(o / "step_6" / "manifest.json"))["config"]
    assert saved["model"] == json.load(open(o / "step_4" / "manifest.json"))["config"]["model"]
    assert saved["model"]["n_embd"] == 32 and saved["train"]["data"] == corpus


def test_resume_with_overwrite_replaces_the_newer_checkpoints(tmp_path, out, corpus):
    o = tmp_path / "out"
    shutil.copytree(out, o)
    before = open(o / "step_4" / "shard-0-of-1.safetensors", "rb").read()
    rc, stdout, lines = run_one(["--data", corpus, *TINY, "--resume", str(o / "step_2"), "--out-dir", str(o),
                                 "--lr", "0.05", "--max-steps", "4", "--ckpt-interval", "1", "--keep", "0",
                                 "--overwrite"])
    assert rc == 0, (stdout, lines)
    assert sorted(os.listdir(o)) == ["latest", "step_2", "step_3", "step_4"]
    assert open(o / "step_4" / "shard-0-of-1.safetensors", "rb").read() != before


def test_the_datas_notes_are_printed_at_start_up(tmp_path):
    import numpy as np
    tokens = (np.arange(4000) % 200).astype(np.uint16)
    tokens.tofile(tmp_path / "train.bin")
    tokens[:500].tofile(tmp_path / "val.bin")
    (tmp_path / "meta.json").write_text('{"vocab_size": 256}')
    rc, stdout, lines = run_one(["--data", str(tmp_path / "train.bin"), *TINY, "--max-steps", "1", "--eval-iters", "1",
                                 "--out-dir", str(tmp_path / "out")])
    assert rc == 0, (stdout, lines)
    assert [ln for ln in lines if ln.startswith("note: ")] == [
        f"note: validation split: {tmp_path / 'val.bin'} (500 tokens); val_fraction 0.1 does not apply"]


def test_the_hash_sees_a_change(tmp_path):
    (tmp_path / "a").write_text("1")
    h = tree_hash([str(tmp_path)])
    (tmp_path / "a").write_text("2")
    assert tree_hash([str(tmp_path)]) != h
