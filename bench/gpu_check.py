"""One command that checks a real GPU: the suite on the device, then the GPU benchmarks against
what a user would pick instead, one summary table, one JSON file, under 8 minutes.

    python -m bench.gpu_check                          # on the GPU machine (offline is fine)
    python -m bench.gpu_check --prepare-wheels         # beforehand, on a connected machine
    python -m bench.gpu_check --emulated               # the script's own logic, without a GPU (CI)

Checks, each with its own time budget (a check that overruns is interrupted and reported as such):
  suite        pytest with ENGINE_DEVICE=gpu, the test files split over --workers processes (goal:
               no failure, no error)
  train_step   bench.train_step --device gpu against PyTorch CUDA eager: nanoGPT's baby config
               (goal: ratio <= 1.5) and GPT-2 small's shape (goal: <= 1.2)
  collectives  mpiexec -n N python -m bench.collectives --device gpu at N = 1, 2, 4 on the one GPU
               (goal: on device buffers, auto's busbw >= the MPI library's from 64 KiB: the
               smallest vs_mpi over the measured sizes >= 1.0)
  sparse_decode  bench.sparse_decode --device gpu (the paper's and the small shape; reported)

Before them a probe (bench/gpu_env.py) finds Python, CuPy and its GPU, PyTorch with CUDA, mpi4py,
an mpiexec that starts 2 ranks, ml_dtypes and regex, installs missing carried wheels from wheels/
into out/gpu_env (no registry), and prints one line per piece still missing with how to fix it; a
check whose needs are missing is MISSING, not run. The exit code is 0 only if every check passed.
--emulated runs the same steps at tiny sizes on the device double (ENGINE_DEVICE=gpu-emulated,
PyTorch on the CPU, N = 1, 2, a short test list): the speed goals mean nothing there, the plumbing
(probe, budgets, parsing, table, JSON, MISSING and FAIL rows) is what tests/test_gpu_check.py tests.
"""
import argparse
import os
import sys
import time

from bench import gpu_env
from bench.gpu_suite import Row, run_logged, run_suite
from engine.io import CheckpointError, atomic_write_json, load_json

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEADLINE_S = 450     # no step runs past it (plus <= 20 s to stop one), so the whole check stays under 8 minutes
CHECKS = ("suite", "train_step", "collectives", "sparse_decode")
NEEDS = {"suite": ("numpy", "pytest", "cupy"), "train_step": ("numpy", "cupy", "torch"),
         "collectives": ("numpy", "cupy", "mpi4py", "mpiexec", "mpi_launch"), "sparse_decode": ("numpy", "cupy")}
GOALS = {"suite": "no failure or error", "train_step": "engine/torch <= 1.5 (baby), <= 1.2 (gpt2)",
         "collectives": "device auto busbw >= mpi's", "sparse_decode": "reported"}


def tail(log, n):
    with open(log, errors="replace") as f:
        lines = [s.rstrip() for s in f if s.strip()]
    return " | ".join(lines[-n:])[-300:]


def bench_row(check, goal, limit, value, fmt, rc, secs, timed_out, log, extra=None):
    """The row of a benchmark run: FAIL if it did not finish or measured nothing, else the goal decides."""
    base = dict(seconds=round(secs, 1), log=log, **(extra or {}))
    if timed_out:
        return Row(check, "TIMEOUT", f"interrupted after {secs:.0f} s: {tail(log, 1)}", goal, **base)
    if rc != 0 or value is None:
        return Row(check, "FAIL", f"rc {rc}: {tail(log, 1)}", goal, **base)
    ok = limit is None or limit(value)
    return Row(check, "PASS" if ok else "FAIL", fmt(value), goal, value=value, **base)


def fresh(out, name):
    """Paths of a step's JSON and log under ``out``, the JSON of an earlier run removed (never read stale)."""
    js = os.path.join(out, f"{name}.json")
    if os.path.exists(js):
        os.remove(js)
    return js, os.path.join(out, f"{name}.log")


def read_json(path):
    """A step's JSON, or None if it wrote none (or half of one)."""
    try:
        return load_json(path)
    except CheckpointError:
        return None


def check_train(plan, env, budget, out):
    rows = []
    for label, model, limit, steps in plan["train"]:
        js, log = fresh(out, f"train_{label}")
        cmd = [sys.executable, "-m", "bench.train_step", "--device", "gpu", "--model", model, *steps, "--json", js]
        rc, secs, to = run_logged(cmd, env, REPO, budget(label), log)
        r = read_json(js) if rc == 0 else None
        extra = {k: r[k] for k in ("engine_ms_per_step", "torch_ms_per_step", "first_loss", "engine_device",
                                   "torch_device")} if r else None
        rows.append(bench_row(f"train_step {label}", f"engine/torch <= {limit}", lambda v, m=limit: v <= m,
                              r and r["ratio"], lambda v, r=r: f"{v:.3f}x ({r['engine_ms_per_step']:.1f} vs "
                              f"{r['torch_ms_per_step']:.1f} ms/step, torch on {r['torch_device']})",
                              rc, secs, to, log, extra))
    return rows


def collective_ratio(result, min_bytes):
    """The smallest busbw ratio auto / library per op, over the rows on device buffers (mem=device;
    every row if the benchmark marks none) from ``min_bytes``."""
    rows = result.get("rows", [])
    if any("mem" in r for r in rows):
        rows = [r for r in rows if r.get("mem") == "device"]
    ratios = {}
    for r in rows:
        if r["algo"] == "auto" and r["bytes"] >= min_bytes and r.get("vs_mpi") is not None:
            ratios[r["op"]] = min(ratios.get(r["op"], float("inf")), r["vs_mpi"])
    return ratios


def check_collectives(plan, env, budget, out):
    rows = []
    mpiexec = gpu_env.which("mpiexec", env)
    for n in plan["ranks"]:
        js, log = fresh(out, f"collectives_n{n}")
        cmd = [mpiexec, "-n", str(n), sys.executable, "-m", "bench.collectives", "--device", "gpu",
               *plan["collectives"], "--json", js]
        rc, secs, to = run_logged(cmd, env, REPO, budget(f"n{n}"), log)
        r = read_json(js) if rc == 0 else None
        ratios = collective_ratio(r, plan["min_bytes"]) if r else {}
        meta = (r or {}).get("meta", {})
        aware = {True: "MPI CUDA-aware", False: "MPI not CUDA-aware: staged"}.get(meta.get("cuda_aware"), "")
        rows.append(bench_row(f"collectives N={n}", f"device auto busbw >= mpi's (>= {plan['min_bytes'] >> 10} KiB)",
                              lambda v: v >= 1.0, min(ratios.values()) if ratios else None,
                              lambda v, aware=aware: "min vs_mpi " + ", ".join(f"{k} {x:.2f}" for k, x in ratios.items())
                              + (f" ({aware})" if aware else ""), rc, secs, to, log,
                              {"vs_mpi_min": ratios, "mpi": meta.get("mpi"), "cuda_aware": meta.get("cuda_aware")}))
    return rows


def check_decode(plan, env, budget, out):
    js, log = fresh(out, "sparse_decode")
    cmd = [sys.executable, "-m", "bench.sparse_decode", "--device", "gpu", *plan["decode"], "--json", js]
    rc, secs, to = run_logged(cmd, env, REPO, budget("decode"), log)
    rows = read_json(js) if rc == 0 else None
    both = {r["shape"]: r["speedup"] for r in rows or [] if r["variant"] == "both"}
    return [bench_row("sparse_decode", "reported (paper: both 2.62x)", None, both or None,
                      lambda v: "both vs dense " + ", ".join(f"{k} {x:.2f}x" for k, x in v.items()),
                      rc, secs, to, log, {"rows": rows})]


def plans(emulated):
    """What each check runs and its budget in seconds (they sum to under DEADLINE_S with the probe)."""
    if emulated:
        tiny = ["--steps", "1", "--warmup", "1", "--block", "1"]
        return dict(suite=["tests/test_random.py"], workers=1, min_bytes=0, ranks=(1, 2),
                    train=[("tiny", "tiny", 1.5, tiny)],
                    collectives=["--op", "all_reduce", "--algo", "auto,mpi", "--sizes", "1KB:4KB", "--rounds", "1"],
                    decode=["--shapes", "tiny", "--prompt", "3", "--warmup", "1", "--tokens", "2"],
                    budgets=dict(suite=60, tiny=60, n1=40, n2=40, n4=40, decode=40))
    return dict(suite=None, workers=4, min_bytes=64 << 10, ranks=(1, 2, 4),
                train=[("baby", "baby", 1.5, ["--steps", "20", "--warmup", "5", "--block", "5"]),
                       ("gpt2", "gpt2", 1.2, ["--steps", "10", "--warmup", "3", "--block", "5"])],
                collectives=["--op", "all_reduce,reduce_scatter,all_gather", "--algo", "auto,mpi",
                             "--sizes", "64KB:64MB", "--rounds", "3", "--round-seconds", "0.02"],
                decode=["--shapes", "paper,small"],
                budgets=dict(suite=165, baby=40, gpt2=70, n1=25, n2=35, n4=45, decode=50))


def print_table(rows, preflight_lines):
    w = max(len(r["check"]) for r in rows)
    gw = max(len(r["goal"]) for r in rows)
    head = f"{'check':<{w}}  {'status':<7}  {'goal':<{gw}}  result"
    print("\n".join(["", "GPU check", *preflight_lines, head, "-" * len(head)]))
    for r in rows:
        print(f"{r['check']:<{w}}  {r['status']:<7}  {r['goal']:<{gw}}  {r['result']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--json", default="out/gpu_check.json", help="the summary as JSON (default out/gpu_check.json)")
    p.add_argument("--emulated", action="store_true", help="tiny sizes on the device double, torch on the CPU")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated from {', '.join(CHECKS)}")
    p.add_argument("--wheels", default="wheels", help="folder of carried wheels (default wheels/)")
    p.add_argument("--logs", default="out/gpu_check", help="folder of each step's log and JSON (default out/gpu_check)")
    p.add_argument("--prefix", default="out/gpu_env", help="where carried wheels are installed (default out/gpu_env)")
    p.add_argument("--no-install", action="store_true", help="install no carried wheel; use only what is there")
    p.add_argument("--workers", type=int, help="pytest processes for the suite (default 4; 1 emulated)")
    p.add_argument("--prepare-wheels", nargs="?", const="wheels", metavar="DIR",
                   help="download the carried wheels into DIR (default wheels/) and stop; needs a registry")
    p.add_argument("--python-version", default="3.12", help="of the wheels --prepare-wheels fetches")
    args = p.parse_args(argv)
    if args.prepare_wheels:
        return gpu_env.prepare_wheels(args.prepare_wheels, args.python_version)
    checks = [c for c in args.checks.split(",") if c]
    bad = [c for c in checks if c not in CHECKS]
    if bad or not checks or (args.workers is not None and args.workers < 1):
        print(f"error: unknown check {bad[0]!r}; choose from {', '.join(CHECKS)}" if bad or not checks
              else "error: --workers must be >= 1", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    device = "gpu-emulated" if args.emulated else "gpu"
    plan = plans(args.emulated)
    out = os.path.join(REPO, args.logs)
    os.makedirs(out, exist_ok=True)
    env, found, miss, notes = gpu_env.provision(REPO, os.path.join(REPO, args.wheels), os.path.join(REPO, args.prefix),
                                                device, os.path.join(out, "install.log"), not args.no_install)
    lines = preflight_lines(found, miss, notes, device)
    for s in lines:
        print(s, flush=True)
    missing_keys = {k for k, _, _ in miss}
    deadline = t_start + DEADLINE_S

    def budget(key):
        return max(1.0, min(plan["budgets"][key], deadline - time.perf_counter()))

    rows = []
    for check in checks:
        need = [k for k in NEEDS[check] if k in missing_keys]
        if need:
            rows.append(Row(check, "MISSING", f"not run: needs {', '.join(need)}", GOALS[check]))
            continue
        print(f"[{time.perf_counter() - t_start:5.0f} s] {check} ...", flush=True)
        if check == "suite":
            rows.append(run_suite(plan["suite"], env, REPO, budget("suite"), out, args.workers or plan["workers"]))
        else:
            rows += {"train_step": check_train, "collectives": check_collectives,
                     "sparse_decode": check_decode}[check](plan, env, budget, out)
    wall = time.perf_counter() - t_start
    print_table(rows, [])
    print(f"{'emulated (device double), ' if args.emulated else ''}{wall:.0f} s in all; logs in {out}/")
    atomic_write_json(os.path.join(REPO, args.json) if not os.path.isabs(args.json) else args.json,
                      {"device": device, "wall_s": round(wall, 1), "preflight": found, "notes": notes,
                       "missing": [dict(what=k, why=w, fix=f) for k, w, f in miss], "checks": rows})
    return 0 if rows and all(r["status"] == "PASS" for r in rows) else 1


def preflight_lines(found, miss, notes, device):
    """One line per piece found (versions) and one per piece missing, with its fix."""
    c, t, m = found.get("cupy", {}), found.get("torch", {}), found.get("mpi4py", {})
    lines = [f"python {found.get('python', '?')} ({found.get('executable', '?')}); ENGINE_DEVICE={device}"]
    if c.get("ok"):
        lines.append(f"cupy {c['version']}: {c['devices']} device(s), CUDA {c['cuda']}, {c['name']}")
    if t.get("ok"):
        lines.append(f"torch {t['version']}: CUDA {t.get('cuda')}, available {t.get('cuda_available')}")
    if m.get("ok"):
        lines.append(f"mpi4py {m['version']}: {m['library']}; mpiexec {found['mpiexec'].get('path')}")
    lines += [f"note: {n}" for n in notes]
    lines += [f"MISSING {k}: {why} -> {fix}" for k, why, fix in miss]
    return lines


if __name__ == "__main__":
    sys.exit(main())

