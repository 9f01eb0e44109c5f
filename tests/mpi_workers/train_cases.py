"""Many train.py runs inside ONE mpiexec launch (shared by sp_train_cli.py and pp_train_cli.py).

    launch = Launch(sys.argv)          # argv: script OUT_DIR DATA [train.py flags common to every case]
    launch.round({"ref": ([0], []), "sp2": ([1, 2], ["--sp", "2"])})   # cases side by side
    launch.bad("sp-odd", ["--sp", "4", "--block-size", "10"])           # on the whole world
    launch.done()

Each case calls train.main(argv) on a sub-communicator of the world (train.Mesh gets
world=...), so small layouts run side by side and large ones take the whole world; a case's
checkpoints go to OUT_DIR/<tag>/, its metrics to OUT_DIR/<tag>.jsonl for the test to compare
with the one-process references. Rank 0 prints "CASE <tag> rc=<largest rc of the group>" per
good case, "BAD <tag> rcs=<rc of every rank> lines=<stderr lines of every rank, JSON>" per bad
one, then "DONE". train.py's own log goes to a buffer (its tail is printed if a case fails);
the start-up matmul that measures peak FLOP/s is skipped (MFU is not under test).

train.py arms the collectives' watchdog (ENGINE_COMM_TIMEOUT) in its environment when the job
has several ranks, and every Communicator reads it when it is made. A rank idle in an early
round would otherwise build its later communicators without the watchdog's handshake while
its peers build them with it, and the first collective between them would hang; so this
module sets the variable at import, before any Communicator exists, and every rank builds
every communicator alike (a hang then becomes an error naming the missing rank).
"""
import contextlib
import io
import json
import os

os.environ["ENGINE_COMM_TIMEOUT"] = "120"     # before the first Communicator (see above)

import train                                   # noqa: E402
from collectives import Communicator, Mesh     # noqa: E402


class Launch:
    """The world of this launch, the output directory, the data and the flags every case shares."""

    def __init__(self, argv):
        self.world = Communicator()
        self.rank = self.world.rank
        self.out, self.data, self.common = argv[1], argv[2], argv[3:]
        train.measure_peak_flops = lambda dtype: 1e9

    def path(self, *parts):
        return os.path.join(self.out, *parts)

    def run(self, tag, group, args, quiet=False):
        """train.main on the ranks of ``group`` (a Communicator, the case's world): (rc, its stderr)."""
        train.Mesh = lambda world=None, **kw: Mesh(world=group, **kw)
        argv = ["--data", self.data, *self.common, *args, "--out-dir", self.path(tag),
                "--metrics", self.path(tag + ".jsonl")]
        log, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(err):
            rc = train.main(argv)
        if rc != 0 and not quiet:
            print(f"rank {self.rank} case {tag} rc={rc}\n{log.getvalue()[-2000:]}\n{err.getvalue()[-2000:]}",
                  flush=True)
        return rc, err.getvalue()

    def round(self, cases):
        """cases: {tag: (world ranks, args)}; every rank runs the case it belongs to, at once."""
        world, R = self.world, self.rank
        for color, (tag, (ranks, args)) in enumerate(cases.items()):
            if R in ranks:
                mine, group = tag, world.split(color, key=ranks.index(R))
                break
        else:
            mine, group = None, world.split(None)
        rc = self.run(mine, group, cases[mine][1])[0] if mine else 0
        rcs = world.mpi.allgather((mine, rc))                     # small metadata
        if R == 0:
            for tag in cases:
                print(f"CASE {tag} rc={max(r for t, r in rcs if t == tag)}", flush=True)

    def bad(self, tag, args):
        """A bad input on the whole world: every rank's exit code and stderr lines, printed by rank 0.
        Call after patching train.env_rank to compare what each rank would print as rank 0."""
        rc, err = self.run(tag, self.world, args, quiet=True)
        got = self.world.mpi.gather((rc, err.strip().splitlines()), root=0)
        if self.rank == 0:
            print(f"BAD {tag} rcs={[g[0] for g in got]} lines={json.dumps([g[1] for g in got])}", flush=True)

    def done(self):
        self.world.barrier()
        if self.rank == 0:
            print("DONE", flush=True)
