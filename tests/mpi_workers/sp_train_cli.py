"""train.py with --sp N --sp-attention {ring,ulysses} (alone, with --dp 2 and ZeRO) in ONE launch:

    mpiexec -n 4 python tests/mpi_workers/sp_train_cli.py OUT_DIR DATA [train.py flags...]

Each case runs train.main on a sub-communicator of the world (tests/mpi_workers/train_cases.py,
which also arms the watchdog before any communicator exists), so sp = 2 (two pairs at once),
sp = 4 and dp = 2 x sp = 2 all run in this 4-rank launch; the test compares each case's
metrics with the one-process reference runs ("ref", "ref-ga2"). Rounds, every rank taking part:

    singletons  ref (rank 0), ref-ga2 (rank 1: --grad-accum 2)
    pairs       sp2-ring-z0 | sp2-ulysses-z0,  sp2-ring-z3 | sp2-ulysses-z1
    world       sp4-ring-z0, sp4-ulysses-z3 (3 heads over 4 ranks: uneven), dp2sp2-ring-z1,
                dp2sp2-ulysses-z3, dp2sp2-ring-z3 (checkpoints at steps 2, 4), dp2sp2-ulysses-z2-ga2
    pairs       resume dp2sp2-ring-z3's step 2 at --dp 2 --zero 1 | at --sp 2 ulysses --zero 2
    bad input   block_size not divisible as the split needs (ring: by 2 sp; ulysses: by sp)

Output: train_cases.py's "CASE", "BAD" and "DONE" lines.
"""
import sys

from train_cases import Launch

launch = Launch(sys.argv)
ALL = [0, 1, 2, 3]
launch.round({"ref": ([0], []), "ref-ga2": ([1], ["--grad-accum", "2"])})
launch.round({"sp2-ring-z0": ([0, 1], ["--sp", "2"]),
              "sp2-ulysses-z0": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses"])})
launch.round({"sp2-ring-z3": ([0, 1], ["--sp", "2", "--zero", "3"]),
              "sp2-ulysses-z1": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses", "--zero", "1"])})
for tag, args in (("sp4-ring-z0", ["--sp", "4"]),
                  ("sp4-ulysses-z3", ["--sp", "4", "--sp-attention", "ulysses", "--zero", "3"]),
                  ("dp2sp2-ring-z1", ["--dp", "2", "--sp", "2", "--zero", "1"]),
                  ("dp2sp2-ulysses-z3", ["--dp", "2", "--sp", "2", "--sp-attention", "ulysses", "--zero", "3"]),
                  ("dp2sp2-ring-z3", ["--dp", "2", "--sp", "2", "--zero", "3", "--ckpt-interval", "2"]),
                  ("dp2sp2-ulysses-z2-ga2", ["--dp", "2", "--sp", "2", "--sp-attention", "ulysses", "--zero", "2",
                                             "--grad-accum", "2"])):
    launch.round({tag: (ALL, args)})
STEP2 = launch.path("dp2sp2-ring-z3", "step_2")              # saved over dp x sp = 4 ranks at stage 3
launch.round({"resume-dp2-z1": ([0, 1], ["--dp", "2", "--zero", "1", "--resume", STEP2]),
              "resume-sp2-ulysses-z2": ([2, 3], ["--sp", "2", "--sp-attention", "ulysses", "--zero", "2",
                                                 "--resume", STEP2])})

for tag, args in (("ring-12", ["--sp", "4", "--block-size", "12"]),      # only rank 0 prints (train.env_rank)
                  ("ulysses-10", ["--sp", "4", "--sp-attention", "ulysses", "--block-size", "10"])):
    launch.bad(tag, args)
launch.done()
