"""What a first run of train.py tells its user (train_ui.py): the plan banner and the time
estimate, elapsed time and ETA on the step lines (the arithmetic, on a fake clock), the loss
plot (written when matplotlib is present; a one-line note, or exit 2 for an explicit --plot,
when it is not), and the sample and next commands printed at the end."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import train_ui

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict({k: v for k, v in os.environ.items() if k != "ENGINE_RUN_EXTRAS"},     # conftest.py: extras off
           OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--lr", "1e-2", "--min-lr", "1e-3", "--warmup", "2"]
STEPS = 12


def train(*args, env=ENV):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY, *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_arithmetic_on_a_fake_clock():
    """Step 1 takes 5 s (warm-up), then 0.5 s a step: the ETA and the estimate use the rate
    measured after step 1, and the estimate adds step 1's own time once."""
    assert train_ui.eta(10.0, 1, 100) is None
    assert train_ui.eta(4.5, 10, 100) == pytest.approx(0.5 * 90)
    assert train_ui.eta(4.5, 10, 10) == 0
    clock = Clock()
    p = train_ui.Progress(101, clock=clock)
    assert p.suffix() == " | 0s elapsed | ETA ?"
    clock.t += 5.0
    p.tick()
    assert p.eta() is None and p.estimate_line() is None
    for _ in range(train_ui.ESTIMATE_AT - 1):
        clock.t += 0.5
        p.tick()
    assert p.eta() == pytest.approx(0.5 * (101 - train_ui.ESTIMATE_AT))
    line = p.estimate_line()        # 5 s + 0.5 s x 100 = 55 s
    assert line.startswith("estimate: 101 steps take about 55s (500 ms/step over steps 2-5"), line
    clock.t += 0.5
    p.tick()
    assert p.estimate_line() is None, "said once"
    assert p.suffix() == " | 8s elapsed | ETA 48s"      # 0.5 s x 95 = 47.5 s, rounded to even
    bar = p.bar(6, 101, 2.1049)
    assert bar.startswith("[" + "#" * (24 * 6 // 101) + ".") and "step 6/101 | loss 2.105 | 8s elapsed" in bar
    assert [train_ui.duration(s) for s in (0, 59.4, 125, 3725)] == ["0s", "59s", "2m05s", "1h02m"]
    assert [train_ui.count(n) for n in (960, 31_000, 4_600_000)] == ["960", "31.0k", "4.6M"]


def test_first_run_prints_plan_progress_plot_and_a_sample(corpus, tmp_path):
    out = tmp_path / "out"
    r = train("--data", corpus, "--max-steps", STEPS, "--eval-interval", 6, "--out-dir", out)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    has_mpl = train_ui.have_matplotlib()
    plan = lines[0]
    assert plan.startswith(f"plan: {STEPS} steps x 256 tokens = 3,072 tokens | val loss every 6 steps and at the end"
                           f" | checkpoints in {out}/"), plan
    assert (f"loss plot {out / 'loss.png'}" in plan) == has_mpl
    steps = [s for s in lines if re.match(r"step +\d+ \| loss", s)]
    assert len(steps) == STEPS and all(re.search(r"\| \d+s elapsed \| ETA (\d+s|\?)$", s) for s in steps)
    assert steps[0].endswith("ETA ?") and steps[-1].endswith("ETA 0s")
    estimate = [i for i, s in enumerate(lines) if s.startswith("estimate:")]
    assert len(estimate) == 1 and lines[estimate[0] - 1].startswith(f"step     {train_ui.ESTIMATE_AT} | loss")
    assert re.match(rf"estimate: {STEPS} steps take about \d+s \(\d+ ms/step over steps 2-5", lines[estimate[0]])
    done = next(i for i, s in enumerate(lines) if s.startswith("done:"))
    val = float(re.search(r"step +12 \| val loss (\S+)", r.stdout).group(1))
    assert lines[done] == f"done: {STEPS} steps in {lines[done].split(' in ')[1].split(' |')[0]} | val loss {val:.4f}"
    if has_mpl:
        with open(out / "loss.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"loss plot: {out / 'loss.png'}" in lines
    # the sample: read back from the checkpoint, continuing "def "; then the next commands
    head = next(i for i, s in enumerate(lines) if s.startswith("sample ("))
    assert f"from {out / 'step_12'}" in lines[head] and lines[head + 1] == "-" * 60
    body = r.stdout.split(lines[head] + "\n" + "-" * 60 + "\n", 1)[1].split("\n" + "-" * 60 + "\n")[0]
    assert body.startswith("def ") and len(body.encode("utf-8", "surrogateescape")) > 60
    assert any(s.isdigit() for s in body[4:]), "a model trained on the squares corpus writes digits"
    more, longer = lines[-2:]
    assert more == f"sample more:  python sample.py --ckpt {out} --prompt 'def ' --max-new-tokens 500"
    assert longer == f"train longer: python train.py --resume {out} --max-steps {2 * STEPS}"
    cmd = shlex.split(more.split(":", 1)[1])          # the printed command runs (20 tokens: the last flag wins)
    s = subprocess.run([sys.executable, *cmd[1:], "--max-new-tokens", "20"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert s.returncode == 0 and s.stdout.startswith("def "), s.stderr


def test_without_matplotlib_a_note_and_no_plot(corpus, tmp_path):
    """matplotlib hidden: the default plot is skipped with one note, the run and its sample
    still happen; an explicit --plot is refused before anything is written (exit 2).
    The char tokenizer of the squares corpus has no 'f': the sample continues a newline."""
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = dict(ENV, PYTHONPATH=os.pathsep.join([str(tmp_path / "hide"), ROOT]))
    r = train("--data", corpus, "--tokenizer", "char", "--max-steps", 3, "--out-dir", tmp_path / "out", env=env)
    assert r.returncode == 0, r.stderr
    notes = [s for s in r.stderr.splitlines() if "matplotlib" in s]
    assert notes == ["note: no loss plot (matplotlib is not installed: pip install matplotlib)"]
    assert not (tmp_path / "out" / "loss.png").exists() and "loss plot" not in r.stdout
    assert "sample (" in r.stdout and r.stdout.splitlines()[-2].startswith("sample more:  python sample.py --ckpt ")
    assert "--prompt" not in r.stdout.splitlines()[-2]
    r = train("--data", corpus, "--max-steps", 3, "--out-dir", tmp_path / "out2", "--plot", tmp_path / "l.png", env=env)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --plot ") and "needs matplotlib" in r.stderr
    assert not (tmp_path / "out2").exists() and r.stdout == ""


def test_two_ranks_rank_0_alone_plots_and_samples_the_sharded_checkpoint(corpus, tmp_path):
    """--dp 2 --zero 3: no rank holds the whole model; rank 0 reads the checkpoint back whole."""
    from mpi_util import TRAIN, describe, run_mpi
    out = tmp_path / "out"
    r = run_mpi(2, TRAIN, "--data", corpus, *TINY, "--dp", 2, "--zero", 3, "--max-steps", 3, "--out-dir", out,
                env={"ENGINE_RUN_EXTRAS": "on"})
    assert r.returncode == 0, describe(r)
    for once in ("plan: 3 steps", "estimate: 3 steps", "done: 3 steps", "sample (", "sample more:", "train longer:"):
        assert r.stdout.count(once) == 1, (once, describe(r))
    assert "\ndef " in r.stdout
    if train_ui.have_matplotlib():
        assert f"loss plot: {out / 'loss.png'}" in r.stdout and (out / "loss.png").stat().st_size > 1000
