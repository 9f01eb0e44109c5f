"""train.py with --pp P --micro-batches M --schedule S (alone, with --dp 2, ZeRO 1, --sp 2, grad
accumulation, checkpoints, --trace) in ONE 4-rank launch:

    mpiexec -n 4 python tests/mpi_workers/pp_train_cli.py OUT_DIR DATA [train.py flags...]

As tests/mpi_workers/sp_train_cli.py: each case runs train.main on a sub-communicator of the
world (tests/mpi_workers/train_cases.py), so pairs (pp = 2) run two at a time and the 4-rank
cases (pp = 4, pp = 2 x dp = 2, pp = 2 x sp = 2) take the whole world; the test compares each
case's metrics with the one-process references. Rounds:

    singletons  ref4 (rank 0, 4 layers, checkpoints at 2, 4), ref8 (rank 1, 8 layers),
                ref4-ga2 (rank 2, --grad-accum 2)
    pairs       pp=2 with each schedule (4 layers); pp2-1f1b saves steps 2 and 4;
                pp2-drop (dropout 0.1, saves steps 2, 4; one process's masks, engine/random.py)
    world       pp=4 with each schedule (interleaved: 8 layers, v = 2), pp=2 x dp=2 with each
                schedule, ZeRO 1 and 0, zb-h1 saving steps 2 and 4, gpipe with --trace,
                1f1b with --grad-accum 2; pp=2 x sp=2: ring 1f1b (saving steps 2 and 4),
                ulysses gpipe ZeRO 1 --grad-accum 2, ring zb-h1 (B/W split) ZeRO 1, ulysses interleaved
    resumes     the same layout (pp2-1f1b, pp2-drop: bitwise), pp=2 -> dp=2 ZeRO 1,
                pp=2 x dp=2 -> pp=4 and -> one process, one process -> pp=2 and -> pp=2 x sp=2,
                pp=2 x sp=2 -> one process and -> sp=2 ulysses ZeRO 2
    bad input   every rank stops with exit code 2 and the same line (train.env_rank is
                patched to 0 so every rank prints what rank 0 prints), writing nothing

Output: train_cases.py's "CASE", "BAD" and "DONE" lines.
"""
import sys

import train
from train_cases import Launch

launch = Launch(sys.argv)
L8 = ["--n-layer", "8"]
CKPT = ["--ckpt-interval", "2"]


def step(tag, k):
    return launch.path(tag, f"step_{k}")


ALL, A, B = [0, 1, 2, 3], [0, 1], [2, 3]
launch.round({"ref4": ([0], CKPT), "ref8": ([1], L8), "ref4-ga2": ([2], ["--grad-accum", "2"])})
launch.round({"pp2-gpipe": (A, ["--pp", "2", "--schedule", "gpipe", "--micro-batches", "4"]),
              "pp2-1f1b": (B, ["--pp", "2", "--schedule", "1f1b", *CKPT])})                  # m = pp = 2
launch.round({"pp2-interleaved": (A, ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2"]),
              "pp2-zb-h1": (B, ["--pp", "2", "--schedule", "zb-h1", "--micro-batches", "4"])})
launch.round({"pp2-drop": (A, ["--pp", "2", "--dropout", "0.1", *CKPT])})
for tag, args in (("pp4-gpipe", ["--pp", "4", "--schedule", "gpipe"]),
                  ("pp4-1f1b", ["--pp", "4", "--schedule", "1f1b", "--micro-batches", "8"]),
                  ("pp4-interleaved", ["--pp", "4", "--schedule", "interleaved", "--virtual-stages", "2", *L8]),
                  ("pp4-zb-h1", ["--pp", "4", "--schedule", "zb-h1", "--micro-batches", "8"]),
                  ("pp2dp2-gpipe-trace", ["--pp", "2", "--dp", "2", "--schedule", "gpipe",
                                          "--trace", launch.path("trace.json")]),
                  ("pp2dp2-1f1b-z1", ["--pp", "2", "--dp", "2", "--schedule", "1f1b", "--zero", "1",
                                      "--micro-batches", "4"]),
                  ("pp2dp2-interleaved-z1", ["--pp", "2", "--dp", "2", "--schedule", "interleaved",
                                             "--virtual-stages", "2", "--zero", "1"]),
                  ("pp2dp2-zb-h1-z1", ["--pp", "2", "--dp", "2", "--schedule", "zb-h1", "--zero", "1", *CKPT]),
                  ("pp2dp2-1f1b-ga2", ["--pp", "2", "--dp", "2", "--grad-accum", "2"]),
                  ("pp2sp2-ring-1f1b", ["--pp", "2", "--sp", "2", "--schedule", "1f1b", *CKPT]),
                  ("pp2sp2-ulysses-gpipe-z1-ga2", ["--pp", "2", "--sp", "2", "--sp-attention", "ulysses",
                                                   "--schedule", "gpipe", "--micro-batches", "4", "--zero", "1",
                                                   "--grad-accum", "2"]),
                  ("pp2sp2-ring-zb-h1-z1", ["--pp", "2", "--sp", "2", "--schedule", "zb-h1", "--micro-batches", "4",
                                            "--zero", "1"]),
                  ("pp2sp2-ulysses-interleaved", ["--pp", "2", "--sp", "2", "--sp-attention", "ulysses",
                                                  "--schedule", "interleaved", "--virtual-stages", "2"])):
    launch.round({tag: (ALL, args)})
launch.round({"resume-pp2": (A, ["--pp", "2", "--resume", step("pp2-1f1b", 2)]),
              "resume-pp2-to-dp2": (B, ["--dp", "2", "--zero", "1", "--resume", step("pp2-1f1b", 2)])})
launch.round({"resume-pp2-drop": (A, ["--pp", "2", "--dropout", "0.1", "--resume", step("pp2-drop", 2)]),
              "resume-1-to-pp2": (B, ["--pp", "2", "--schedule", "zb-h1", "--resume", step("ref4", 2)])})
launch.round({"resume-pp2dp2-to-pp4": (ALL, ["--pp", "4", "--schedule", "gpipe",
                                             "--resume", step("pp2dp2-zb-h1-z1", 2)])})
launch.round({"resume-1-to-pp2sp2": (ALL, ["--pp", "2", "--sp", "2", "--zero", "1", "--resume", step("ref4", 2)])})
launch.round({"resume-pp2dp2-to-1": ([0], ["--resume", step("pp2dp2-zb-h1-z1", 4)]),
              "resume-pp2sp2-to-1": ([1], ["--resume", step("pp2sp2-ring-1f1b", 2)]),
              "resume-pp2sp2-to-sp2": (B, ["--sp", "2", "--sp-attention", "ulysses", "--zero", "2",
                                           "--resume", step("pp2sp2-ring-1f1b", 2)])})

train.env_rank = lambda: 0                     # every rank prints the line rank 0 would print
for tag, args in (("pp-over-layers", ["--pp", "4", "--n-layer", "2"]),
                  ("micro-batch-split", ["--pp", "2", "--dp", "2", "--micro-batches", "3"]),
                  ("interleaved-layers", ["--pp", "4", "--schedule", "interleaved", "--virtual-stages", "2"]),
                  ("virtual-not-interleaved", ["--pp", "4", "--virtual-stages", "2"]),
                  ("zero2", ["--pp", "2", "--dp", "2", "--zero", "2"]),
                  ("pp-sp-block", ["--pp", "2", "--sp", "2", "--block-size", "14"]),
                  ("micro-batches-pp1", ["--dp", "4", "--micro-batches", "2"])):
    launch.bad(tag, args)
launch.done()
