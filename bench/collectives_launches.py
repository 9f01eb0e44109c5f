"""bench.collectives --launches K: the comparison in K separate mpiexec launches, summarized.

This machine's MPI moves messages between processes faster or slower from one launch to the
next (bench/collectives.py's docstring), so one launch's ratio to the library is one draw. The
driver starts `mpiexec -n RANKS python -m bench.collectives ...` K times with the same flags,
each writing its rows as JSON, and reports per (op, mem, algo, bytes), over the launches,

    vs_mpi     busbw / busbw(mpi), both measured in the same launch: median, min, max
    t/t_mpi    time / mpi's time (= 1 / vs_mpi): median, min, max

and, at 2 ranks, issue 20's goals read on the medians: busbw >= 1.0x the library's from
64 KiB, latency <= 1.1x up to 4 KiB. Cost: K launches of the benchmark; memory: the rows.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.elastic import mpiexec
from engine.io import atomic_write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def strip_flags(argv, flags):
    """argv without the given flags and their values ("--json F" and "--json=F" alike)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in flags:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def summarize_launches(launches):
    """Per (op, mem, algo, bytes) over K launches' rows: the median, min and max of vs_mpi (busbw
    ratio to the library in the same launch) and of the time ratio (time / library's time), and
    the median time; rows in the first launch's order."""
    groups = {}
    for rows in launches:
        for r in rows:
            if r.get("vs_mpi"):
                groups.setdefault((r["op"], r["mem"], r["algo"], r["bytes"]), []).append(r)
    out = []
    for (op, mem, algo, nbytes), rs in groups.items():
        bw = [r["vs_mpi"] for r in rs]
        tr = [1.0 / v for v in bw]
        out.append(dict(op=op, mem=mem, algo=algo, chosen=rs[0]["chosen"], bytes=nbytes, launches=len(rs),
                        time_us_median=float(np.median([r["time_us"] for r in rs])),
                        vs_mpi_median=float(np.median(bw)), vs_mpi_min=min(bw), vs_mpi_max=max(bw),
                        time_ratio_median=float(np.median(tr)), time_ratio_min=min(tr), time_ratio_max=max(tr)))
    return out


def launches_goal(rows, small=4096, big=65536, latency_goal=1.1, busbw_goal=1.0):
    """Issue 20's goal at N=2 on the medians over launches, per op: (op, worst median busbw ratio
    from `big` bytes, its size, worst median time ratio up to `small` bytes, its size)."""
    lines = []
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        auto = [r for r in rows if r["op"] == op and r["algo"] == "auto" and r["mem"] == "host"]
        hi = min((r for r in auto if r["bytes"] >= big), key=lambda r: r["vs_mpi_median"], default=None)
        lo = max((r for r in auto if r["bytes"] <= small), key=lambda r: r["time_ratio_median"], default=None)
        if hi is None and lo is None:
            continue
        text = f"# {op:<15} median over launches, auto vs mpi:"
        if hi is not None:
            ok = "met" if hi["vs_mpi_median"] >= busbw_goal else "MISSED"
            text += f" busbw >= {big >> 10} KiB worst {hi['vs_mpi_median']:.2f} at {hi['bytes']} B " \
                    f"(goal >= {busbw_goal}: {ok});"
        if lo is not None:
            ok = "met" if lo["time_ratio_median"] <= latency_goal else "MISSED"
            text += f" latency <= {small >> 10} KiB worst {lo['time_ratio_median']:.2f}x at {lo['bytes']} B " \
                    f"(goal <= {latency_goal}: {ok})"
            fl = [r for r in rows if r["op"] == op and r["algo"] == "floor" and r["mem"] == "host" and r["bytes"] <= small]
            if fl:                                  # bench/collectives_setup.py Case._floor
                worst = max(fl, key=lambda r: r["time_ratio_median"])
                text += f"; floor (persistent requests + np.add) worst {worst['time_ratio_median']:.2f}x at {worst['bytes']} B"
        lines.append(text)
    return lines


def run_launches(args, argv):
    """--launches K: the whole comparison in K separate `mpiexec -n RANKS` launches of this
    benchmark (this machine's MPI moves messages faster or slower from one launch to the next),
    each launch's table to stderr, then per (op, size, algorithm) the median and range of the
    ratios to the library over the launches."""
    child = strip_flags(argv, ("--launches", "--ranks", "--json", "--plot"))
    launches, metas = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.launches):
            js = os.path.join(tmp, f"launch{i}.json")
            cmd = [*mpiexec(), "-n", str(args.ranks), sys.executable, "-m", "bench.collectives", *child, "--json", js]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH"))))))
            sys.stderr.write(proc.stdout)
            if proc.returncode != 0:
                print(f"bench.collectives: launch {i + 1} of {args.launches} failed (exit {proc.returncode})",
                      file=sys.stderr)
                return proc.returncode
            with open(js) as f:
                data = json.load(f)
            launches.append(data["rows"])
            metas.append(data["meta"])
            print(f"# launch {i + 1}/{args.launches} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                  flush=True)
    rows = summarize_launches(launches)
    m = metas[0]
    print(f"# bench.collectives --launches {args.launches}: {args.ranks} ranks per launch, {m['mpi']}, "
          f"numpy {m['numpy']}, {m['dtype']}, {'in place' if m['inplace'] else 'out of place'}")
    print("# per (op, size, algo) over the launches: vs_mpi = busbw / busbw(mpi) in the same launch, "
          "t/t_mpi = time / mpi's time; median [min, max]")
    for op in dict.fromkeys(r["op"] for r in rows):
        dev = any(r["mem"] == "device" for r in rows if r["op"] == op)
        print(f"\n# {op}\n# {'bytes':>10}  {'mem  ' if dev else ''}{'algo':<26} {'time_us':>9} "
              f"{'vs_mpi':>6} {'[min, max]':>13}  {'t/t_mpi':>7} {'[min, max]':>13}")
        for r in rows:
            if r["op"] != op or r["algo"] == "mpi":
                continue
            algo = r["algo"] if r["algo"] != "auto" else f"auto({r['chosen']})"
            mem = f"{r['mem']:<6} " if dev else ""
            print(f"  {r['bytes']:>10}  {mem}{algo:<26} {r['time_us_median']:9.1f} {r['vs_mpi_median']:6.2f} "
                  f"[{r['vs_mpi_min']:5.2f}, {r['vs_mpi_max']:5.2f}]  {r['time_ratio_median']:7.2f} "
                  f"[{r['time_ratio_min']:5.2f}, {r['time_ratio_max']:5.2f}]")
    if args.ranks == 2:
        print("\n" + "\n".join(launches_goal(rows)))
    if args.json:
        atomic_write_json(args.json, {"meta": dict(launches=args.launches, ranks=args.ranks, argv=child,
                                                   per_launch=metas),
                                      "rows": rows, "per_launch_rows": launches})
    return 0
