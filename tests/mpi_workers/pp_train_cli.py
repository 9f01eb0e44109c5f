"""train.py with --pp P --micro-batches M --schedule S (alone, with --dp 2, ZeRO 1, grad
accumulation, checkpoints, --trace) in ONE 4-rank launch:

    mpiexec -n 4 python tests/mpi_workers/pp_train_cli.py OUT_DIR DATA [train.py flags...]

As tests/mpi_workers/sp_train_cli.py: each case calls train.main(argv) on a sub-communicator
of the world (train.Mesh gets world=...), so pairs (pp = 2) run two at a time and the
4-rank cases (pp = 4, pp = 2 x dp = 2) take the whole world; a case's metrics go to
OUT_DIR/<tag>.jsonl for the test to compare with the one-process references. Rounds:

    singletons  ref4 (rank 0, 4 layers, checkpoints at 2, 4), ref8 (rank 1, 8 layers),
                ref4-ga2 (rank 2, --grad-accum 2)
    pairs       pp=2 with each schedule (4 layers); pp2-1f1b saves steps 2 and 4;
                pp2-drop (dropout 0.1, saves steps 2, 4; its own masks per rank)
    world       pp=4 with each schedule (interleaved: 8 layers, v = 2), pp=2 x dp=2 with each
                schedule, ZeRO 1 and 0, zb-h1 saving steps 2 and 4, gpipe with --trace,
                1f1b with --grad-accum 2
    resumes     the same layout (pp2-1f1b, pp2-drop: bitwise), pp=2 -> dp=2 ZeRO 1,
                pp=2 x dp=2 -> pp=4 and -> one process, one process -> pp=2
    bad input   every rank stops with exit code 2 and the same line (train.env_rank is
                patched to 0 so every rank prints what rank 0 prints), writing nothing

Rank 0 prints "CASE <tag> rc=<largest rc of the group>" per good case,
"BAD <tag> rcs=<rc of every rank> lines=<stderr lines of every rank, JSON>" per bad one,
then "DONE". train.py's own log goes to a buffer (its tail is printed if a case fails);
the start-up matmul that measures peak FLOP/s is skipped (MFU is not under test).
"""
import contextlib
import io
import json
import os
import sys

import train
from collectives import Communicator, Mesh

# train.py arms the collectives' watchdog (ENGINE_COMM_TIMEOUT) in its environment when the job
# has several ranks; set it before any Communicator exists, so every rank (including one idle
# in an earlier round) builds its communicators alike: a hang becomes an error naming the rank
os.environ["ENGINE_COMM_TIMEOUT"] = "120"
world = Communicator()
R = world.rank
OUT, DATA, COMMON = sys.argv[1], sys.argv[2], sys.argv[3:]
train.measure_peak_flops = lambda dtype: 1e9
L8 = ["--n-layer", "8"]
CKPT = ["--ckpt-interval", "2"]


def run(tag, group, args, quiet=False):
    """train.main on the ranks of `group` (a Communicator, the case's world): (rc, its stderr)."""
    train.Mesh = lambda **kw: Mesh(world=group, **kw)
    argv = ["--data", DATA, *COMMON, *args, "--out-dir", os.path.join(OUT, tag),
            "--metrics", os.path.join(OUT, tag + ".jsonl")]
    log, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
        rc = train.main(argv)
    if rc != 0 and not quiet:
        print(f"rank {R} case {tag} rc={rc}\n{log.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}", flush=True)
    return rc, err.getvalue()


def round_(cases):
    """cases: {tag: (world ranks, args)}; every rank runs the case it belongs to, at once."""
    for color, (tag, (ranks, args)) in enumerate(cases.items()):
        if R in ranks:
            mine, group = tag, world.split(color, key=ranks.index(R))
            break
    else:
        mine, group = None, world.split(None)
    rc = run(mine, group, cases[mine][1])[0] if mine else 0
    rcs = world.mpi.allgather((mine, rc))                     # small metadata
    if R == 0:
        for tag in cases:
            print(f"CASE {tag} rc={max(r for t, r in rcs if t == tag)}", flush=True)


def step(tag, k):
    return os.path.join(OUT, tag, f"step_{k}")


ALL, A, B = [0, 1, 2, 3], [0, 1], [2, 3]
round_({"ref4": ([0], CKPT), "ref8": ([1], L8), "ref4-ga2": ([2], ["--grad-accum", "2"])})
round_({"pp2-gpipe": (A, ["--pp", "2", "--schedule", "gpipe", "--micro-batches", "4"]),
        "pp2-1f1b": (B, ["--pp", "2", "--schedule", "1f1b", *CKPT])})                        # m = pp = 2
round_({"pp2-interleaved": (A, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2"]),
        "pp2-zb-h1": (B, ["--pp", "2", "--schedule", "zb-h1", "--micro-batches", "4"])})
round_({"pp2-drop": (A, ["--pp", "2", "--dropout", "0.1", *CKPT])})
for tag, args in (("pp4-gpipe", ["--pp", "4", "--schedule", "gpipe"]),
                  ("pp4-1f1b", ["--pp", "4", "--schedule", "1f1b", "--micro-batches", "8"]),
                  ("pp4-interleaved", ["--pp", "4", "--schedule", "interleaved", "--virtual-stages", "2", *L8]),
                  ("pp4-zb-h1", ["--pp", "4", "--schedule", "zb-h1", "--micro-batches", "8"]),
                  ("pp2dp2-gpipe-trace", ["--pp", "2", "--dp", "2", "--schedule", "gpipe",
                                          "--trace", os.path.join(OUT, "trace.json")]),
                  ("pp2dp2-1f1b-z1", ["--pp", "2", "--dp", "2", "--schedule", "1f1b", "--zero", "1",
                                      "--micro-batches", "4"]),
                  ("pp2dp2-interleaved-z1", ["--pp", "2", "--dp", "2", "--schedule", "interleaved",
                                             "--virtual-stages", "2", "--zero", "1"]),
                  ("pp2dp2-zb-h1-z1", ["--pp", "2", "--dp", "2", "--schedule", "zb-h1", "--zero", "1", *CKPT]),
                  ("pp2dp2-1f1b-ga2", ["--pp", "2", "--dp", "2", "--grad-accum", "2"])):
    round_({tag: (ALL, args)})
round_({"resume-pp2": (A, ["--pp", "2", "--resume", step("pp2-1f1b", 2)]),
        "resume-pp2-to-dp2": (B, ["--dp", "2", "--zero", "1", "--resume", step("pp2-1f1b", 2)])})
round_({"resume-pp2-drop": (A, ["--pp", "2", "--dropout", "0.1", "--resume", step("pp2-drop", 2)]),
        "resume-1-to-pp2": (B, ["--pp", "2", "--schedule", "zb-h1", "--resume", step("ref4", 2)])})
round_({"resume-pp2dp2-to-pp4": (ALL, ["--pp", "4", "--schedule", "gpipe", "--resume", step("pp2dp2-zb-h1-z1", 2)])})
round_({"resume-pp2dp2-to-1": ([0], ["--resume", step("pp2dp2-zb-h1-z1", 4)])})

train.env_rank = lambda: 0                     # every rank prints the line rank 0 would print
for tag, args in (("pp-over-layers", ["--pp", "4", "--n-layer", "2"]),
                  ("micro-batch-split", ["--pp", "2", "--dp", "2", "--micro-batches", "3"]),
                  ("interleaved-layers", ["--pp", "4", "--schedule", "interleaved", "--virtual-stages", "2"]),
                  ("virtual-not-interleaved", ["--pp", "4", "--virtual-stages", "2"]),
                  ("zero2", ["--pp", "2", "--dp", "2", "--zero", "2"]),
                  ("sp", ["--pp", "2", "--sp", "2"]),
                  ("micro-batches-pp1", ["--dp", "4", "--micro-batches", "2"])):
    rc, err = run(tag, world, args, quiet=True)
    got = world.mpi.gather((rc, err.strip().splitlines()), root=0)
    if R == 0:
        print(f"BAD {tag} rcs={[g[0] for g in got]} lines={json.dumps([g[1] for g in got])}", flush=True)
world.barrier()
if R == 0:
    print("DONE", flush=True)
