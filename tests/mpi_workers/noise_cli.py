"""Dropout 0.1 and the sparse layers' noise under every kind of layout, in ONE 8-rank launch:

    mpiexec -n 8 python tests/mpi_workers/noise_cli.py OUT_DIR DATA [train.py flags...]

Every case trains with dropout 0.1 and a sparse FFN (hard-mask coin and Gumbel noise on;
``qkv`` cases add the sparse QKV layer, which refuses sp), and writes its last checkpoint, so
the test compares losses, gradient norms, validation losses AND the final parameters with the
one-process references ref, ref-ga2 (--grad-accum 2) and ref-qkv. The noise is counter-based
(engine/random.py), so each layout must draw exactly one process's numbers. Rounds (ranks):

    1  ref [0], ref-ga2 [1], ref-qkv [2], dp2-z1 [3,4], dp3-z3 [5,6,7]
    2  dp2sp2-ring-z2 [0-3], sp2-ulysses [4,5], pp2-gpipe [6,7]
    3  pp2-1f1b-ga2 [0,1], pp2-interleaved [2,3], pp2-zb-h1 [4,5], dp2-z2-ga2 [6,7]
    4  pp4-1f1b [0-3], dp2-qkv-z3 [4,5], sp2-ring-z3 [6,7]
    5  pp2dp2-qkv-z1 [0-3], sp4-ulysses-z1 [4-7]
    6  pp2sp2dp2-ring-1f1b-z1 [0-7]
    7  pp2sp2dp2-ulysses-interleaved-ga2 [0-7]

Output: train_cases.py's "CASE" and "DONE" lines.
"""
import sys

from train_cases import Launch

launch = Launch(sys.argv)
QKV = ["--qkv-modules", "4"]
GA2 = ["--grad-accum", "2"]
R = list(range(8))
launch.round({"ref": ([0], []), "ref-ga2": ([1], GA2), "ref-qkv": ([2], QKV),
              "dp2-z1": ([3, 4], ["--dp", "2", "--zero", "1"]),
              "dp3-z3": ([5, 6, 7], ["--dp", "3", "--zero", "3"])})
launch.round({"dp2sp2-ring-z2": (R[:4], ["--dp", "2", "--sp", "2", "--zero", "2"]),
              "sp2-ulysses": ([4, 5], ["--sp", "2", "--sp-attention", "ulysses"]),
              "pp2-gpipe": ([6, 7], ["--pp", "2", "--schedule", "gpipe", "--micro-batches", "4"])})
launch.round({"pp2-1f1b-ga2": ([0, 1], ["--pp", "2", *GA2]),
              "pp2-interleaved": ([2, 3], ["--pp", "2", "--schedule", "interleaved", "--virtual-stages", "2"]),
              "pp2-zb-h1": ([4, 5], ["--pp", "2", "--schedule", "zb-h1", "--micro-batches", "4"]),
              "dp2-z2-ga2": ([6, 7], ["--dp", "2", "--zero", "2", *GA2])})
launch.round({"pp4-1f1b": (R[:4], ["--pp", "4", "--micro-batches", "4"]),
              "dp2-qkv-z3": ([4, 5], ["--dp", "2", "--zero", "3", *QKV]),
              "sp2-ring-z3": ([6, 7], ["--sp", "2", "--zero", "3"])})
launch.round({"pp2dp2-qkv-z1": (R[:4], ["--pp", "2", "--dp", "2", "--zero", "1", *QKV]),
              "sp4-ulysses-z1": (R[4:], ["--sp", "4", "--sp-attention", "ulysses", "--zero", "1"])})
launch.round({"pp2sp2dp2-ring-1f1b-z1": (R, ["--pp", "2", "--sp", "2", "--dp", "2", "--zero", "1"])})
launch.round({"pp2sp2dp2-ulysses-interleaved-ga2": (R, ["--pp", "2", "--sp", "2", "--dp", "2", "--sp-attention",
                                                        "ulysses", "--schedule", "interleaved", "--virtual-stages",
                                                        "2", "--micro-batches", "2", *GA2])})
launch.done()
