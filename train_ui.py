"""What train.py tells the person who runs it: the plan, progress with an ETA, a loss plot, a sample.

Rank 0 only (train.py calls these on the main rank). Nothing here changes what is trained.

ETA (the arithmetic the tests check): step 1 pays one-off costs (allocation, BLAS warm-up), so
the rate is measured from the end of this run's first step. After ``done`` steps, the last
``done - 1`` of which took ``E`` seconds of wall time (evaluations and checkpoints included),

    rate = E / (done - 1)            ETA = rate * (total - done)

and the start-up estimate printed after step ESTIMATE_AT is ``first + rate * (total - 1)``,
where ``first`` is step 1's time. Cost: a clock read per step; memory: the loss history, a
few floats per step (for the plot).

The plot (``--plot FILE.png``; by default ``<out_dir>/loss.png``) draws the train loss of every
step and the validation loss of every evaluation against steps (bottom axis) and tokens seen
(top axis, steps x tokens per step). matplotlib is optional (the [test] extra): without it the
default plot is skipped with a one-line note, and an explicit ``--plot`` is refused at start-up.

``ENGINE_RUN_EXTRAS=off`` (the test suite sets it) skips the default plot and the closing sample,
for scripts that run train.py many times; an explicit ``--plot FILE`` is still drawn.

The closing sample reads back the checkpoint the run just wrote, as ``python sample.py --ckpt``
does (sample.py ``load``: any layout's shards are consolidated on rank 0), and continues a short
prompt with KV-cached decoding (models/generate.py), temperature 0.8.
"""
import importlib
import os
import shlex
import sys
import time
from types import SimpleNamespace

import numpy as np

ESTIMATE_AT = 5            # the time estimate is printed after this many steps of the run
SAMPLE_PROMPT, SAMPLE_TOKENS, SAMPLE_TEMPERATURE = "def ", 240, 0.8
BAR_WIDTH = 24


def have_matplotlib():
    try:
        importlib.import_module("matplotlib")
    except ImportError:
        return False
    return True


def plot_path(plot, out_dir):
    """The file the loss plot goes to, or None: 'off' -> None; '' -> out_dir/loss.png when
    matplotlib is installed; a file name -> it."""
    if plot == "off":
        return None
    if plot:
        return plot
    return os.path.join(out_dir, "loss.png") if have_matplotlib() and not extras_off() else None


def extras_off():
    return os.environ.get("ENGINE_RUN_EXTRAS", "") == "off"


def duration(seconds):
    """'42s', '2m05s', '1h03m'."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def count(n):
    """'960', '3.1k', '4.6M'."""
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e4 else f"{n:,}"


def eta(elapsed_after_first, done, total):
    """Seconds left after ``done`` of ``total`` steps, ``elapsed_after_first`` seconds having
    passed since the first of them ended; None before a rate exists (done < 2)."""
    if done < 2:
        return None
    return elapsed_after_first / (done - 1) * max(0, total - done)


def estimate_total(first, elapsed_after_first, done, total):
    """Seconds the whole run of ``total`` steps takes: step 1's time, then the measured rate."""
    return first + elapsed_after_first / (done - 1) * (total - 1)


class Progress:
    """Clock of a run of ``total`` steps (the steps this launch takes: a resumed run counts
    from its checkpoint's step)."""

    def __init__(self, total, clock=time.perf_counter):
        self.total, self.clock, self.done = total, clock, 0
        self.start = clock()
        self.first_end = None

    def tick(self):
        self.done += 1
        if self.done == 1:
            self.first_end = self.clock()

    def elapsed(self):
        return self.clock() - self.start

    def eta(self):
        return None if self.first_end is None else eta(self.clock() - self.first_end, self.done, self.total)

    def suffix(self):
        """' | 12s elapsed | ETA 2m30s' for the per-step log lines."""
        left = self.eta()
        return f" | {duration(self.elapsed())} elapsed | ETA " + ("?" if left is None else duration(left))

    def estimate_line(self):
        """After ESTIMATE_AT steps (or the last one): the line that says how long the run takes."""
        if self.done != min(ESTIMATE_AT, self.total) or self.done < 2:
            return None
        now = self.clock()
        first, rest = self.first_end - self.start, now - self.first_end
        rate = rest / (self.done - 1)
        return (f"estimate: {self.total} steps take about {duration(estimate_total(first, rest, self.done, self.total))}"
                f" ({rate * 1e3:.0f} ms/step over steps 2-{self.done}; evaluations add a little)")

    def bar(self, step, last_step, loss):
        """'[#########...............] step 120/1500 | loss 2.104 | 15s elapsed | ETA 2m45s'"""
        frac = self.done / self.total if self.total else 1.0
        fill = int(BAR_WIDTH * frac)
        return f"[{'#' * fill}{'.' * (BAR_WIDTH - fill)}] step {step}/{last_step} | loss {loss:.3f}{self.suffix()}"


def plan_line(steps, start, tokens_per_step, eval_interval, ckpt_interval, out_dir, plot):
    """The banner's first line: what will happen."""
    todo = steps - start
    evals = f"val loss every {eval_interval} steps and at the end" if eval_interval else "val loss at the end"
    ckpts = f"every {ckpt_interval} steps and at the end" if ckpt_interval else "at the end"
    return (f"plan: {todo} steps" + (f" (from step {start} to {steps})" if start else "") +
            f" x {tokens_per_step:,} tokens = {count(todo * tokens_per_step)} tokens | {evals} | checkpoints in "
            f"{out_dir}/ {ckpts}" + (f" | loss plot {plot}" if plot else "") +
            f" | time estimate after step {min(ESTIMATE_AT, max(todo, 1))}")


def plot_losses(path, history, tokens_per_step, title=""):
    """Write the loss plot: history is [{'step', 'loss', optional 'val_loss'}]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = np.array([h["step"] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h["loss"] for h in history], lw=0.8, alpha=0.7, label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", ms=4, label="val loss")
        ax.annotate(f"{val[-1][1]:.3f}", val[-1], textcoords="offset points", xytext=(-10, 8))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(title=title or None, title_fontsize=8)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step / 1e6,
                                               lambda t: t * 1e6 / tokens_per_step))
    top.set_xlabel("tokens seen (millions)")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def sample_prompt(tokenizer):
    """SAMPLE_PROMPT's ids, else a newline's, else token 0 (a tokenizer that cannot encode them)."""
    for text in (SAMPLE_PROMPT, "\n"):
        try:
            ids = tokenizer.encode(text)
        except Exception:       # noqa: BLE001 - a char vocabulary without these characters, or token ids
            continue
        if len(ids):
            return text, np.asarray(ids, dtype=np.int64)
    return None, np.zeros(1, dtype=np.int64)


def closing_sample(ckpt_dir, tokens=SAMPLE_TOKENS, seed=0):
    """(prompt text or None, the decoded sample) from the checkpoint at ckpt_dir."""
    import sample
    model, tokenizer, _ = sample.load(SimpleNamespace(ckpt=ckpt_dir, hf=None))
    text, prompt = sample_prompt(tokenizer)
    out = model.generate(prompt[None], tokens, temperature=SAMPLE_TEMPERATURE, rng=np.random.default_rng(seed))
    return text, tokenizer.decode(out[0])


def closing_lines(out_dir, max_steps, prompt):
    """The commands that sample more and train on from here."""
    q = shlex.quote
    p = f" --prompt {q(prompt)}" if prompt and prompt.strip() else ""
    return [f"sample more:  python sample.py --ckpt {q(out_dir)}{p} --max-new-tokens 500",
            f"train longer: python train.py --resume {q(out_dir)} --max-steps {2 * max_steps}"]


def finish(run, history, plot, tokens_per_step, progress, say):
    """The end of a run on rank 0: the plot, a sample from the checkpoint, the next commands."""
    last = next((h for h in reversed(history) if "val_loss" in h), None)
    val = f" | val loss {last['val_loss']:.4f}" if last else ""
    say(f"done: {progress.done} steps in {duration(progress.elapsed())}{val}", flush=True)
    if plot and history:
        plot_losses(plot, history, tokens_per_step, title=f"{run.model.num_params():,} parameters, "
                    f"{os.path.basename(run.data.source) or run.data.source}")
        say(f"loss plot: {plot}", flush=True)
    elif not have_matplotlib() and run.cfg.plot != "off" and not extras_off():
        print("note: no loss plot (matplotlib is not installed: pip install matplotlib)", file=sys.stderr, flush=True)
    if run.last_good is None or extras_off():
        return
    t0 = time.perf_counter()
    prompt, text = closing_sample(run.last_good)
    say(f"sample ({SAMPLE_TOKENS} tokens at temperature {SAMPLE_TEMPERATURE} from {run.last_good}, "
        f"{time.perf_counter() - t0:.1f} s):", flush=True)
    say("-" * 60 + "\n" + text + ("" if text.endswith("\n") else "\n") + "-" * 60, flush=True)
    for line in closing_lines(run.cfg.out_dir, run.cfg.max_steps, prompt):
        say(line, flush=True)



def redraw(line):
    """Overwrite the terminal's current line with ``line`` (the progress bar)."""
    sys.stdout.write("\r\033[K" + line)
    sys.stdout.flush()


def printer(tty):
    """print, which on a terminal first clears the progress bar's line (redrawn on the next step)."""
    if not tty:
        return print

    def say(*args, **kw):
        sys.stdout.write("\r\033[K")
        print(*args, **kw)
    return say
