"""train.py --tp T (alone, with sequence-parallel regions, with dp and ZeRO, checkpoints and
resumes across tp) in ONE 4-rank launch:

    mpiexec -n 4 python tests/mpi_workers/tp_train_cli.py OUT_DIR DATA [train.py flags...]

Rounds (ranks): ref [0] and tp2 [2, 3] (checkpoints at 2 and 4 each); tp4 with
--tp-token-shards and --vocab-granule 4 [0-3] (saves 2 and 4); resumes: tp4 step 2 -> tp2 [0, 1],
tp2 step 2 -> one process [2]; one process step 2 -> tp2 x dp2 ZeRO 3 [0-3]; bad layouts on the
whole world (train.env_rank patched to 0: every rank prints what rank 0 would). Output:
train_cases.py's "CASE", "BAD" and "DONE" lines.
"""
import sys

import train
from train_cases import Launch

launch = Launch(sys.argv)
CKPT = ["--ckpt-interval", "2"]


def step(tag, k):
    return launch.path(tag, f"step_{k}")


launch.round({"ref": ([0], CKPT), "tp2": ([2, 3], ["--tp", "2", *CKPT])})
launch.round({"tp4-tokens": ([0, 1, 2, 3], ["--tp", "4", "--tp-token-shards", "--vocab-granule", "4", *CKPT])})
launch.round({"resume-tp4-to-tp2": ([0, 1], ["--tp", "2", "--resume", step("tp4-tokens", 2)]),
              "resume-tp2-to-1": ([2], ["--resume", step("tp2", 2)])})
launch.round({"resume-1-to-tp2dp2-z3": ([0, 1, 2, 3], ["--tp", "2", "--dp", "2", "--zero", "3",
                                                       "--resume", step("ref", 2)])})
train.env_rank = lambda: 0
for tag, args in (("tp-heads", ["--tp", "4", "--n-head", "2"]),
                  ("tp-tokens-block", ["--tp", "4", "--tp-token-shards", "--block-size", "18"]),
                  ("tp-tokens-pp", ["--tp", "2", "--pp", "2", "--tp-token-shards"])):
    launch.bad(tag, args)
launch.done()
