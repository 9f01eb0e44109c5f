"""Collective benchmark: every hand-written algorithm against the MPI library's own.

    mpiexec -n 2 python -m bench.collectives
    mpiexec -n 4 python -m bench.collectives --op all_reduce --sizes 8B:64MB --json ar.json --plot ar.png
    mpiexec -n 8 python -m bench.collectives --op all_gather --algo ring,bruck,mpi --sizes 1KB:1MB
    python -m bench.collectives --launches 5 --algo auto,mpi --json l5.json    (no mpiexec: it launches)

--launches K runs the whole comparison in K separate `mpiexec -n RANKS` launches (this
machine's MPI moves messages faster or slower from one launch to the next, so one launch's
ratio is one draw), prints each launch's tables to stderr and then, per (op, size, algo),
the median and [min, max] over the launches of vs_mpi and of time / the library's time, and
at 2 ranks issue 20's goals read on the medians (busbw >= 1.0x from 64 KiB, latency <= 1.1x
up to 4 KiB); --json writes those rows, every launch's rows and metadata.

An OSU-style sweep (osu_allreduce & co.: warm-up, iterations scaled by size and capped by
--round-seconds, each one timed
between barriers, min/avg/max over ranks) printed with nccl-tests' columns (Jeaugey,
nccl-tests PERFORMANCE.md): algbw = bytes / time and

    busbw = algbw * 2(n-1)/n   all_reduce
            algbw * (n-1)/n    reduce_scatter, all_gather, all_to_all (bytes = the whole vector)
            algbw              broadcast, reduce

the per-link bandwidth an optimal algorithm needs, comparable with the hardware's.
Every algorithm of an op, algo="auto" and the library's own (algo="mpi", called directly
through mpi4py, the call a user would make instead) run in the same launch, interleaved
round by round (in reversed order every other round, so that no algorithm always runs
right after another) so background load hits them alike; time_us is the median over rounds of
each round's mean (rank-averaged), and vs_mpi the busbw ratio to the library at that size.
Beside them, for all_reduce, reduce_scatter and all_gather at a power-of-two rank count, the
row "floor": the fast path's messages as bare mpi4py persistent requests on ready-made
memoryviews (made once, started and waited per step) plus one np.add per reduction step,
and nothing else (bench/collectives_setup.py Case._floor): what any Python implementation of these messages costs at least, so that a
small message's ratio to the library reads against the part of it no code of ours can remove.

Beside each measurement: the time the alpha-beta-gamma model (collectives/cost.py)
predicts with alpha, beta, gamma fitted in this launch (a Sendrecv ping-pong sweep and an
np.add sweep, least squares on relative error), and as the ceiling, the memory-copy and add
bandwidth of this machine measured with all ranks running at once. --json writes
{"meta": ..., "rows": [...]} (rows: op, algo, mem, ranks, bytes, time_us, algbw_GBps,
busbw_GBps, ...); --plot draws busbw against size, one line per algorithm and the library.

--device gpu adds, in the same launch and the same interleaved rounds, every algorithm on
device buffers (rows with mem = device beside mem = host; vs_mpi compares with the library
on the same memory). Each rank takes its GPU by local rank (collectives/devices.py); device
"mpi" is the library's collective through the Communicator, which hands it the device
buffers when the MPI is CUDA-aware and stages them through pinned host buffers otherwise
(the header says which, and how it was detected). A device call is timed up to the end of
its stream (synchronize). ENGINE_DEVICE=gpu-emulated runs it on the device double, whose
times measure the staging code's overhead only, not a GPU.

Measurements behind the fast path's all-gather placement (collectives/direct.py, "Placing
the own block"), to rerun on your machine:

    mpiexec -n 2 python -m bench.collectives --op all_gather --algo auto,recursive_doubling,mpi --sizes 1MB:8MB

(recursive_doubling on the general path sends the own block straight from the input
below 16 MiB, the library copies it first, auto takes the fast path, which times copying
while step 1's exchange is in flight against copying first.)
On the development machine (2 vCPUs of a shared AMD EPYC, the MPICH wheel, N=2, one
launch each) the outcome depended on a state that came and went between launches and even
between consecutive calls: MPICH moves messages between processes through shared-memory
cells, copied in by the sender and out by the receiver (its single-copy CMA path is off
by default), and in one state that transfer was 3-5x slower than in the other. Against
MPI_Allgather (which copies first), input first from 1 to 8 MiB gathered was 1.9-4.3x
faster in launches where the library was slow and 0.7-0.85x at 4-8 MiB where it was fast;
copying first ran level with the library in both (it is the library's algorithm), and up
to 1 MiB input first won in every launch (1.2-4.3x). Hence direct.PLACE_TRIAL_BYTES (2 MiB):
below it the block goes input first, from it up each plan times two placements. Issue 20
found auto at 0.85-0.97 of the library at 16-64 MiB in some launches: the copy after the
exchange (input first) or before it (copy first, the library's way) costs the same memory
traffic as the library's, so the best such a placement can do is tie. The overlapped
placement posts step 1 (Isend, Irecv), copies the own block in 4 MiB pieces with an
MPI_Testall after each and then waits, so the copy runs while the library moves the
message. In an interleaved test (2 ranks, 2-64 MiB gathered, 12 launches, the machine
shared with other jobs, load average 9-10 on 2 cores) the library's time over the
overlapped placement's was 0.84-1.24, median 1.02; over copy first's (the library's
algorithm in Python) 0.92-1.78 in 8 launches: level within this machine's noise, not a
clear win. The trial now picks between overlapped and copy first.
"""
import argparse
import platform
import sys
import time

import numpy as np
from mpi4py import MPI

from bench.collectives_launches import run_launches
from bench.collectives_setup import BUSBW, FLOOR, Case, fit_model, fit_rows, measure_ceiling, parse_sizes
from collectives import Communicator, cost
from collectives.devices import cuda_aware, cuda_aware_source, select_gpu
from collectives.launch import env_world
from engine import backend
from engine.io import atomic_write_json

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "all_to_all")


def time_batch(world, fn, iters):
    """Mean seconds of `iters` calls of fn, each timed alone between barriers (OSU style)."""
    total = 0.0
    for _ in range(iters):
        world.Barrier()
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / iters


def _synced(fn):
    """fn, then wait for the GPU's stream: a device call's time includes its kernels."""
    def call():
        fn()
        backend.synchronize()
    return call


def sweep(comm, op, algos, sizes, args, mems=("host",)):
    """Rows for one collective: every size, every algorithm (on host buffers, and on device
    buffers when mems has "device") interleaved round by round."""
    world, n = comm.mpi, comm.size
    rows = []
    for nbytes in sizes:
        cases = {mem: Case(comm, op, nbytes, np.dtype(args.dtype), args.inplace, device=mem == "device")
                 for mem in mems}
        case = cases["host"]
        if case.nbytes == 0 and nbytes > 0:
            continue
        fns = {(mem, algo): cases[mem].runner(algo) if mem == "host" else _synced(cases[mem].runner(algo))
               for mem in mems for algo in algos if algo != FLOOR or mem == "host"}
        fns = {key: fn for key, fn in fns.items() if fn is not None}      # "floor" where it is defined
        iters = int(min(args.max_iters, max(args.min_iters, args.budget // max(case.nbytes, 1))))
        t0 = time.perf_counter()
        for fn in fns.values():                          # warm-up (plans, pools, pages)
            for _ in range(max(2, iters // 10)):
                world.Barrier()
                fn()
        per_call = world.allreduce((time.perf_counter() - t0) / len(fns) / max(2, iters // 10), op=MPI.MAX)
        iters = int(max(args.min_iters, min(iters, args.round_seconds / per_call)))   # same on every rank
        per_round = {key: [] for key in fns}
        order = list(fns)
        for _ in range(args.rounds):               # ABBA: every algorithm runs early and late alike
            for key in order:
                per_round[key].append(time_batch(world, fns[key], iters))
            order.reverse()
        for mem, algo in fns:
            mine = float(np.median(per_round[mem, algo]))
            lo, hi = world.allreduce(mine, op=MPI.MIN), world.allreduce(mine, op=MPI.MAX)
            avg = world.allreduce(mine) / n
            algbw = case.nbytes / avg / 1e9 if avg > 0 else 0.0
            chosen = cost.choose(op, n, case.nbytes) if algo == "auto" else algo
            rows.append(dict(op=op, algo=algo, mem=mem, chosen=chosen, ranks=n, bytes=case.nbytes, count=case.count,
                             dtype=args.dtype, inplace=args.inplace, iters=iters * args.rounds,
                             time_us=avg * 1e6, min_us=lo * 1e6, max_us=hi * 1e6, algbw_GBps=algbw,
                             busbw_GBps=algbw * BUSBW[op](n), model_us=None))
    base = {(r["bytes"], r["mem"]): r for r in rows if r["algo"] == "mpi"}
    for r in rows:
        b = base.get((r["bytes"], r["mem"]))
        r["vs_mpi"] = (b["time_us"] / r["time_us"]) if b and r["time_us"] > 0 else None
    return rows


def print_table(op, rows, n):
    dev = any(r["mem"] == "device" for r in rows)
    print(f"\n# {op}   busbw = algbw x {BUSBW[op](n):.3f}   vs_mpi = busbw / busbw(mpi) at the same size"
          + (" and memory (host / device buffers)" if dev else ""))
    memcol = f"{'mem':<6} " if dev else ""
    print(f"# {'bytes':>10} {'count':>10}  {memcol}{'algo':<22} {'time_us':>10} {'min_us':>10} "
          f"{'max_us':>10} {'algbw':>7} {'busbw':>7} {'model_us':>10} {'vs_mpi':>6}")
    for r in rows:
        algo = r["algo"] if r["algo"] != "auto" else f"auto({r['chosen']})"
        model = f"{r['model_us']:10.1f}" if r["model_us"] is not None else f"{'-':>10}"
        ratio = f"{r['vs_mpi']:6.2f}" if r["vs_mpi"] is not None else f"{'-':>6}"
        mem = f"{r['mem']:<6} " if dev else ""
        print(f"  {r['bytes']:>10} {r['count']:>10}  {mem}{algo:<22} {r['time_us']:10.1f} {r['min_us']:10.1f} "
              f"{r['max_us']:10.1f} {r['algbw_GBps']:7.3f} {r['busbw_GBps']:7.3f} {model} {ratio}")
    sys.stdout.flush()


def goal_summary(rows):
    """The issue's goal at N=2: auto >= 1.0x mpi busbw from 64 KiB, <= 1.1x its latency at <= 4 KiB (issue 20)."""
    lines = []
    for op in ("all_reduce", "reduce_scatter", "all_gather"):
        auto = {r["bytes"]: r for r in rows if r["op"] == op and r["algo"] == "auto" and r["mem"] == "host"}
        mpi = {r["bytes"]: r for r in rows if r["op"] == op and r["algo"] == "mpi" and r["mem"] == "host"}
        big = [auto[b]["vs_mpi"] for b in auto if b >= 65536 and b in mpi]
        small = [auto[b]["time_us"] / mpi[b]["time_us"] for b in auto if 0 < b <= 4096 and b in mpi]
        floor = [r["time_us"] / mpi[r["bytes"]]["time_us"] for r in rows if r["op"] == op and r["algo"] == FLOOR
                 and 0 < r["bytes"] <= 4096 and r["bytes"] in mpi]
        if big or small:
            lines.append(f"# {op:<15} auto vs mpi: busbw ratio >= 64 KiB min {min(big, default=float('nan')):.2f} "
                         f"(goal >= 1.0); latency ratio <= 4 KiB max {max(small, default=float('nan')):.2f} "
                         f"(goal <= 1.1)" + (f"; floor (persistent requests + np.add) max {max(floor):.2f}" if floor else ""))
    return lines


def plot(path, rows, meta):
    import matplotlib                  # lazily: only --plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops = [op for op in OPS if any(r["op"] == op for r in rows)]
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4.5), squeeze=False)
    for ax, op in zip(axes[0], ops):
        for algo, mem in dict.fromkeys((r["algo"], r["mem"]) for r in rows if r["op"] == op):
            pts = [(r["bytes"], r["busbw_GBps"]) for r in rows if r["op"] == op and r["algo"] == algo
                   and r["mem"] == mem]
            style = dict(color="black" if mem == "host" else "dimgrey", linestyle="--", linewidth=2) \
                if algo == "mpi" else {}
            label = (algo if algo != "mpi" else "mpi (library)") + (" (device)" if mem == "device" else "")
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label, **style)
        for name, key in (("memcpy", "memcpy_GBps"), ("add", "add_GBps")):
            ax.axhline(meta[key], color="grey", linestyle=":", linewidth=1)
            ax.text(rows[0]["bytes"], meta[key], f" {name} ceiling", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bytes")
        ax.set_ylabel("busbw (GB/s)")
        ax.set_title(f"{op}, {meta['ranks']} ranks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="all_reduce,reduce_scatter,all_gather",
                   help=f"comma-separated from {', '.join(OPS)}, or 'all'")
    p.add_argument("--algo", default=None, help="comma-separated algorithms (default: all of the op's, auto, mpi, "
                                                "and floor: persistent requests + np.add, the least Python code costs)")
    p.add_argument("--sizes", default="8B:64MB", help="START:END in B/KB/MB/GB (powers of 1024), doubling")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--inplace", action="store_true", help="in-place forms (MPI_IN_PLACE for the library)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size (median reported)")
    p.add_argument("--budget", type=float, default=32 << 20, help="bytes per round per algorithm")
    p.add_argument("--round-seconds", type=float, default=0.05,
                   help="cap on the time of one algorithm's batch per round (iterations shrink to fit)")
    p.add_argument("--min-iters", type=int, default=2)
    p.add_argument("--max-iters", type=int, default=200)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="gpu: also every algorithm on device buffers (rows marked mem=device), on the GPU "
                        "each rank selects (local rank %% GPUs); ENGINE_DEVICE=gpu-emulated: the device double")
    p.add_argument("--launches", type=int, default=1,
                   help="K > 1: run without mpiexec; the comparison runs in K separate mpiexec launches and "
                        "the median and range of each ratio over them is printed (and written by --json)")
    p.add_argument("--ranks", type=int, default=2, help="ranks per launch with --launches")
    p.add_argument("--json", help="write the rows and metadata as JSON")
    p.add_argument("--plot", help="write busbw vs size as a PNG (needs matplotlib)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.launches < 1 or args.ranks < 1:
        p.exit(2, f"bench.collectives: --launches and --ranks must be >= 1, got {args.launches}, {args.ranks}\n")
    if args.launches > 1:
        if env_world() > 1:
            p.exit(2, "bench.collectives: --launches K starts its own mpiexec launches; run it without mpiexec\n")
        sys.exit(run_launches(args, argv))

    comm = Communicator()
    n, rank = comm.size, comm.rank
    mems = ("host",)
    if args.device == "gpu":
        backend.set_device("gpu")
        gpu = select_gpu(comm.mpi)
        mems = ("host", "device")
    ops = OPS if args.op == "all" else tuple(args.op.split(","))
    sizes = parse_sizes(args.sizes)
    ceiling = measure_ceiling(comm, min(max(sizes), 64 << 20))
    raw, raw_note = fit_model(comm, max(sizes))
    rows = []
    for op in ops:
        algos = args.algo.split(",") if args.algo else ["auto", *cost.algorithms(op), "mpi", FLOOR]
        rows += sweep(comm, op, algos, sizes, args, mems)
        if rank == 0:
            print(f"# {op} done", file=sys.stderr, flush=True)
    abg = fit_rows([r for r in rows if r["mem"] == "host"], n)
    for r in rows:
        if r["algo"] not in ("mpi", FLOOR) and r["mem"] == "host":     # the model is of host memory
            r["model_us"] = cost.predict(r["op"], r["chosen"], n, r["bytes"], abg) * 1e6
    meta = dict(ranks=n, mpi=MPI.Get_library_version().splitlines()[0].strip(), numpy=np.__version__,
                python=platform.python_version(), dtype=args.dtype, inplace=args.inplace,
                alpha_us=abg[0] * 1e6, beta_ns_per_B=abg[1] * 1e9, gamma_ns_per_B=abg[2] * 1e9,
                sendrecv_alpha_us=raw[0] * 1e6, sendrecv_beta_ns_per_B=raw[1] * 1e9,
                add_gamma_ns_per_B=raw[2] * 1e9, auto_params=cost.params(), **ceiling)
    if args.device == "gpu":
        meta.update(device="device double (emulated)" if backend.emulated() else "CuPy", gpu=gpu,
                    gpus=backend.device_count(), cuda_aware=cuda_aware(), cuda_aware_source=cuda_aware_source())
    if rank == 0:
        def abg_text(a, b, g):
            bw = lambda x: f"{1 / x / 1e9:.2f} GB/s" if x > 0 else "-"
            return f"alpha {a * 1e6:.2f} us, beta {b * 1e9:.3f} ns/B ({bw(b)}), gamma {g * 1e9:.3f} ns/B ({bw(g)})"
        print(f"# bench.collectives: {n} ranks, {meta['mpi']}, numpy {meta['numpy']}, {args.dtype}, "
              f"{'in place' if args.inplace else 'out of place'}, {args.rounds} interleaved rounds per size")
        print(f"# ceiling, every rank at once over {ceiling['ceiling_bytes'] >> 20} MiB: memcpy "
              f"{ceiling['memcpy_GBps']:.2f} GB/s, add (c = a + b) {ceiling['add_GBps']:.2f} GB/s per rank")
        print(f"# model fitted to the hand-written algorithms' times (model_us): {abg_text(*abg)}")
        print(f"#   to make algo=auto use it: ENGINE_COMM_COST={abg[0]:.3g},{abg[1]:.3g},{abg[2]:.3g} "
              f"(now {','.join(f'{v:.3g}' for v in cost.params())})")
        print(f"# raw library and memory ({raw_note}): {abg_text(*raw)}")
        if args.device == "gpu":
            print(f"# device rows: {meta['device']}, {meta['gpus']} GPUs (local rank % GPUs), MPI "
                  f"{'CUDA-aware: device buffers to MPI' if meta['cuda_aware'] else 'not CUDA-aware: staged via pinned host buffers'}"
                  f" ({meta['cuda_aware_source']}); model_us is of host rows only")
        for op in ops:
            print_table(op, [r for r in rows if r["op"] == op], n)
        if n == 2:
            print("\n" + "\n".join(goal_summary(rows)))
        if args.json:
            atomic_write_json(args.json, {"meta": meta, "rows": rows})
        if args.plot:
            plot(args.plot, rows, meta)


if __name__ == "__main__":
    main()
