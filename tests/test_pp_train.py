"""train.py --pp P --micro-batches M --schedule {gpipe,1f1b,interleaved,zb-h1} computes what one
process computes: every schedule at pp = 2 and pp = 4, at pp = 2 x dp = 2 (ZeRO 0 and 1,
gradient accumulation), and with sequence parallelism at pp = 2 x sp = 2 (ring and Ulysses,
ZeRO 0 and 1, 1f1b, gpipe, zb-h1's B/W split, interleaved) and pp = 2 x sp = 2 x dp = 2 (8
ranks), 5 steps in float64, the logged losses, gradient norms and validation losses within
1e-10 relative of `python train.py` (tests/mpi_workers/pp_train_cli.py runs every 4-rank case
in ONE launch). Pipeline checkpoints (one set of shards per stage) resume at the same layout
bitwise (dropout included) and at other layouts (pp = 2 -> dp = 2, pp x dp -> pp = 4 and -> one
process, one process -> pp = 2 and -> pp x sp, pp x sp -> one process and -> sp = 2) within
1e-10, consolidate to the one-process model; --trace writes a Chrome trace with a row per rank;
bad layouts stop every rank with exit code 2 and the same one line."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from mpi_util import ROOT, TRAIN, assert_bad_input, describe, metrics, run_mpi, train_help

TINY = ["--n-layer", "4", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "5", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0"]
SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
AGAINST = {**{f"pp2-{s}": "ref4" for s in SCHEDULES},
           **{f"pp4-{s}": "ref8" if s == "interleaved" else "ref4" for s in SCHEDULES},
           "pp2dp2-gpipe-trace": "ref4", "pp2dp2-1f1b-z1": "ref4", "pp2dp2-interleaved-z1": "ref4",
           "pp2dp2-zb-h1-z1": "ref4", "pp2dp2-1f1b-ga2": "ref4-ga2",
           "pp2sp2-ring-1f1b": "ref4", "pp2sp2-ulysses-gpipe-z1-ga2": "ref4-ga2",
           "pp2sp2-ring-zb-h1-z1": "ref4", "pp2sp2-ulysses-interleaved": "ref4"}
RESUMED = {"resume-pp2": [3, 4, 5], "resume-pp2-to-dp2": [3, 4, 5], "resume-1-to-pp2": [3, 4, 5],
           "resume-pp2dp2-to-pp4": [3, 4, 5], "resume-pp2dp2-to-1": [5], "resume-1-to-pp2sp2": [3, 4, 5],
           "resume-pp2sp2-to-1": [3, 4, 5], "resume-pp2sp2-to-sp2": [3, 4, 5]}
BAD = {"pp-over-layers": "pp=4 stages need at least 4 layers, the model has n_layer=2",
       "micro-batch-split": "a batch of 4 sequences does not split into 3 equal micro-batches",
       "interleaved-layers": "needs n_layer (4) divisible by pp x virtual_stages = 4 x 2",
       "virtual-not-interleaved": "virtual_stages=2 needs the interleaved schedule",
       "zero2": "--zero 2 with --pp 2 is not supported",
       "pp-sp-block": "--sp 2 --sp-attention ring splits each window of --block-size 14 tokens",
       "micro-batches-pp1": "--micro-batches 2 needs --pp > 1"}
KEYS = ("loss", "grad_norm", "val_loss")


@pytest.fixture(scope="module")
def launched(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("pp")
    proc = run_mpi(4, "pp_train_cli.py", out, corpus, *TINY, timeout=240)
    return out, proc


def rel_err(got, ref, steps):
    return max(abs(got[s][k] - ref[s][k]) / abs(ref[s][k]) for s in steps for k in KEYS if k in ref[s])


def test_every_schedule_alone_and_with_dp_and_sp_matches_one_process(launched):
    out, proc = launched
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    rcs = dict(re.findall(r"^CASE (\S+) rc=(\d+)$", proc.stdout, re.M))
    assert rcs == {t: "0" for t in ["ref4", "ref8", "ref4-ga2", *AGAINST, "pp2-drop", "resume-pp2-drop", *RESUMED]}, \
        describe(proc)
    ref = metrics(out / "ref4.jsonl")
    assert sorted(ref) == [1, 2, 3, 4, 5] and [s for s in ref if "val_loss" in ref[s]] == [2, 4, 5]
    assert ref[5]["loss"] < ref[1]["loss"] - 0.3                               # it trains
    assert metrics(out / "ref4-ga2.jsonl")[5]["loss"] != ref[5]["loss"]          # accumulation differs
    for tag, against in AGAINST.items():
        got, want = metrics(out / f"{tag}.jsonl"), metrics(out / f"{against}.jsonl")
        assert sorted(got) == sorted(want) and all(got[s].keys() == want[s].keys() for s in want), tag
        assert rel_err(got, want, want) < 1e-10, (tag, got, want)


def test_checkpoints_resume_at_the_same_and_other_layouts(launched):
    out, proc = launched
    assert proc.returncode == 0, describe(proc)
    ref = metrics(out / "ref4.jsonl")
    for tag, steps in RESUMED.items():                  # any layout -> any layout, by parameter name
        got = metrics(out / f"{tag}.jsonl")
        assert sorted(got) == steps and rel_err(got, ref, steps) < 1e-10, (tag, got)
    for tag, saved in (("resume-pp2", "pp2-1f1b"), ("resume-pp2-drop", "pp2-drop")):   # same layout: bitwise
        got, full = metrics(out / f"{tag}.jsonl"), metrics(out / f"{saved}.jsonl")
        assert sorted(got) == [3, 4, 5]
        assert all(got[s][k] == full[s][k] for s in got for k in KEYS if k in full[s]), (tag, got, full)
    drop = metrics(out / "pp2-drop.jsonl")
    assert all(drop[s]["loss"] != ref[s]["loss"] for s in ref)                # dropout was on
    for saved in ("pp2dp2-zb-h1-z1", "pp2sp2-ring-1f1b"):     # each stage sharded over its dp (x sp) pair
        step2 = out / saved / "step_2"
        assert sorted(os.listdir(step2)) == ["manifest.json"] + [f"stage-{s}-of-2-shard-{r}-of-2.safetensors"
                                                                 for s in (0, 1) for r in (0, 1)]
        manifest = json.loads((step2 / "manifest.json").read_text())
        stages = manifest["pipeline"]["stages"]
        assert manifest["pipeline"]["pp"] == 2 and [s["stage"] for s in stages] == [[0, 2], [1, 2]]
        assert "transformer.wpe.weight" in stages[0]["params"] and "transformer.ln_f.weight" in stages[1]["params"]
        assert all("transformer.wte.weight" in s["params"] and s["world"] == 2 for s in stages)


def test_pipeline_checkpoint_consolidates_to_the_one_process_model(launched):
    from parallel.checkpoint import consolidate
    out, _ = launched
    want, want_optim, _ = consolidate(str(out / "ref4" / "step_4"), with_optim=True)
    for saved in ("pp2dp2-zb-h1-z1", "pp2sp2-ring-1f1b"):
        params, optim, manifest = consolidate(str(out / saved / "step_4"), with_optim=True)
        assert list(params) == list(want) and manifest["step"] == 4   # the one-process names and order
        for name in want:
            assert params[name].shape == want[name].shape
            np.testing.assert_allclose(params[name], want[name], rtol=1e-10, atol=1e-12, err_msg=f"{saved} {name}")
        for dt in want_optim:
            assert optim[dt]["step"] == want_optim[dt]["step"] == 4
            for k in ("m", "v"):                                      # one process's flat order
                np.testing.assert_allclose(optim[dt][k], want_optim[dt][k], rtol=1e-9, atol=1e-14, err_msg=saved)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(out / "pp2dp2-zb-h1-z1"),
                        "--prompt", "12 squared", "--max-new-tokens", "8"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("12 squared"), r.stderr


def test_trace_has_a_row_per_rank(launched):
    out, proc = launched
    assert proc.returncode == 0, describe(proc)
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {0: "rank 0 (dp 0, pp 0)", 1: "rank 1 (dp 1, pp 0)", 2: "rank 2 (dp 0, pp 1)",
                     3: "rank 3 (dp 1, pp 1)"}
    for tid in range(4):
        mine = [e for e in events if e["ph"] == "X" and e["tid"] == tid]
        cats = {e["cat"] for e in mine}
        assert {"forward", "backward", "dp grad reduce", "optimizer"} <= cats, (tid, cats)
        assert sorted(e["name"] for e in mine if e["cat"] == "forward") == ["F0", "F1"]     # m = pp = 2
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in mine)


def test_bad_layouts_stop_every_rank_with_the_same_line(launched):
    out, proc = launched
    for tag, words in BAD.items():
        m = re.search(rf"^BAD {tag} rcs=(\[.*?\]) lines=(.*)$", proc.stdout, re.M)
        assert m, describe(proc)
        assert json.loads(m.group(1)) == [2, 2, 2, 2], m.group(0)       # every rank: exit code 2
        lines = json.loads(m.group(2))
        assert all(ln == lines[0] for ln in lines) and len(lines[0]) == 1, lines   # the same one line
        assert lines[0][0].startswith("error: ") and words in lines[0][0], lines
        assert not os.path.exists(out / tag)                            # nothing written


def test_pp_sp_and_dp_on_eight_ranks_match_one_process(launched, corpus, tmp_path):
    """pp = 2 x sp = 2 x dp = 2 in a real 8-rank launch of train.py (oversubscribed on a small
    machine: slow, not wrong): Ulysses, ZeRO 1, zb-h1 with 4 micro-batches of 1 sequence of
    T/sp = 8 tokens each."""
    out, _ = launched
    proc = run_mpi(8, TRAIN, "--data", corpus, *TINY, "--pp", "2", "--sp", "2", "--dp", "2", "--zero", "1",
                   "--sp-attention", "ulysses", "--schedule", "zb-h1", "--micro-batches", "4",
                   "--out-dir", tmp_path / "out", "--metrics", tmp_path / "m.jsonl", timeout=120)
    assert proc.returncode == 0, describe(proc)
    assert "8 ranks, dp=2 sp=2 (ulysses attention) pp=2 (zb-h1, 4 micro-batches)" in proc.stdout, proc.stdout
    got, want = metrics(tmp_path / "m.jsonl"), metrics(out / "ref4.jsonl")
    assert sorted(got) == sorted(want) and rel_err(got, want, want) < 1e-10, (got, want)


def test_bad_layout_in_a_real_launch_prints_one_line(corpus, tmp_path):
    proc = run_mpi(2, TRAIN, "--data", corpus, *TINY, "--pp", "2", "--schedule", "interleaved", "--virtual-stages",
                   "3", "--out-dir", tmp_path / "out", timeout=60)
    assert_bad_input(proc, "divisible by pp x virtual_stages = 2 x 3", tmp_path / "out")


def test_help_documents_pp_flags():
    out = train_help()
    assert re.search(r"--pp INT\s+pipeline stages", out), out
    assert "--schedule {gpipe,1f1b,interleaved,zb-h1}" in out and "--micro-batches M" in out, out
    assert "--virtual-stages V" in out and "--trace FILE.json" in out, out
    assert "mpiexec -n 4 python train.py --pp" in out, out
