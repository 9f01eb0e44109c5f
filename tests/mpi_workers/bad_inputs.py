"""Many bad-input train.py runs in one process or one mpiexec launch: each case calls
train.main(argv) and records its exit code, its stderr lines and a hash of the watched
directories (every file's path and content) before and after.

    python tests/mpi_workers/bad_inputs.py CASES.json            # or under mpiexec -n N
    from bad_inputs import run_cases; run_cases(cases)          # in-process (one rank)

CASES.json: [{"name", "argv", "watch": [dirs]}]. Rank 0 prints one line per case,
``CASE {"name", "rcs": [rc of every rank], "lines": [stderr lines of every rank], "same": bool}``
(``same``: the watched tree hashed alike before and after). Every rank prints what rank 0
would (train.env_rank is patched), so the test sees that every rank gives the same verdict.
The start-up matmul that measures peak FLOP/s is skipped.
"""
import contextlib
import hashlib
import io
import json
import os
import sys


def tree_hash(paths):
    """sha256 over every file's relative path and content under each of ``paths`` (and whether each exists)."""
    h = hashlib.sha256()
    for top in paths:
        h.update(f"{top}:{os.path.exists(top)}\n".encode())
        for dirpath, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files) + [d + "/" for d in dirs]:
                p = os.path.join(dirpath, name)
                h.update(os.path.relpath(p, top).encode() + b"\n")
                if os.path.isfile(p):
                    with open(p, "rb") as f:
                        h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


def run_one(argv):
    """(rc, stdout, stderr lines) of train.main(argv) in this process."""
    import train
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = train.main(argv)
        except SystemExit as e:                   # --help and the like
            rc = e.code
        except Exception as e:                    # a traceback: reported, not raised, so the loop goes on
            rc, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
    return rc, out.getvalue(), err.getvalue().strip().splitlines()


def run_cases(cases, comm=None):
    """[{"name", "rcs", "lines", "stdout", "same"}] (on rank 0; None elsewhere)."""
    import train
    train.measure_peak_flops = lambda dtype: 1e9
    train.env_rank = lambda: 0
    results = []
    for case in cases:
        before = tree_hash(case["watch"])
        if comm is not None:
            comm.barrier()
        rc, stdout, lines = run_one(case["argv"])
        got = [(rc, lines, stdout)] if comm is None else comm.gather((rc, lines, stdout), root=0)
        if comm is not None:
            comm.barrier()
        same = before == tree_hash(case["watch"])
        if got is not None:
            results.append(dict(name=case["name"], rcs=[g[0] for g in got], lines=[g[1] for g in got],
                                stdout=[g[2] for g in got], same=same))
    return results if got is not None else None


if __name__ == "__main__":
    os.environ.setdefault("ENGINE_COMM_TIMEOUT", "60")
    from mpi4py import MPI
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for r in run_cases(cases, MPI.COMM_WORLD) or ():
        print("CASE " + json.dumps(r), flush=True)
