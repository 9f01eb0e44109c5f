"""What the one-command GPU check (bench/gpu_check.py) needs from the machine, and how it gets it
without a package registry.

The GPU machine may be offline. What it lacks (an MPI library, ml_dtypes, regex) travels as wheels
in ``wheels/`` (git-ignored, at most 64 MiB with the working tree), fetched beforehand on a
connected machine:

    python -m bench.gpu_check --prepare-wheels          # pip download, CPython 3.12, manylinux x86_64

On the GPU machine the check probes the environment in a child process (the same environment its
checks will get), and installs only the missing carried wheels, with ``pip install --no-index
--find-links wheels --no-deps --prefix out/gpu_env``: into a folder of the checkout, never into the
machine's own environment, so nothing is fetched and nothing there changes. The project itself is
not installed: every check runs from the checkout with it on PYTHONPATH, as the test suite does.

How mpi4py finds the MPI library (mpi4py/_mpiabi.py, mpi4py >= 4): a library already loaded into the
process, else the paths in ``MPI4PY_LIBMPI``, else ``lib/`` of the virtual environment's, the user's
and the base prefixes, else the dynamic loader's search path. The mpich wheel puts ``libmpi.so.12``
in ``<prefix>/lib`` and ``mpiexec`` in ``<prefix>/bin``; installed under out/gpu_env neither is on
those paths, so the checks' environment names them: MPI4PY_LIBMPI=out/gpu_env/lib/libmpi.so.12 and
out/gpu_env/bin first on PATH. "MPI works" means what the checks need: ``mpiexec -n 2`` starts two
ranks that load mpi4py.MPI and see a world of 2.
"""
import glob
import json
import os
import subprocess
import sys

# The wheels --prepare-wheels fetches, name -> requirement. ml_dtypes 0.5 is the last series that
# accepts NumPy 1.26 on Python 3.12 (0.6 on need NumPy 2), so it loads whichever the machine has.
CARRIED = {"mpich": "mpich>=4.1", "ml_dtypes": "ml_dtypes>=0.5,<0.6", "regex": "regex>=2022.1", "mpi4py": "mpi4py>=4.0"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_5_x86_64", "manylinux1_x86_64")
WHEELS_LIMIT = 64 << 20                                  # bytes that may travel with the working tree
PREPARE = "python -m bench.gpu_check --prepare-wheels (on a connected machine; copies them to wheels/)"

PROBE = r'''
import importlib, importlib.metadata, importlib.util, json, platform, sys
r = {"python": platform.python_version(), "executable": sys.executable}
def present(name):  # found without importing it (transformers takes seconds to import)
    try:
        r[name] = {"ok": importlib.util.find_spec(name) is not None, "version": importlib.metadata.version(name)}
    except Exception as e:
        r[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:200]}
def probe(name, more=None):
    try:
        m = importlib.import_module(name)
        r[name] = {"ok": True, "version": str(getattr(m, "__version__", "?"))}
        if more:
            r[name].update(more(m))
    except BaseException as e:  # an import that fails in any way is "missing", with its reason
        r[name] = {"ok": False, "error": (f"{type(e).__name__}: {e}".strip().splitlines() or ["?"])[0][:200]}
def cupy_info(cp):
    n = cp.cuda.runtime.getDeviceCount()
    v = cp.cuda.runtime.runtimeGetVersion()
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    ok = int((cp.arange(3) + 1).sum()) == 6          # compiles and runs one kernel
    return {"devices": int(n), "cuda": f"{v // 1000}.{v % 1000 // 10}", "name": name, "ok": bool(n > 0 and ok)}
def torch_info(t):
    cuda = bool(t.cuda.is_available())
    return {"cuda_available": cuda, "cuda": t.version.cuda, "name": t.cuda.get_device_name(0) if cuda else None}
def mpi_info(m):
    from mpi4py import MPI
    return {"library": MPI.Get_library_version().strip().splitlines()[0].strip()}
probe("numpy"); probe("pytest"); probe("ml_dtypes"); probe("regex"); present("safetensors"); present("transformers")
probe("cupy", cupy_info); probe("torch", torch_info); probe("mpi4py", mpi_info)
print("PROBE " + json.dumps(r))
'''
LAUNCH = ("from mpi4py import MPI; c = MPI.COMM_WORLD; n = c.allreduce(1)\n"    # the ranks see and reach each other
          "if c.Get_rank() == 0: print('RANKS', n, c.Get_size(), flush=True)")


def site_dirs(prefix):
    """The site-packages folders pip made under ``prefix`` (the scheme's name varies by distribution)."""
    return sorted(glob.glob(os.path.join(prefix, "lib*", "python3*", "*-packages"))) + \
        sorted(glob.glob(os.path.join(prefix, "local", "lib*", "python3*", "*-packages")))


def child_env(repo, prefix, device, base=None):
    """The environment of every check: ENGINE_DEVICE, the checkout and the carried packages on
    PYTHONPATH, the carried MPI's mpiexec on PATH and its library in MPI4PY_LIBMPI (if installed)."""
    env = dict(os.environ if base is None else base)
    env["ENGINE_DEVICE"] = device
    env["PYTHONPATH"] = os.pathsep.join([repo, *site_dirs(prefix), *filter(None, [env.get("PYTHONPATH")])])
    libmpi = sorted(glob.glob(os.path.join(prefix, "lib", "libmpi.so.12")))
    if libmpi:
        env["MPI4PY_LIBMPI"] = libmpi[0]
        env["PATH"] = os.pathsep.join([os.path.join(prefix, "bin"), env.get("PATH", "")])
    return env


def which(name, env):
    for d in env.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if d and os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def run_quiet(cmd, env, timeout):
    """(return code, stdout + stderr) of a short command; rc 124 when it timed out."""
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return 124, f"timed out after {timeout} s: {(e.stdout or b'')[-200:]!r}"
    except OSError as e:
        return 127, str(e)


def probe(env, timeout=60):
    """The probe's findings (python, each package, MPI launch) in the checks' environment."""
    rc, out = run_quiet([sys.executable, "-c", PROBE], env, timeout)
    line = [s for s in out.splitlines() if s.startswith("PROBE ")]
    found = json.loads(line[-1][6:]) if line else {"error": out.strip().splitlines()[-1:] or [f"rc {rc}"]}
    mpiexec = which("mpiexec", env)
    found["mpiexec"] = {"ok": bool(mpiexec), "path": mpiexec}
    if mpiexec:
        rc, out = run_quiet([mpiexec, "-n", "2", sys.executable, "-c", LAUNCH], env, 30)
        ok = rc == 0 and "RANKS 2 2" in out
        found["mpi_launch"] = {"ok": ok, "error": None if ok else (out.strip().splitlines() or [f"rc {rc}"])[-1][:200]}
        found["mpiexec"]["version"] = (run_quiet([mpiexec, "--version"], env, 10)[1].strip().splitlines() or ["?"])[0]
    else:
        found["mpi_launch"] = {"ok": False, "error": "no mpiexec on PATH"}
    return found


def missing(found, emulated):
    """[(what, why, how to fix)] for every piece the checks need and the probe did not find."""
    out = []

    def need(key, fix, why=None):
        f = found.get(key, {})
        if not f.get("ok"):
            out.append((key, why or f.get("error") or "not importable", fix))

    carry = f"carried wheel missing: {PREPARE}"
    need("numpy", "pip install numpy (the machine's Python should have it)")
    need("pytest", "pip install pytest (needed by the suite check)")
    need("ml_dtypes", carry)
    need("regex", carry)
    need("mpi4py", carry)
    need("mpiexec", carry, "no mpiexec on PATH")
    if found.get("mpiexec", {}).get("ok"):
        need("mpi_launch", f"the MPI library and mpiexec must match; {carry}")
    if not emulated:
        no_gpu = None if "error" in found.get("cupy", {}) else "CuPy found no GPU or could not run a kernel"
        need("cupy", "install the CuPy wheel of the machine's CUDA: pip install cupy-cuda13x "
             "(.[gpu-cuda13]) for CUDA 13, cupy-cuda12x (.[gpu]) for 12; too large to carry", no_gpu)
    t = found.get("torch", {})
    if not t.get("ok"):
        out.append(("torch", t.get("error", "not importable"), "install PyTorch (the baseline of bench.train_step)"))
    elif not emulated and not t.get("cuda_available"):
        out.append(("torch", "torch.cuda.is_available() is False", "install a CUDA build of PyTorch"))
    return out


def install(wheels, prefix, names, log):
    """pip install the carried wheels of ``names`` into ``prefix`` with no index; returns (ok, message)."""
    names = [n for n in names if glob.glob(os.path.join(wheels, f"{n}-*.whl"))]
    if not names:
        return False, f"no carried wheel for them in {wheels}/"
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", wheels, "--no-deps", "--ignore-installed",
           "--prefix", prefix, "--disable-pip-version-check", "--no-warn-script-location", *names]
    rc, out = run_quiet(cmd, None, 120)
    with open(log, "a") as f:
        f.write(" ".join(cmd) + "\n" + out + "\n")
    return rc == 0, (f"installed {', '.join(names)} into {prefix}" if rc == 0
                     else f"pip install failed (rc {rc}; {log}): {(out.strip().splitlines() or ['?'])[-1]}")


def provision(repo, wheels, prefix, device, log, install_carried=True):
    """Probe the checks' environment; install the missing carried wheels (ml_dtypes, regex, the
    mpich wheel if MPI does not work, then mpi4py's if its import still fails) and probe again.
    Returns (environment, findings, [(what, why, fix)] still missing, [notes])."""
    emulated = device == "gpu-emulated"
    env = child_env(repo, prefix, device)
    found, notes = probe(env), []

    def absent(*keys):
        return [k for k, _, _ in missing(found, emulated) if k in keys]

    rounds = (lambda: [*absent("ml_dtypes", "regex"), *(["mpich"] if absent("mpi4py", "mpiexec", "mpi_launch") else [])],
              lambda: absent("mpi4py"))
    for want in rounds:
        names = want() if install_carried else []
        if names:
            ok, msg = install(wheels, prefix, names, log)
            notes.append(f"{', '.join(names)}: {msg}")
            if ok:
                env = child_env(repo, prefix, device)
                found = probe(env)
    return env, found, missing(found, emulated), notes


def prepare_wheels(dest, python_version="3.12"):
    """pip download the carried wheels for CPython ``python_version`` on manylinux x86_64 into dest;
    0 if their total fits the 64 MiB the working tree may carry, 1 if not, pip's code if it failed."""
    os.makedirs(dest, exist_ok=True)
    abi = "cp" + python_version.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--dest", dest,
           "--python-version", python_version, "--implementation", "cp", "--abi", abi, "--abi", "none",
           *[a for p in PLATFORMS for a in ("--platform", p)], *CARRIED.values()]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc:
        print(f"error: pip download failed (rc {rc})", file=sys.stderr)
        return rc
    files = sorted(glob.glob(os.path.join(dest, "*.whl")))
    total = sum(os.path.getsize(f) for f in files)
    for f in files:
        print(f"{os.path.getsize(f) / 2**20:8.2f} MiB  {os.path.basename(f)}")
    print(f"{total / 2**20:8.2f} MiB  total in {dest}/ (limit {WHEELS_LIMIT >> 20} MiB with the working tree)")
    if total > WHEELS_LIMIT:
        print(f"error: the wheels ({total / 2**20:.1f} MiB) exceed {WHEELS_LIMIT >> 20} MiB", file=sys.stderr)
        return 1
    return 0
