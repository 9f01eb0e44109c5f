"""train.py with --sp N --sp-attention {ring,ulysses} (alone, with --dp 2 and ZeRO) in ONE launch:

    mpiexec -n 4 python tests/mpi_workers/sp_train_cli.py OUT_DIR DATA [train.py flags...]

Each case calls train.main(argv) on a sub-communicator of the world (train.Mesh gets
world=...), so sp = 2 (two pairs at once), sp = 4 and dp = 2 x sp = 2 all run in this
4-rank launch; a case's metrics go to OUT_DIR/<tag>.jsonl and the test compares them
with the one-process reference runs ("ref", "ref-ga2"). Rounds, every rank taking part:

    singletons  ref (rank 0), ref-ga2 (rank 1: --grad-accum 2)
    pairs       sp2-ring-z0 | sp2-ulysses-z0,  sp2-ring-z3 | sp2-ulysses-z1
    world       sp4-ring-z0, sp4-ulysses-z3 (3 heads over 4 ranks: uneven), dp2sp2-ring-z1,
                dp2sp2-ulysses-z3, dp2sp2-ring-z3 (checkpoints at steps 2, 4), dp2sp2-ulysses-z2-ga2
    pairs       resume dp2sp2-ring-z3's step 2 at --dp 2 --zero 1 | at --sp 2 ulysses --zero 2
    bad input   block_size not divisible as the split needs (ring: by 2 sp; ulysses: by sp)

Rank 0 prints "CASE <tag> rc=<largest rc of the group>" per good case and
"BAD <tag> rcs=<rc of every rank> lines=<stderr lines of every rank, JSON>" per bad one,
then "DONE". train.py's own log goes to a buffer (its tail is printed if a case fails);
the start-up matmul that measures peak FLOP/s is skipped (MFU is not under test).
"""
import contextlib
import io
import json
import os
import sys

import numpy as np

import train
from collectives import Communicator, Mesh

world = Communicator()
R = world.rank
OUT, DATA, COMMON = sys.argv[1], sys.argv[2], sys.argv[3:]
train.measure_peak_flops = lambda dtype: 1e9


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


ALL = [0, 1, 2, 3]
round_({"ref": ([0], []), "ref-ga2": ([1], ["--grad-accum", "2"])})
round_({"sp2-ring-z0": ([0, 1], ["--sp", "2"]),
        "sp2-ulysses-z0": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses"])})
round_({"sp2-ring-z3": ([0, 1], ["--sp", "2", "--zero", "3"]),
        "sp2-ulysses-z1": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses", "--zero", "1"])})
for tag, args in (("sp4-ring-z0", ["--sp", "4"]),
                  ("sp4-ulysses-z3", ["--sp", "4", "--sp-attention", "ulysses", "--zero", "3"]),
                  ("dp2sp2-ring-z1", ["--dp", "2", "--sp", "2", "--zero", "1"]),
                  ("dp2sp2-ulysses-z3", ["--dp", "2", "--sp", "2", "--sp-attention", "ulysses", "--zero", "3"]),
                  ("dp2sp2-ring-z3", ["--dp", "2", "--sp", "2", "--zero", "3", "--ckpt-interval", "2"]),
                  ("dp2sp2-ulysses-z2-ga2", ["--dp", "2", "--sp", "2", "--sp-attention", "ulysses", "--zero", "2",
                                             "--grad-accum", "2"])):
    round_({tag: (ALL, args)})
STEP2 = os.path.join(OUT, "dp2sp2-ring-z3", "step_2")           # saved over dp x sp = 4 ranks at stage 3
round_({"resume-dp2-z1": ([0, 1], ["--dp", "2", "--zero", "1", "--resume", STEP2]),
        "resume-sp2-ulysses-z2": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses", "--zero", "2",
                                           "--resume", STEP2])})

for tag, args in (("ring-12", ["--sp", "4", "--block-size", "12"]),
                  ("ulysses-10", ["--sp", "4", "--sp-attention", "ulysses", "--block-size", "10"])):
    rc, err = run(tag, world, args, quiet=True)
    got = world.mpi.gather((rc, err.strip().splitlines()), root=0)
    if R == 0:
        print(f"BAD {tag} rcs={[g[0] for g in got]} lines={json.dumps([g[1] for g in got])}", flush=True)
world.barrier()
if R == 0:
    print("DONE", flush=True)
