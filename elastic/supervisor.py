"""Keep a training job going when ranks die: relaunch it at the surviving size, from memory.

    python -m elastic -n 4 [--min-ranks 2] [--max-restarts 3] [--replica-every 10] -- train.py --dp 4 --zero 1 ...

The supervisor runs ``mpiexec -n N python train.py ... --replica-every K`` (each rank's shard
copied into a buddy's RAM every K steps, parallel/checkpoint/replicas.py) and watches it. When
the launch fails it

  1. finds the lost ranks. Every rank keeps a connection to the supervisor and says goodbye
     when it exits on its own (elastic/contact.py). A connection that closes without one
     while the launch runs is a dead rank: DEATH_GRACE later (the ranks killed with it count
     too) the supervisor ends the launch itself, without waiting for the watchdog's deadline.
     Otherwise (a stuck rank, or the launcher ending first): the launcher's clean-up is off
     (-disable-auto-cleanup), so the survivors usually live on until the collectives' watchdog
     names the missing rank ("rank 2 never arrived", collectives/watchdog.py) and aborts the
     job: lost are then the ranks whose connection closed without a goodbye before that, and
     those the watchdog names that never said goodbye (stuck: a stuck rank is a dead rank).
     Where MPICH ends the job within milliseconds of the death instead, lost is the rank the
     launcher reports ending first by a signal (Hydra's "PID p ... EXIT CODE: 9", p mapped
     to its rank by its hello; without such a report, the first connection to close): ranks
     killed together are then told apart only by the watchdog's path. A rank that exited with
     an error of its own is not lost; a failure that names nobody loses nobody;
  2. picks the newest whole state: the survivors' buddy replicas (parallel/checkpoint/recover.py,
     written to tmpfs as a sharded checkpoint: no disk checkpoint is read or written), a state
     recovered after an earlier failure, or the run's last disk checkpoint in --out-dir, and
     says which; none: the run starts over;
  3. relaunches on the survivors by the layout rule of elastic/plan.py (shrink dp; keep pp, sp,
     tp; the largest dp the batch allows), or, with --capacity-file, on as many ranks as that
     file says are available (ranks that came back: the job grows back at this restart point).

It stops at success (exit 0), at bad flags (exit 2, before anything is launched), and when the
ranks left are fewer than --min-ranks or --max-restarts relaunches have failed (exit 1, naming
the last disk checkpoint). Each launch gets ELASTIC_LAUNCH=<its number> in its environment.
The replica store is removed when the supervisor ends. Replicas are handed over through the
store's directory, so the supervisor and every rank must see it: one host (the default,
/dev/shm), or a --store on a file system every host mounts.
"""
import argparse
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

from engine.checkpoint import list_checkpoints
from parallel.checkpoint.recover import write_recovered
from parallel.checkpoint.replicas import default_store

from .contact import ENV as CONTACT
from .contact import Listener

DEATH_GRACE = 0.3     # seconds from the first death to ending the launch: ranks killed together all count
WATCHDOG = re.compile(r"ENGINE_COMM_TIMEOUT: ranks? ([\d,]+)(?: \(world ranks? ([\d,]+)\))? never arrived")
HYDRA_PID = re.compile(r"^=\s+PID (\d+) RUNNING AT \S+")        # MPICH's report of the first process to end
HYDRA_CODE = re.compile(r"^=\s+EXIT CODE: (\d+)")


def say(msg):
    print(f"elastic: {msg}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m elastic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, required=True, help="ranks of the first launch (dp x pp x sp x tp)")
    p.add_argument("--min-ranks", type=int, default=1, help="give up below this many ranks")
    p.add_argument("--max-restarts", type=int, default=3, help="relaunches before giving up")
    p.add_argument("--replica-every", type=int, default=10,
                   help="K: steps between buddy replicas (at most K steps lost per failure; see README)")
    p.add_argument("--comm-timeout", type=float, default=60.0,
                   help="seconds before a silent rank counts as lost (a stuck rank is a dead rank)")
    p.add_argument("--stall-timeout", type=float, default=0.0,
                   help="kill a launch that prints nothing for this many seconds (0: never)")
    p.add_argument("--store", default="", help="replica store directory (default /dev/shm/mte-replicas-<uid>/<pid>)")
    p.add_argument("--capacity-file", default="", help="a file holding the number of ranks available now, read "
                   "at each restart (default: the survivors)")
    p.add_argument("--mpiexec", default="mpiexec", help="the launcher and its options, e.g. 'mpiexec -f hosts'")
    p.add_argument("program", nargs=argparse.REMAINDER, help="-- train.py [flags]")
    a = p.parse_args(argv)
    prog = a.program[1:] if a.program[:1] == ["--"] else a.program
    if not prog:
        p.error("name the program after --, e.g. -- train.py --dp 4")
    for name in ("n", "min_ranks", "replica_every"):
        if getattr(a, name) < (0 if name == "replica_every" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'replica_every' else 'positive'}")
    if a.max_restarts < 0 or a.comm_timeout < 0 or a.stall_timeout < 0:
        p.error("--max-restarts, --comm-timeout and --stall-timeout must be >= 0")
    a.program = prog
    return a


def plan(n, program):
    """elastic/plan.py's answer for the program's flags: {"sizes": {n: dp}, "out_dir", ...}."""
    proc = subprocess.run([sys.executable, "-m", "elastic.plan", str(n), "--", *program[1:]],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        return None
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    got["sizes"] = {int(k): v for k, v in got["sizes"].items()}
    return got


class Launch:
    """One mpiexec of the program; its output passes through, and is read for lost ranks."""

    def __init__(self, cmd, env, stall_timeout):
        self.lines, self.stall, self.killed = [], stall_timeout, None
        self.listener = Listener()
        env = dict(env, **{CONTACT: self.listener.address})
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True)
        self.q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait(self):
        """The exit code, after the output ends (-9: killed here). A rank whose connection
        closes without a goodbye while the launch runs is dead: after DEATH_GRACE seconds (to
        see the others killed with it) the launch is ended at once, not when the watchdog's
        deadline passes; ``killed`` is then the set of the dead."""
        last, death = time.monotonic(), None
        while True:
            try:
                line = self.q.get(timeout=0.05)
            except queue.Empty:
                now = time.monotonic()
                gone = self.listener.dead(before=now + 0.5)          # closed without a goodbye so far
                if gone and self.proc.poll() is None:
                    death = death or now
                    dead = self.listener.dead(before=now + 0.5)
                    if now - death >= DEATH_GRACE and len(dead) < len(self.listener.ranks):   # not a teardown
                        self.killed = dead
                        say(f"rank{'s' * (len(self.killed) > 1)} {', '.join(map(str, sorted(self.killed)))} "
                            "died: ending the launch")
                        self._kill()
                        return -9
                if self.stall and now - last > self.stall:
                    say(f"no output for {self.stall:g} s: killing the launch")
                    self._kill()
                    return -9
                continue
            if line is None:
                rc = self.proc.wait()
                self.listener.settle()
                return rc
            last = time.monotonic()
            self.lines.append((time.monotonic(), line))
            sys.stdout.write(line)
            sys.stdout.flush()

    def _kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        while self.q.get() is not None:           # the rest of the output, unprinted
            pass


def lost_ranks(lines, listener, killed=None):
    """{world rank: why} of the ranks this launch lost (module docstring, step 1); lines:
    (time read, text) of its output."""
    named, when, pid = set(), None, None
    for t, line in lines:
        if (m := WATCHDOG.search(line)):
            named |= set(map(int, (m.group(2) or m.group(1)).split(",")))
            when = t if when is None else when
        elif (m := HYDRA_PID.search(line)):
            pid = int(m.group(1))
        elif (m := HYDRA_CODE.search(line)) and pid is not None and int(m.group(1)) not in (9, 137):
            pid = None                           # the first process to end ended on its own
    by_pid = {p: r for r, p in listener.ranks.items()}
    if killed:                                   # seen dying while the others lived (Launch.wait)
        lost = {r: "died (its connection closed without a goodbye)" for r in killed}
    elif when is not None:                         # the survivors lived until the watchdog spoke
        lost = {r: "died (its connection closed without a goodbye)" for r in listener.dead(before=when)}
    elif pid in by_pid and by_pid[pid] not in listener.said_bye():
        lost = {by_pid[pid]: "killed (the launcher saw it end first, by a signal)"}
    else:                                        # no launcher report: the first connection to close
        lost = {r: "died (its connection closed first, without a goodbye)" for r in listener.first_dead()}
    for r in sorted(named - listener.said_bye()):
        lost.setdefault(r, "did not answer the watchdog (stuck)")
    return lost


def no_cleanup(mpiexec):
    """The launcher's flag that keeps the survivors running when a rank dies (MPICH's Hydra:
    -disable-auto-cleanup; Open MPI's prterun: none needed with --with-ft ulfm)."""
    try:
        out = subprocess.run([*shlex.split(mpiexec), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return ["-disable-auto-cleanup"] if "HYDRA" in out.upper() else []


def newest_disk(out_dir):
    found = list_checkpoints(out_dir)
    return (found[-1][0], found[-1][1]) if found else None


def capacity(path, survivors):
    if path:
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            say(f"cannot read a rank count from {path}; using the {survivors} survivors")
    return survivors


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    layout = plan(a.n, a.program)
    if layout is None:
        return 2
    store = a.store or os.path.join(default_store(), str(os.getpid()))
    out_dir, sizes = os.path.realpath(layout["out_dir"]), layout["sizes"]
    per = layout["layout"]["pp"] * layout["layout"]["sp"] * layout["layout"]["tp"]
    n, resume, best = a.n, None, None          # best: (step, path, what) of the newest whole state
    launcher = shlex.split(a.mpiexec) + no_cleanup(a.mpiexec)
    try:
        for launch in range(a.max_restarts + 1):
            dp = n // per
            lstore = os.path.join(store, f"launch-{launch}")
            args = [*a.program[1:], "--dp", str(dp), "--comm-timeout", f"{a.comm_timeout:g}"]
            if a.replica_every and n > 1:
                args += ["--replica-every", str(a.replica_every), "--replica-dir", lstore]
            if resume:
                args += ["--resume", resume]
            elif launch:
                args += ["--overwrite"]                  # starting over: the failed launch's metrics go
            cmd = [*launcher, "-n", str(n), sys.executable, a.program[0], *args]
            say(f"launch {launch}: {n} ranks (dp {dp})" + (f", resuming from {resume}" if resume else ""))
            t0 = time.monotonic()
            job = Launch(cmd, dict(os.environ, ELASTIC_LAUNCH=str(launch)), a.stall_timeout)
            rc = job.wait()
            if rc == 0:
                say(f"finished after {launch} restart{'s' * (launch != 1)}")
                return 0
            if rc == 2 and launch == 0:
                return 2                                 # bad input: the program said why
            lost = lost_ranks(job.lines, job.listener, job.killed)
            job.listener.close()
            survivors = [r for r in range(n) if r not in lost]
            say(f"launch {launch} failed (exit code {rc}) after {time.monotonic() - t0:.1f} s; "
                + ("; ".join(f"rank {r} {why}" for r, why in sorted(lost.items())) if lost else "no rank named lost"))
            t1 = time.monotonic()
            got, step, sources = write_recovered(lstore, set(survivors), os.path.join(store, f"recovered-{launch}"),
                                                 extra={"continues": out_dir})
            if got is not None and (best is None or step >= best[0]):
                names = ", ".join(f"{q}: {s}" for q, s in sorted(sources.items()))
                best = (step, got, f"buddy replicas (step {step}; shards {names})")
            elif got is None:
                say(f"no whole state in the buddy replicas: {step}")
            disk = newest_disk(out_dir)
            if disk is not None and (best is None or disk[0] > best[0]):
                best = (disk[0], disk[1], f"the disk checkpoint {disk[1]} (step {disk[0]})")
            want = min(capacity(a.capacity_file, len(survivors)), a.n)
            n = per * max((sizes[m] for m in sizes if m <= want), default=0)    # ranks the layout uses
            if n < a.min_ranks or launch == a.max_restarts:
                why = f"only {want} ranks left (--min-ranks {a.min_ranks})" if n < a.min_ranks else \
                    f"{a.max_restarts} restarts failed (--max-restarts)"
                say(f"giving up: {why}; the last disk checkpoint: {disk[1] if disk else 'none'}")
                return 1
            resume = best[1] if best else None
            say(f"restoring from {best[2] if best else 'nothing: starting over (no whole state, no checkpoint)'}"
                f" onto {n} ranks (dp {n // per}); prepared in {time.monotonic() - t1:.2f} s")
        return 1
    finally:
        shutil.rmtree(store, ignore_errors=True)
