"""bench/gpu_check.py's own logic, without a GPU: --emulated runs every check on the device double
and prints one table and one JSON that agree; missing pieces (a torch that cannot be imported, an
MPI library that cannot be loaded, no mpiexec, no carried wheel) are named with their fix, the
checks needing them are MISSING and the exit code says so; pytest summaries are parsed."""
import json
import os
import subprocess
import sys

import pytest

from bench.gpu_suite import SELF_TEST, parse_pytest, split_files, suite_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gpu_check(args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench.gpu_check", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def table(stdout):
    """{check: (status, result)} from the printed summary table."""
    lines = stdout.split("GPU check\n", 1)[1].splitlines()
    assert lines[0].split()[:3] == ["check", "status", "goal"] and set(lines[1]) == {"-"}
    rows = {}
    for line in lines[2:]:
        if line.startswith(("emulated", "logs")) or not line.strip():
            break
        name, rest = line.split("  ", 1)
        status = rest.split()[0]
        rows[name.strip()] = (status, line)
    return rows


def test_emulated_run_prints_table_and_json(tmp_path):
    pytest.importorskip("torch", reason="bench.train_step's baseline is PyTorch")
    out = tmp_path / "gpu_check.json"
    p = gpu_check(["--emulated", "--json", str(out), "--prefix", str(tmp_path / "prefix"),
                   "--logs", str(tmp_path / "logs")], dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"))
    result = json.loads(out.read_text())
    assert result["device"] == "gpu-emulated" and result["missing"] == []
    printed = table(p.stdout)
    checks = {r["check"]: r for r in result["checks"]}
    assert list(printed) == list(checks) == ["suite", "train_step tiny", "collectives N=1", "collectives N=2",
                                             "sparse_decode"]
    for name, row in checks.items():
        assert printed[name][0] == row["status"] and row["result"] in printed[name][1]
        assert row["status"] in ("PASS", "FAIL") and row["result"]
    suite = checks["suite"]
    assert suite["status"] == "PASS" and suite["counts"]["passed"] > 0 and suite["counts"]["failed"] == 0
    train = checks["train_step tiny"]
    assert train["engine_device"] == "gpu (device double)" and train["torch_device"] == "cpu"
    assert train["first_loss"]["engine"] == pytest.approx(train["first_loss"]["torch"], abs=1e-4)
    assert (train["status"] == "PASS") == (train["value"] <= 1.5)           # the goal decides, nothing else
    assert checks["sparse_decode"]["status"] == "PASS"
    assert {r["device"] for r in checks["sparse_decode"]["rows"]} == {"gpu"}
    for n in (1, 2):                                                       # a failed launch is a FAIL row
        row = checks[f"collectives N={n}"]
        assert row["status"] == "PASS" or row["result"].startswith(("rc ", "min vs_mpi"))
    assert p.returncode == (0 if all(r["status"] == "PASS" for r in checks.values()) else 1)


def test_missing_pieces_are_named_and_their_checks_not_run(tmp_path):
    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no torch here')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "fake"), MPI4PY_LIBMPI=str(tmp_path / "no" / "libmpi.so"),
               PATH="/usr/bin:/bin")                                       # no mpiexec, no MPI library
    out = tmp_path / "gpu_check.json"
    p = gpu_check(["--emulated", "--checks", "train_step,collectives", "--wheels", str(tmp_path / "none"),
                   "--prefix", str(tmp_path / "prefix"), "--logs", str(tmp_path / "logs"), "--json", str(out)], env)
    assert p.returncode == 1
    assert "MISSING torch: ImportError: simulated: no torch here" in p.stdout
    assert "MISSING mpiexec: no mpiexec on PATH -> carried wheel missing: python -m bench.gpu_check --prepare-wheels" \
        in p.stdout
    assert "no carried wheel for them in" in p.stdout                      # it tried the carried wheels
    result = json.loads(out.read_text())
    what = {m["what"] for m in result["missing"]}
    assert {"torch", "mpi4py", "mpiexec"} <= what
    rows = {r["check"]: r for r in result["checks"]}
    assert table(p.stdout).keys() == rows.keys() == {"train_step", "collectives"}
    assert rows["train_step"]["status"] == "MISSING" and "torch" in rows["train_step"]["result"]
    assert rows["collectives"]["status"] == "MISSING" and "mpiexec" in rows["collectives"]["result"]


def test_bad_check_name_exits_2():
    p = gpu_check(["--checks", "suite,warp"])
    assert p.returncode == 2 and p.stderr.strip() == "error: unknown check 'warp'; choose from suite, train_step, " \
        "collectives, sparse_decode"


def test_parse_pytest_and_split():
    counts, failed = parse_pytest("....F\nFAILED tests/test_a.py::test_x - assert 1 == 2\n"
                                  "ERROR tests/test_b.py::test_y\n1 failed, 4 passed, 2 skipped, 1 error in 3.21s\n")
    assert counts == {"passed": 4, "failed": 1, "skipped": 2, "errors": 1}
    assert failed == ["tests/test_a.py::test_x", "tests/test_b.py::test_y"]
    interrupted = "!!! KeyboardInterrupt !!!\n(to show a full traceback on KeyboardInterrupt use --full-trace)\n" \
                  "12 passed, 3 skipped in 180.04s (0:03:00)\n"
    assert parse_pytest(interrupted)[0] == {"passed": 12, "failed": 0, "skipped": 3, "errors": 0}
    assert parse_pytest("Traceback ...\nImportError: no cupy\n") == (None, [])
    names = suite_files(REPO)
    assert SELF_TEST not in names and "tests/test_ops.py" in names        # the GPU suite does not nest itself
    files = [os.path.join(REPO, f) for f in names]
    groups = split_files(files, 4)
    assert len(groups) == 4 and sorted(f for g in groups for f in g) == files
    sizes = [sum(os.path.getsize(f) for f in g) for g in groups]
    assert max(sizes) - min(sizes) <= max(os.path.getsize(f) for f in files)   # LPT: within one file
