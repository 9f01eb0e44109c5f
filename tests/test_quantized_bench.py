"""bench/quantized.py end to end on a tiny model (one launch per mode): the JSON rows it
promises, counted bytes equal to the formula for every option, qwZ + qgZ int4 under 0.3x."""
import json

from mpi_util import describe, run_mpi


def test_bytes_mode_smoke(tmp_path, corpus):
    out = tmp_path / "q.json"
    proc = run_mpi(2, "-m bench.quantized", "--data", corpus, "--steps", "2", "--n-layer", "1", "--n-embd", "32",
                   "--json", out, timeout=180)
    assert proc.returncode == 0, describe(proc)
    rows = {r["option"]: r for r in json.loads(out.read_text())}
    assert list(rows)[0] == "fp32" and {"qwZ int8", "qwZ+qgZ int4", "qwZ+qgZ int4+EF", "bf16"} <= rows.keys()
    for r in rows.values():
        assert {"bytes_per_step", "formula_bytes", "ms_per_step", "model_ms_slow_link"} <= r.keys()
        assert r["bytes_per_step"] == r["formula_bytes"] > 0 and r["every_step_alike"], r
        assert r["model_ms_slow_link"] > r["model_ms_fast_link"] > r["compute_ms"] > 0
    assert rows["qwZ+qgZ int4"]["bytes_vs_fp32"] < 0.3 and 0.49 < rows["bf16"]["bytes_vs_fp32"] <= 0.5
    assert "met" in proc.stdout and "MISSED" not in proc.stdout, describe(proc)


def test_quality_mode_smoke(tmp_path, corpus):
    out = tmp_path / "quality.json"
    proc = run_mpi(2, "-m bench.quantized", "--quality", "--data", corpus, "--quality-steps", "2", "--val-batches",
                   "1", "--n-layer", "1", "--n-embd", "32", "--json", out, timeout=180)
    assert proc.returncode == 0, describe(proc)
    rows = json.loads(out.read_text())
    assert [r["option"] for r in rows] == ["fp32", "qwZ int8", "qwZ+qgZ int4", "qwZ+qgZ int4+EF", "bf16"]
    assert all(r["val_loss"] > 0 and r["steps"] == 2 for r in rows) and rows[0]["vs_fp32"] == 0
