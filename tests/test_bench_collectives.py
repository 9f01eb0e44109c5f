"""bench/collectives.py runs end to end: table, JSON rows with the documented keys, PNG; and
--device gpu on the device double (host and device rows side by side); --launches K."""
import json
import os
import subprocess
import sys

from mpi_util import ROOT, describe, run_mpi


def test_bench_collectives_smoke(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = run_mpi(2, "-m bench.collectives", "--op", "all_reduce,all_gather,reduce_scatter,broadcast,reduce,all_to_all",
                   "--sizes", "8B:16KB", "--rounds", "1", "--max-iters", "3", "--json", js, "--plot", png,
                   timeout=180)
    assert proc.returncode == 0, describe(proc)
    out = proc.stdout
    assert "# ceiling" in out and "memcpy" in out and "# model fitted" in out, describe(proc)
    assert "busbw = algbw x 1.000" in out and "busbw = algbw x 0.500" in out, describe(proc)
    data = json.loads(js.read_text())
    rows = data["rows"]
    for key in ("op", "algo", "ranks", "bytes", "time_us", "algbw_GBps", "busbw_GBps", "model_us", "vs_mpi"):
        assert all(key in r for r in rows), key
    assert {r["algo"] for r in rows if r["op"] == "all_reduce"} >= {"auto", "mpi", "ring", "recursive_doubling",
                                                                    "rabenseifner", "tree"}
    floor = {r["op"] for r in rows if r["algo"] == "floor"}          # Case._floor: where it is defined
    assert floor == {"all_reduce", "reduce_scatter", "all_gather"}, floor
    assert all(r["time_us"] > 0 and r["model_us"] is None for r in rows if r["algo"] == "floor")
    assert "floor (persistent requests + np.add) max" in out, describe(proc)
    ar = [r for r in rows if r["op"] == "all_reduce" and r["bytes"] == 16384]
    assert all(abs(r["busbw_GBps"] - r["algbw_GBps"]) < 1e-12 for r in ar)     # 2(n-1)/n = 1 at n = 2
    assert png.stat().st_size > 1000


def test_bench_collectives_device_rows(tmp_path):
    js = tmp_path / "d.json"
    proc = run_mpi(2, "-m bench.collectives", "--device", "gpu", "--op", "all_reduce,all_gather", "--sizes", "1KB:2KB",
                   "--rounds", "1", "--max-iters", "2", "--json", js, timeout=180, env={"ENGINE_DEVICE": "gpu-emulated"})
    assert proc.returncode == 0, describe(proc)
    assert "# device rows: device double (emulated)" in proc.stdout and "not CUDA-aware: staged" in proc.stdout, \
        describe(proc)
    rows = json.loads(js.read_text())["rows"]
    for op in ("all_reduce", "all_gather"):
        host = {(r["algo"], r["bytes"]) for r in rows if r["op"] == op and r["mem"] == "host"}
        dev = {(r["algo"], r["bytes"]) for r in rows if r["op"] == op and r["mem"] == "device"}
        floor = {(a, b) for a, b in host if a == "floor"}                  # host memory only
        assert host - floor == dev and floor and ("mpi", 1024) in dev and len(dev) >= 6, (op, host, dev)
    assert all(r["vs_mpi"] == 1.0 for r in rows if r["algo"] == "mpi")
    assert all(r["model_us"] is None for r in rows if r["mem"] == "device")
    assert any(line.split()[2:3] == ["device"] for line in proc.stdout.splitlines()), describe(proc)


def test_bench_collectives_launches(tmp_path):
    """--launches 2: two mpiexec launches, the median and range of each ratio over them; bad
    --launches and --launches under mpiexec stop with exit code 2."""
    js = tmp_path / "l.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "bench.collectives", "--op", "all_reduce,all_gather", "--algo", "auto,mpi,floor",
           "--sizes", "8B:16B", "--rounds", "1", "--max-iters", "2"]
    proc = subprocess.run([*cmd, "--launches", "2", "--json", str(js)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# bench.collectives --launches 2: 2 ranks per launch" in proc.stdout, proc.stdout
    assert proc.stderr.count("# bench.collectives: 2 ranks") == 2, proc.stderr
    assert "median over launches, auto vs mpi" in proc.stdout, proc.stdout
    data = json.loads(js.read_text())
    assert data["meta"]["launches"] == 2 and len(data["per_launch_rows"]) == 2
    rows = {(r["op"], r["algo"], r["bytes"]): r for r in data["rows"]}
    assert set(rows) == {(op, algo, b) for op in ("all_reduce", "all_gather") for algo in ("auto", "mpi", "floor")
                         for b in (8, 16)}, sorted(rows)
    assert "floor (persistent requests + np.add) worst" in proc.stdout, proc.stdout
    for (op, algo, b), r in rows.items():
        ratios = [x["vs_mpi"] for launch in data["per_launch_rows"] for x in launch
                  if (x["op"], x["algo"], x["bytes"]) == (op, algo, b)]
        assert r["launches"] == 2 and r["vs_mpi_min"] == min(ratios) and r["vs_mpi_max"] == max(ratios)
        assert abs(r["vs_mpi_median"] - sum(ratios) / 2) < 1e-12 and abs(r["time_ratio_min"] - 1 / max(ratios)) < 1e-12
    bad = subprocess.run([*cmd, "--launches", "0"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--launches and --ranks must be >= 1" in bad.stderr, bad.stderr
    nested = run_mpi(2, "-m bench.collectives", "--launches", "2", timeout=120)
    assert nested.returncode == 2 and "run it without mpiexec" in nested.stderr, describe(nested)
