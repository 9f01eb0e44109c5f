"""Pipeline bubble and activation memory per schedule, beside the papers' theory.

    mpiexec -n 2 python -m bench.pipeline [--json FILE] [--plot FILE.png] [--trace FILE.json]
                                          [--micro-batches 2,4,8] [--sim-pp 4,8] [--steps 3]

Bubble fraction = idle / total: 1 - (sum over ranks of the compute time: F, B, W) / (P x step
time). Theory (t_F, t_B, t_W forward, input-gradient, weight-gradient time of a stage):
GPipe and 1F1B (p-1)/(m+p-1) (Huang et al. 2019; Narayanan et al. 2021); interleaved with v
chunks (p-1)/(v m + p-1) (Narayanan et al. 2021: 1/v of the bubble time); ZB-H1
(p-1)(t_F+t_B-t_W) / (m(t_F+t_B+t_W) + (p-1)(t_F+t_B-t_W)) (Qi et al. 2023), about a third of
1F1B's when the three are equal (the theory column uses the measured t's).

Rows with simulated=false are REAL runs on the P ranks of this launch (a GPT of 8 layers,
n_embd 768, T 64, 2 sequences per micro-batch, every rank one BLAS thread). The width is
chosen so that matmuls dominate, as in the papers' models, where t_F ~ t_B ~ t_W: at
n_embd 128 the elementwise work (GELU, LayerNorm, softmax) made t_F 1.55x t_W (8.8 against 5.6 ms), and ZB-H1's
advantage, which is t_W moved into the bubble, shrank accordingly (its theory column
follows the measured t's either way). Rows with simulated=true replay the schedule's lists with
parallel/pipeline/schedules.py's simulator for larger P, with per-action costs measured here at P:
a stage of the same model over p ranks costs (P/p) x the measured F, B, W of a stage (so the
model is the same and only the cut changes), plus the measured one-way time of an activation
message. Peak activation bytes: real rows, tracemalloc's bytes held at the end of each
compute action minus those held before the step, the largest over ranks (one separate,
untimed step); simulated rows, the most micro-batch activations any rank holds times the
bytes of one (measured: GPipe's peak / m), scaled by P/p.

JSON rows: schedule, pp, micro_batches, virtual_stages, bubble_measured, bubble_theory,
peak_activation_bytes, simulated. The plot draws each schedule as a timeline like the
papers' figures (simulated P=4 and M=8 on top, the real P-rank runs below).
"""
import argparse
import sys
import time
import tracemalloc

import numpy as np

from collectives import Communicator
from engine.io import atomic_write_json
from models.gpt import GPT, GPTConfig
from parallel.pipeline import PipelineConfigError, PipelineEngine, PipelineStage, check_config
from parallel.pipeline.schedules import COMPUTE, SCHEDULES, bubble_of, bubble_theory, build, held, simulate
from parallel.trace import KINDS, gather_events

COLORS = {"F": "#4c78a8", "B": "#59a14f", "W": "#b07aa1"}


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json"), ap.add_argument("--plot"), ap.add_argument("--trace")
    ap.add_argument("--micro-batches", default="2,4,8")
    ap.add_argument("--sim-pp", default="4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--mb-rows", type=int, default=2, help="sequences per micro-batch")
    ap.add_argument("--virtual-stages", type=int, default=2)
    return ap.parse_args(argv)


def one_way_seconds(comm, shape, reps=10):
    """Half the round trip of an activation (B/m, T, C) between pp ranks 0 and 1."""
    if comm.size < 2 or comm.rank > 1:
        return 0.0
    buf = np.zeros(shape, np.float32)
    t0 = time.perf_counter()
    for _ in range(reps):
        if comm.rank == 0:
            comm.send(buf, 1), comm.recv(buf, 1)
        else:
            comm.recv(buf, 0), comm.send(buf, 0)
    return (time.perf_counter() - t0) / (2 * reps)


def run_case(comm, cfg, name, m, v, args, memory=False):
    """(bubble per step, {kind: mean seconds}, peak bytes, tracer events) of a real run."""
    stage = PipelineStage(GPT(cfg, np.random.default_rng(0)), comm.rank, comm.size, v)
    eng = PipelineEngine(comm, cfg, stage, name, m, v)
    rng = np.random.default_rng(1)
    B = m * args.mb_rows
    x = rng.integers(0, cfg.vocab_size, size=(B, cfg.block_size))
    eng.step_grads(x, x)                                             # warm-up
    bubbles, costs, last = [], {k: [] for k in COMPUTE}, None
    for _ in range(args.steps):
        stage.zero_grad()
        tr = eng.start_trace()                                       # barrier, then the origin
        t0 = time.perf_counter()
        eng.step_grads(x, x)
        wall = np.array([time.perf_counter() - t0])
        comm.all_reduce(wall, op="max")
        ev = tr.array()
        busy = np.array([sum(e[4] - e[3] for e in ev if KINDS[int(e[0])] in COMPUTE)])
        comm.all_reduce(busy)
        bubbles.append(1.0 - busy[0] / (comm.size * wall[0]))
        for e in ev:
            k = KINDS[int(e[0])]
            if k in COMPUTE:
                costs[k].append((e[4] - e[3]) * v)                  # a whole stage's worth
        last = tr
    peak = 0
    if memory:
        stage.zero_grad()
        samples = []
        eng.tracer = None
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        eng.on_compute = lambda a: samples.append(tracemalloc.get_traced_memory()[0] - base)
        eng.step_grads(x, x)
        tracemalloc.stop()
        eng.on_compute = None
        peak = np.array([max(samples)], dtype=np.float64)
        comm.all_reduce(peak, op="max")
        peak = int(peak[0])
    mean = {k: float(np.mean(c)) if c else 0.0 for k, c in costs.items()}
    local = np.array([mean[k] for k in COMPUTE])
    comm.all_reduce(local, op="avg")
    return float(np.median(bubbles)), dict(zip(COMPUTE, local.tolist())), peak, last


def main(argv=None):
    args = parse(argv)
    comm = Communicator()
    P, v = comm.size, args.virtual_stages
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    cfg = GPTConfig(block_size=args.seq, vocab_size=64, n_layer=args.n_layer, n_head=4, n_embd=args.n_embd)
    Ms = [int(s) for s in args.micro_batches.split(",")]
    try:
        if P < 2:
            raise PipelineConfigError("bench.pipeline: launch with mpiexec -n 2 (or more): the pipeline needs pp >= 2")
        for name in SCHEDULES:
            for m in Ms:
                if name != "interleaved" or m % P == 0:
                    check_config(cfg.n_layer, P, name, m, v if name == "interleaved" else 1, m * args.mb_rows)
    except PipelineConfigError as e:
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)

    rows, measured_costs, per_mb_bytes, traces = [], {}, None, {}
    for name in SCHEDULES:
        vv = v if name == "interleaved" else 1
        for m in Ms:
            if name == "interleaved" and m % P:
                continue
            bubble, cost, peak, tr = run_case(comm, cfg, name, m, vv, args, memory=True)
            if name == "gpipe" and m == max(Ms):
                per_mb_bytes = peak / m
            if name == "1f1b":
                measured_costs["FBW"] = cost["F"], cost["B"]
            if name == "zb-h1":
                measured_costs["split"] = cost["F"], cost["B"], cost["W"]
            tf, tb, tw = measured_costs.get("split", (1.0, 1.0, 1.0))
            theory = bubble_theory(name, P, m, vv, tf, tb, tw)
            rows.append(dict(schedule=name, pp=P, micro_batches=m, virtual_stages=vv, bubble_measured=bubble,
                             bubble_theory=theory, peak_activation_bytes=peak, simulated=False))
            traces[(name, m)] = gather_events(tr, comm)
    # zb-h1's theory needs its own measured t_F, t_B, t_W: fill it in now for its rows
    tf, tb, tw = measured_costs["split"]
    for r in rows:
        if r["schedule"] == "zb-h1":
            r["bubble_theory"] = bubble_theory("zb-h1", P, r["micro_batches"], 1, tf, tb, tw)
    act = (args.mb_rows, args.seq, args.n_embd)
    comm_s = np.array([one_way_seconds(comm, act)])
    comm.all_reduce(comm_s, op="max")
    tf1, tbw = measured_costs["FBW"]
    for p in [int(s) for s in args.sim_pp.split(",") if s]:
        scale = P / p
        for name in SCHEDULES:
            vv = v if name == "interleaved" else 1
            for m in sorted(set(Ms + [4 * p])):
                if name == "interleaved" and (m % p or args.n_layer % (p * vv)):
                    continue
                lists = build(name, p, m, vv)

                def cost(a, r, name=name, vv=vv):
                    if a.kind == "F":
                        return tf1 * scale / vv
                    if a.kind == "B":
                        return (tb if name == "zb-h1" else tbw) * scale / vv
                    return tw * scale if a.kind == "W" else 0.0
                tl = simulate(lists, cost, comm=float(comm_s[0]))
                rows.append(dict(schedule=name, pp=p, micro_batches=m, virtual_stages=vv,
                                 bubble_measured=bubble_of(tl), bubble_theory=bubble_theory(name, p, m, vv, tf, tb, tw),
                                 peak_activation_bytes=int(max(held(a) for a in lists) * per_mb_bytes * scale / vv),
                                 simulated=True))
    if comm.rank == 0:
        report(rows, measured_costs, float(comm_s[0]), P, args)
        if args.json:
            atomic_write_json(args.json, rows)
        if args.plot:
            plot(args.plot, traces, P, max(Ms), tf1, tbw, tf, tb, tw, v)
    if args.trace:
        from parallel.trace import write_chrome_trace
        name, m = "zb-h1", max(Ms)
        stage = PipelineStage(GPT(cfg, np.random.default_rng(0)), comm.rank, P, 1)
        eng = PipelineEngine(comm, cfg, stage, name, m, 1)
        x = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(m * args.mb_rows, cfg.block_size))
        eng.start_trace()
        eng.step_grads(x, x)
        write_chrome_trace(args.trace, eng.tracer, comm)
        say(f"wrote {args.trace} (zb-h1, m={m})")


def report(rows, costs, comm_s, P, args):
    tf, tbw = costs["FBW"]
    _, tb, tw = costs["split"]
    print(f"pipeline bench: P={P} real ranks; GPT n_layer={args.n_layer} n_embd={args.n_embd} T={args.seq}, "
          f"{args.mb_rows} sequences per micro-batch, float32")
    print(f"measured per stage: t_F {tf * 1e3:.2f} ms, t_B+W {tbw * 1e3:.2f} ms (1f1b); split t_B {tb * 1e3:.2f} ms, "
          f"t_W {tw * 1e3:.2f} ms (zb-h1); one activation message {comm_s * 1e6:.0f} us")
    print(f"{'schedule':<12}{'pp':>3}{'M':>4}{'v':>3}  {'bubble':>7} {'theory':>7} {'ratio':>6}  "
          f"{'peak act KiB':>12}  source")
    for r in rows:
        ratio = r["bubble_measured"] / r["bubble_theory"] if r["bubble_theory"] else float("nan")
        print(f"{r['schedule']:<12}{r['pp']:>3}{r['micro_batches']:>4}{r['virtual_stages']:>3}  "
              f"{r['bubble_measured']:7.3f} {r['bubble_theory']:7.3f} {ratio:6.2f}  "
              f"{r['peak_activation_bytes'] / 1024:12.1f}  {'simulated' if r['simulated'] else 'measured'}")
    for p in sorted({r["pp"] for r in rows}):
        for m in sorted({r["micro_batches"] for r in rows if r["pp"] == p}):
            got = {r["schedule"]: r for r in rows if r["pp"] == p and r["micro_batches"] == m}
            if {"1f1b", "gpipe", "zb-h1"} <= got.keys():
                zb = got["zb-h1"]["bubble_measured"] / max(got["1f1b"]["bubble_measured"], 1e-12)
                mem = got["1f1b"]["peak_activation_bytes"] / max(got["gpipe"]["peak_activation_bytes"], 1)
                print(f"pp={p} M={m}: zb-h1 bubble / 1f1b = {zb:.2f} (goal <= 0.40); 1f1b peak / gpipe = "
                      f"{mem:.2f} (goal <= p/m = {min(p, m) / m:.2f})")


def plot(path, traces, P, m, tf, tbw, tf2, tb, tw, v):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2 * len(SCHEDULES), 1, figsize=(13, 2.2 * len(SCHEDULES) * 2 * 0.75))
    ax_i = 0
    for name in SCHEDULES:                                           # simulated P=4, M=8, unit-ish costs
        vv = v if name == "interleaved" else 1
        p4, m8 = 4, 8
        tl = simulate(build(name, p4, m8, vv), lambda a, r, name=name, vv=vv: (
            (tf2 if a.kind == "F" else (tb if name == "zb-h1" else tbw) if a.kind == "B" else tw) / vv
            if a.kind in COMPUTE else 0.0))
        draw(axes[ax_i], [[(a.kind, a.mb, a.chunk, s, e) for a, s, e in t if a.kind in COMPUTE] for t in tl],
             f"{name}: simulated p={p4}, m={m8} (costs measured at P={P}), bubble {bubble_of(tl):.2f}")
        ax_i += 1
    for name in SCHEDULES:
        key = next((k for k in sorted(traces, key=lambda k: -k[1]) if k[0] == name), None)
        per_rank = [[(KINDS[int(e[0])], int(e[1]), int(e[2]), e[3], e[4]) for e in arr
                     if KINDS[int(e[0])] in COMPUTE] for arr in traces[key]]
        draw(axes[ax_i], per_rank, f"{name}: measured P={P}, m={key[1]} (last timed step)")
        ax_i += 1
    from matplotlib.patches import Patch
    labels = {"F": "forward", "B": "backward (B+W unless split)", "W": "weight grad"}
    axes[0].legend(handles=[Patch(color=c, label=labels[k]) for k, c in COLORS.items()],
                   loc="upper right", fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def draw(ax, per_rank, title):
    t0 = min((e[3] for r in per_rank for e in r), default=0.0)
    for r, evs in enumerate(per_rank):
        for kind, mb, c, s, e in evs:
            ax.barh(r, e - s, left=s - t0, color=COLORS[kind], edgecolor="white", height=0.8,
                    alpha=1.0 if c == 0 else 0.6)
            ax.text((s + e) / 2 - t0, r, str(mb), ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(per_rank)), [f"rank {r}" for r in range(len(per_rank))], fontsize=7)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="x", labelsize=6)


if __name__ == "__main__":
    main()
