"""bench/long_context.py runs end to end on tiny sizes: table, JSON keys, PNG, and memory that
falls as the sequence is sharded over more ranks."""
import json

from mpi_util import describe, run_mpi


def test_bench_long_context_smoke(tmp_path):
    js, png = tmp_path / "lc.json", tmp_path / "lc.png"
    proc = run_mpi(2, "-m bench.long_context", "--sp", "1,2", "--seq-lens", "128,256", "--mem-budget", "6MB",
                   "--unit", "32", "--max-len", "1024", "--ring-lens", "128", "--reps", "1", "--n-layer", "1",
                   "--batch", "2", "--json", js, "--plot", png, timeout=180)
    assert proc.returncode == 0, describe(proc)
    assert "longest trainable sequence" in proc.stdout and "ring/max" in proc.stdout, describe(proc)
    data = json.loads(js.read_text())
    peak = {(r["sp"], r["seq_len"]): r["peak_bytes"] for r in data["rows"]}
    assert set(peak) == {(1, 128), (1, 256), (2, 128), (2, 256)}
    assert peak[(2, 256)] < peak[(1, 256)] and peak[(1, 128)] < peak[(1, 256)]
    m = data["max_seq_len"]
    assert m["2"] >= m["1"] > 0 and m["1"] % 32 == 0
    (step,) = data["ring_steps"]
    assert step["sp"] == 2 and min(step["compute_ms"], step["comm_ms"], step["ring_ms"]) > 0
    assert png.stat().st_size > 1000


def test_bench_long_context_bad_length_exits_2():
    proc = run_mpi(2, "-m bench.long_context", "--sp", "2", "--seq-lens", "130", timeout=60)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.count("long_context: sequence length 130 is not divisible into 2 x sp = 4 chunks") == 2, \
        describe(proc)
