"""bench/collectives.py runs end to end: table, JSON rows with the documented keys, PNG; and
--device gpu on the device double (host and device rows side by side)."""
import json

from mpi_util import describe, run_mpi


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
        assert host == dev and ("mpi", 1024) in dev and len(dev) >= 6, (op, host, dev)
    assert all(r["vs_mpi"] == 1.0 for r in rows if r["algo"] == "mpi")
    assert all(r["model_us"] is None for r in rows if r["mem"] == "device")
    assert any(line.split()[2:3] == ["device"] for line in proc.stdout.splitlines()), describe(proc)
