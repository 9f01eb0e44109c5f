"""train.py --tp: tensor parallelism end to end (tests/mpi_workers/tp_train_cli.py, one 4-rank
launch). tp 2, and tp 4 with sequence-parallel regions and a padded vocabulary, log one
process's losses, gradient norms and validation losses within 1e-10 in float64 with dropout
on; their checkpoints (each tp rank its slices) consolidate to one process's parameters and
resume at another tp (4 -> 2, 2 -> 1, 1 -> tp2 x dp2 ZeRO 3) equal to the uninterrupted run;
bad tensor-parallel layouts stop every rank with exit code 2 and one line."""
import json
import os
import re

import numpy as np
import pytest

from mpi_util import describe, metrics, run_mpi

TINY = ["--n-layer", "2", "--n-head", "4", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "4", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0", "--dropout", "0.1",
        "--tokenizer", "char"]
KEYS = ("loss", "grad_norm", "val_loss")
RUNS = {"tp2": [1, 2, 3, 4], "tp4-tokens": [1, 2, 3, 4], "resume-tp4-to-tp2": [3, 4], "resume-tp2-to-1": [3, 4],
        "resume-1-to-tp2dp2-z3": [3, 4]}
BAD = {"tp-heads": "n_head (2) must be divisible by tp", "tp-tokens-block": "--tp-token-shards splits each window",
       "tp-tokens-pp": "--tp-token-shards with --sp or --pp is not supported"}


@pytest.fixture(scope="module")
def launched(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    return out, run_mpi(4, "tp_train_cli.py", out, corpus, *TINY, timeout=240)


def test_tp_training_and_resume_equal_one_process(launched):
    out, proc = launched
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    rcs = dict(re.findall(r"^CASE (\S+) rc=(\d+)$", proc.stdout, re.M))
    assert rcs == {t: "0" for t in ["ref", *RUNS]}, describe(proc)
    ref = metrics(out / "ref.jsonl")
    for tag, steps in RUNS.items():
        got = metrics(out / f"{tag}.jsonl")
        assert sorted(got) == steps, tag
        err = max(abs(got[s][k] - ref[s][k]) / abs(ref[s][k]) for s in steps for k in KEYS if k in ref[s])
        assert err < 1e-10, (tag, err)


def test_tp_checkpoints_consolidate_to_one_process(launched):
    from parallel.checkpoint import consolidate
    out, _ = launched
    want, (w_opt, _) = consolidate(str(out / "ref")), consolidate(str(out / "ref"), with_optim=True)[1:]
    for tag in ("tp2", "tp4-tokens"):
        got, g_opt, manifest = consolidate(str(out / tag), with_optim=True)
        assert list(got) == list(want), tag                        # one process's names, in its order
        assert manifest["pipeline"]["tp"] == int(tag[2])
        for n, w in want.items():
            assert got[n].shape == w.shape, (tag, n)
            keep = slice(None) if not n.endswith("c_attn.bias") else np.r_[0:16, 32:48]   # k bias: grad 0
            assert np.allclose(got[n][keep], w[keep], rtol=1e-10, atol=1e-12), (tag, n)
        files = os.listdir(out / tag / "step_4")
        assert sum(f.startswith("tp-") for f in files) == int(tag[2]), files
        assert set(g_opt) == set(w_opt), tag                       # AdamW's moments too, in one process's layout
        for dt, ref in w_opt.items():
            assert g_opt[dt]["step"] == ref["step"], (tag, dt)
            mask, off = np.ones(ref["m"].size, bool), 0            # the flat layout: want's names in order
            for n, w in want.items():
                if n.endswith("c_attn.bias"):                      # its k third (grad 0): the moments are noise
                    mask[off + w.size // 3:off + 2 * w.size // 3] = False
                off += w.size
            assert off == ref["m"].size, (tag, dt, off, ref["m"].size)
            for k in ("m", "v"):
                assert np.allclose(g_opt[dt][k][mask], ref[k][mask], rtol=1e-8, atol=1e-14), (tag, dt, k)


def test_bad_tp_layouts_exit_2_with_one_line(launched):
    out, proc = launched
    for tag, words in BAD.items():
        m = re.search(rf"^BAD {tag} rcs=(\[.*?\]) lines=(.*)$", proc.stdout, re.M)
        assert m, describe(proc)
        assert json.loads(m.group(1)) == [2, 2, 2, 2], m.group(0)
        lines = json.loads(m.group(2))
        assert all(len(ls) == 1 and words in ls[0] and ls[0].startswith("error: ") for ls in lines), lines
        assert not os.path.exists(out / tag)


def test_tp_decoding_gives_one_process_tokens(launched):
    """sample.py --tp T: heads (and their KV cache), MLP units and the vocabulary split over T
    ranks; greedy and seeded sampling give one process's tokens, whatever tp trained it."""
    import subprocess
    import sys
    from mpi_util import ROOT
    out, _ = launched
    args = ["sample.py", "--prompt", "1 squ", "--max-new-tokens", "40"]

    def one(ckpt, *extra):
        return subprocess.run([sys.executable, *args, "--ckpt", str(out / ckpt), *extra], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)
    for ckpt, tp, extra in (("tp4-tokens", 2, ["--temperature", "0"]), ("ref", 4, ["--temperature", "0.9", "--seed", "3"])):
        want = one(ckpt, *extra)
        got = run_mpi(tp, os.path.join(ROOT, "sample.py"), *args[1:], "--ckpt", out / ckpt, "--tp", tp, *extra, timeout=60)
        assert want.returncode == 0 and got.returncode == 0, describe(got)
        assert got.stdout == want.stdout and len(want.stdout) > 40, (got.stdout, want.stdout)
    bad = run_mpi(2, os.path.join(ROOT, "sample.py"), "--ckpt", out / "ref", "--tp", 4, timeout=60)
    assert bad.returncode != 0 and bad.stderr.count("error: --tp 4 needs mpiexec -n 4") == 1, describe(bad)


def test_tp_checkpoint_exports_to_hugging_face_like_one_process(launched, tmp_path):
    """consolidate.py --hf of a tp 4 checkpoint (padded vocabulary, token shards) gives the
    GPT-2 directory one process's checkpoint gives: the same logits."""
    import subprocess
    import sys
    from mpi_util import ROOT
    from models.hf import load_hf
    out, _ = launched
    for tag in ("ref", "tp4-tokens"):
        proc = subprocess.run([sys.executable, "consolidate.py", "--hf", str(out / tag), str(tmp_path / tag)],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
    idx = np.arange(16).reshape(1, 16) % 10
    a, b = (load_hf(str(tmp_path / t))(idx)[0].data for t in ("ref", "tp4-tokens"))
    assert a.dtype == np.float64 and np.allclose(a, b, rtol=1e-10, atol=1e-12)
