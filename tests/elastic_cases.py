"""What the elastic tests share (test_elastic.py: relaunches under MPICH; test_elastic_ulfm.py:
shrinking in place under Open MPI): the tiny float64 model with dropout, the layouts, the
corpus, the clean reference runs and the comparison of losses after a recovery point."""
from mpi_util import TRAIN, describe, losses

MAX = 10
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "12",
        "--eval-iters", "1", "--eval-interval", "0", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2",
        "--dtype", "float64", "--dropout", "0.1", "--max-steps", str(MAX), "--keep", "0"]
LAYOUTS = {"dp4": ["--zero", "1"], "pp2": ["--pp", "2", "--micro-batches", "2", "--zero", "1"],
           "zero3": ["--zero", "3"]}


def dp_of(layout):
    """The dp of a layout's 4-rank launch."""
    return 2 if layout == "pp2" else 4


def write_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "squares.txt"
    path.write_text("".join(f"{i} squared is {i * i}.\n" for i in range(3000)), encoding="utf-8")
    return str(path)


class CleanRuns:
    """{layout: out dir of an uninterrupted 4-rank run with a checkpoint at every step}, made on
    demand with ``launch(n, script, *args)`` (a subprocess.CompletedProcess)."""

    def __init__(self, tmp_path_factory, corpus, launch):
        self.factory, self.corpus, self.launch, self.made = tmp_path_factory, corpus, launch, {}

    def __call__(self, layout):
        if layout not in self.made:
            out = self.factory.mktemp(f"clean-{layout}") / "out"
            proc = self.launch(4, TRAIN, "--data", self.corpus, *TINY, *LAYOUTS[layout], "--dp", dp_of(layout),
                               "--ckpt-interval", 1, "--out-dir", out)
            assert proc.returncode == 0, describe(proc)
            self.made[layout] = out
        return self.made[layout]

    def resumed(self, tmp_path, layout, step, dp, ranks):
        """Metrics path of the clean run resumed at dp from its step checkpoint."""
        proc = self.launch(ranks, TRAIN, "--data", self.corpus, *TINY, *LAYOUTS[layout], "--dp", dp, "--resume",
                           self(layout) / f"step_{step}", "--out-dir", tmp_path / "ref", "--metrics",
                           tmp_path / "ref.jsonl")
        assert proc.returncode == 0, describe(proc)
        return tmp_path / "ref.jsonl"


def assert_losses_after(got_path, ref_path, step):
    """The run's losses after ``step`` (its last rows: the file is appended) equal the
    reference's within 1e-10 relative, and both end at MAX."""
    got, ref = losses(got_path), losses(ref_path)
    assert max(got) == MAX and sorted(ref) == list(range(step + 1, MAX + 1))
    for s in ref:
        assert abs(got[s][0] - ref[s][0]) <= 1e-10 * abs(ref[s][0]), (s, got[s], ref[s])
