"""train.py under mpiexec: --dp N --zero S computes what one process computes (float64, the
logged losses, through a consolidated checkpoint resumed at another N and stage), and bad
layouts stop every rank with exit code 2 and one line from rank 0."""

import os

import pytest

from mpi_util import TRAIN, assert_bad_input, describe, losses, run_mpi

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2", "--dtype", "float64",
        "--max-steps", "4", "--eval-interval", "2", "--ckpt-interval", "2", "--keep", "0"]


def close(a, b, tol=1e-10):
    return all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b) if y is not None)


def test_dp_and_every_stage_match_one_process_and_resume_across_layouts(corpus, tmp_path):
    one = run_mpi(1, TRAIN, "--data", corpus, *TINY, "--out-dir", tmp_path / "one", "--metrics", tmp_path / "one.jsonl")
    assert one.returncode == 0, describe(one)
    ref = losses(tmp_path / "one.jsonl")
    for n, zero in ((2, 3), (4, 1)):
        tag = f"n{n}z{zero}"
        proc = run_mpi(n, TRAIN, "--data", corpus, *TINY, "--dp", n, "--zero", zero, "--grad-accum", "1",
                       "--out-dir", tmp_path / tag, "--metrics", tmp_path / f"{tag}.jsonl")
        assert proc.returncode == 0, describe(proc)
        assert proc.stdout.count("step     4 | loss") == 1, "only rank 0 logs"
        pids = next(ln for ln in proc.stdout.splitlines() if ln.startswith("pids: ")).split()[1:]
        assert [p.split("=")[0] for p in pids[1::2]] == [str(r) for r in range(n)], pids   # "rank r=PID"
        got = losses(tmp_path / f"{tag}.jsonl")
        assert sorted(got) == [1, 2, 3, 4]
        for step in ref:
            assert close(got[step], ref[step]), (tag, step, got[step], ref[step])
    # resume the 2-rank stage-3 run's step-2 checkpoint on 1 process and on 4 ranks at stage 2
    for n, zero in ((1, 0), (4, 2)):
        out = tmp_path / f"resume{n}"
        proc = run_mpi(n, TRAIN, "--data", corpus, *TINY, "--dp", n, "--zero", zero, "--resume",
                       tmp_path / "n2z3" / "step_2", "--out-dir", out, "--metrics", tmp_path / f"r{n}.jsonl")
        assert proc.returncode == 0, describe(proc)
        got = losses(tmp_path / f"r{n}.jsonl")
        assert sorted(got) == [3, 4]
        for step in got:
            assert close(got[step], ref[step]), (n, step, got[step], ref[step])


def test_sparse_model_under_dp_and_zero_matches_one_process(corpus, tmp_path):
    """The sparse FFN's training noise (hard-mask coin, Gumbel noise at temperature 0.5) and
    the sparse QKV layer: the noise is counter-based (engine/random.py), drawn at each row's global index, so
    2 ranks at ZeRO stage 2 log the one-process losses."""
    sparse = ["--ffn-sparsity", "8", "--ffn-lowrank", "8", "--ffn-temperature", "0.5", "--ffn-hard-prob", "0.5",
              "--qkv-modules", "4", "--ckpt-interval", "0"]
    runs = {}
    for n, zero in ((1, 0), (2, 2)):
        tag = f"sparse{n}"
        proc = run_mpi(n, TRAIN, "--data", corpus, *TINY, *sparse, "--dp", n, "--zero", zero,
                       "--out-dir", tmp_path / tag, "--metrics", tmp_path / f"{tag}.jsonl")
        assert proc.returncode == 0, describe(proc)
        runs[n] = losses(tmp_path / f"{tag}.jsonl")
    assert sorted(runs[2]) == [1, 2, 3, 4]
    for step in runs[1]:
        assert close(runs[2][step], runs[1][step]), (step, runs[2][step], runs[1][step])


@pytest.mark.parametrize("n, args, words", [
    (2, ["--sp", "2", "--qkv-modules", "4"], "the sparse QKV layer convolves over neighbouring positions"),
    (2, ["--dp", "4"], "Mesh(dp=4, pp=1, sp=1, tp=1) needs dp*pp*sp*tp = 4 ranks, but the job has 2"),
    (3, ["--dp", "3"], "batch_size 8 is not divisible by dp 3"),
    (2, ["--dp", "2", "--pp", "2"], "Mesh(dp=2, pp=2, sp=1, tp=1) needs dp*pp*sp*tp = 4 ranks, but the job has 2"),
])
def test_bad_layout_exits_2_on_every_rank_with_one_line(corpus, tmp_path, n, args, words):
    proc = run_mpi(n, TRAIN, "--data", corpus, *TINY, *args, "--out-dir", tmp_path / "out", timeout=60)
    assert_bad_input(proc, words, tmp_path / "out")


def test_hostfile_launch_as_the_readme_shows(corpus, tmp_path):
    """README's multi-host launch, here with one host: MPICH's Hydra reads `mpiexec -f HOSTFILE`
    with "host:slots" lines, Open MPI's prterun `mpiexec --hostfile HOSTFILE` with "host slots=N"."""
    import subprocess
    import sys
    from mpi_util import ROOT, launch, mpi_library
    hosts = tmp_path / "hosts"
    if mpi_library() == "openmpi":
        hosts.write_text("localhost slots=2\n")
        flags = ("--hostfile", hosts)
    else:
        hosts.write_text("localhost:2\n")
        flags = ("-f", hosts)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run([*launch(2, *flags), sys.executable, TRAIN, "--data", corpus, *TINY,
                           "--dp", "2", "--max-steps", "2", "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0 and "layout: 2 ranks, dp=2" in proc.stdout, describe(proc)
