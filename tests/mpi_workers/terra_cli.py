"""The Terraformer (models/terraformer.py) under dp and every ZeRO stage, in ONE 3-rank launch:

    mpiexec -n 3 python tests/mpi_workers/terra_cli.py OUT_DIR DATA [train.py flags...]

Every case trains with dropout 0.1, LSH attention (its rotations drawn each step) and the sparse
loss layer, and writes its last checkpoint, so the test compares losses, gradient norms,
validation losses and the final parameters with the one-process references: ref (reversible,
copied streams), ref-split (reversible, split streams, sparse FFN and sparse QKV) and ref-plain
(not reversible: ZeRO-3 then wraps each block as for GPT). Rounds (ranks):

    1  ref [0], dp2-z3 [1, 2]
    2  ref-split [0], dp2-z1-split [1, 2]
    3  ref-plain [0], dp2-z3-plain [1, 2]
    4  dp2-z2-split [1, 2]
    5  dp2-z0 [0, 1]

Output: train_cases.py's "CASE" and "DONE" lines.
"""
import sys

from train_cases import Launch

launch = Launch(sys.argv)
SPLIT = ["--rev-streams", "split", "--n-embd", "32", "--ffn-sparsity", "8", "--ffn-lowrank", "4",
         "--ffn-temperature", "0.5", "--ffn-hard-prob", "0.5", "--qkv-modules", "4"]
PLAIN = ["--no-reversible"]
launch.round({"ref": ([0], []), "dp2-z3": ([1, 2], ["--dp", "2", "--zero", "3"])})
launch.round({"ref-split": ([0], SPLIT), "dp2-z1-split": ([1, 2], ["--dp", "2", "--zero", "1", *SPLIT])})
launch.round({"ref-plain": ([0], PLAIN), "dp2-z3-plain": ([1, 2], ["--dp", "2", "--zero", "3", *PLAIN])})
launch.round({"dp2-z2-split": ([1, 2], ["--dp", "2", "--zero", "2", *SPLIT])})
launch.round({"dp2-z0": ([0, 1], ["--dp", "2", "--zero", "0"])})
launch.done()
