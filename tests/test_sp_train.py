"""train.py --sp N --sp-attention {ring,ulysses}, alone and with --dp 2 and ZeRO 1-3, computes
what one process computes: 5 steps in float64, the logged losses and validation losses within
1e-10 relative (tests/mpi_workers/sp_train_cli.py runs every case in ONE 4-rank launch), also
after resuming a dp x sp checkpoint at other layouts; a block_size the split cannot divide
stops every rank with exit code 2 and one line. (sp with pp: tests/test_pp_train.py.)"""
import json
import os
import re

from mpi_util import TRAIN, assert_bad_input, describe, losses, run_mpi, train_help

TINY = ["--n-layer", "2", "--n-head", "3", "--n-embd", "24", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "5", "--eval-interval", "2", "--ckpt-interval", "0", "--keep", "0"]
CASES = ["sp2-ring-z0", "sp2-ulysses-z0", "sp2-ring-z3", "sp2-ulysses-z1", "sp4-ring-z0", "sp4-ulysses-z3",
         "dp2sp2-ring-z1", "dp2sp2-ulysses-z3", "dp2sp2-ring-z3", "dp2sp2-ulysses-z2-ga2"]
RESUMED = ["resume-dp2-z1", "resume-sp2-ulysses-z2"]


def rel_err(got, ref):
    return max(abs(a - b) / abs(b) for step in ref for a, b in zip(got[step], ref[step]) if b is not None)


def test_sp_alone_and_with_dp_and_zero_match_one_process(corpus, tmp_path):
    proc = run_mpi(4, "sp_train_cli.py", tmp_path, corpus, *TINY, timeout=180)
    assert proc.returncode == 0 and "DONE" in proc.stdout, describe(proc)
    rcs = dict(re.findall(r"^CASE (\S+) rc=(\d+)$", proc.stdout, re.M))
    assert rcs == {tag: "0" for tag in ["ref", "ref-ga2"] + CASES + RESUMED}, describe(proc)
    ref, ref_ga2 = losses(tmp_path / "ref.jsonl"), losses(tmp_path / "ref-ga2.jsonl")
    assert sorted(ref) == [1, 2, 3, 4, 5] and [s for s in ref if ref[s][1] is not None] == [2, 4, 5]
    assert ref[5][0] < ref[1][0] - 0.5 and ref_ga2[5][0] != ref[5][0]        # it trains; accumulation differs
    for tag in CASES:
        want = ref_ga2 if tag.endswith("ga2") else ref
        got = losses(tmp_path / f"{tag}.jsonl")
        assert sorted(got) == sorted(want), tag
        assert rel_err(got, want) < 1e-10, (tag, got, want)
    for tag in RESUMED:                                # a dp x sp checkpoint resumed at other layouts
        got = losses(tmp_path / f"{tag}.jsonl")
        assert sorted(got) == [3, 4, 5] and rel_err(got, {s: ref[s] for s in got}) < 1e-10, (tag, got, ref)
    for tag, words in (("ring-12", "sequence length 12 is not divisible into 2 x sp = 8 chunks"),
                       ("ulysses-10", "sequence length 10 is not divisible into sp = 4 ranks")):
        m = re.search(rf"^BAD {tag} rcs=(\[.*?\]) lines=(.*)$", proc.stdout, re.M)
        assert m, describe(proc)
        assert json.loads(m.group(1)) == [2, 2, 2, 2], m.group(0)         # every rank stops with exit code 2
        lines = json.loads(m.group(2))
        assert len(lines[0]) == 1 and lines[0][0].startswith("error: --sp 4") and words in lines[0][0], lines
        assert lines[1:] == [[], [], []], lines                              # one line in all, from rank 0
        assert not os.path.exists(tmp_path / tag)                            # nothing written


def test_bad_block_size_exits_2_on_every_rank_with_one_line(corpus, tmp_path):
    proc = run_mpi(4, TRAIN, "--data", corpus, *TINY, "--dp", "2", "--sp", "2", "--block-size", "30",
                   "--out-dir", tmp_path / "out", timeout=60)
    assert_bad_input(proc, "sequence length 30 is not divisible into 2 x sp = 4 chunks", tmp_path / "out")


def test_help_documents_sp_flags():
    out = train_help()
    assert re.search(r"--sp INT\s+sequence-parallel ranks", out), out
    assert "--sp-attention {ring,ulysses}" in out and "mpiexec -n 4 python train.py --sp" in out, out
