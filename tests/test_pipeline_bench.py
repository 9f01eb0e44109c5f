"""bench/pipeline.py end to end on tiny sizes (one launch): the JSON rows it promises, the
plot, the Chrome trace (one row per rank, forward / backward / weight-grad boxes); and a
layout the model cannot take ends with one error line and exit code 2."""
import json

from mpi_util import describe, run_mpi

TINY = ["--n-layer", "4", "--n-embd", "16", "--seq", "8", "--mb-rows", "1", "--micro-batches", "2,4",
        "--sim-pp", "4", "--steps", "1"]


def test_pipeline_bench_smoke(tmp_path):
    out, png, trace = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "t.json"
    proc = run_mpi(2, "-m bench.pipeline", *TINY, "--json", out, "--plot", png, "--trace", trace, timeout=150)
    assert proc.returncode == 0, describe(proc)
    rows = json.loads(out.read_text())
    keys = {"schedule", "pp", "micro_batches", "bubble_measured", "bubble_theory", "peak_activation_bytes", "simulated"}
    assert all(keys <= r.keys() for r in rows)
    real = [r for r in rows if not r["simulated"]]
    assert {r["schedule"] for r in real} == {"gpipe", "1f1b", "interleaved", "zb-h1"} and all(r["pp"] == 2 for r in real)
    assert any(r["simulated"] and r["pp"] == 4 for r in rows)
    assert all(0 <= r["bubble_measured"] < 1 and 0 < r["bubble_theory"] < 1 for r in rows)
    g = {(r["schedule"], r["micro_batches"]): r["peak_activation_bytes"] for r in real}
    assert g[("gpipe", 4)] > g[("1f1b", 4)] > 0                     # GPipe holds m, 1F1B p micro-batches
    assert png.stat().st_size > 10_000
    ev = json.loads(trace.read_text())["traceEvents"]
    assert {e["tid"] for e in ev} == {0, 1}
    assert {e["cat"] for e in ev if e["ph"] == "X"} >= {"forward", "backward", "weight-grad"}
    assert "zb-h1 bubble / 1f1b" in proc.stdout


def test_pipeline_bench_bad_layout_exits_2():
    proc = run_mpi(2, "-m bench.pipeline", "--n-layer", "1", "--steps", "1", timeout=60)
    assert proc.returncode == 2, describe(proc)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert errors == ["error: pipeline: pp=2 stages need at least 2 layers, the model has n_layer=1"], describe(proc)
