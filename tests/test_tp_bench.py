"""bench/tensor_parallel.py runs at N = 2 with small sizes and writes its JSON: the bytes each
tp rank sends equal Megatron's count exactly (every algorithm sends n bytes per all-reduce of
n at tp = 2), decoding gives the same tokens at tp 2 as at tp 1, and tp 2 fits a larger model
than tp 1 in the same budget."""
import json

from mpi_util import describe, run_mpi


def test_tp_bench_runs_and_counts_exactly(tmp_path):
    out = tmp_path / "tp.json"
    proc = run_mpi(2, "-m bench.tensor_parallel", "--mem-budget", "4MB", "--seq", "32", "--batch", "2",
                   "--json", out, timeout=120)
    assert proc.returncode == 0, describe(proc)
    got = json.loads(out.read_text())
    assert {r["tp"] for r in got["rows"]} == {1, 2} and all(r["measured_bytes"] > 0 for r in got["rows"])
    wire = {w["tp"]: w for w in got["wire"]}
    assert wire[2]["sent_bytes"] == wire[2]["formula_bytes"] > 0 and wire[1]["sent_bytes"] == 0, wire
    assert all(d["same_tokens"] for d in got["decode"]) and len(got["decode"]) == 2
    fits = {f["tp"]: f["max_params"] for f in got["max_params"]}
    assert fits[2] > fits[1] > 0, fits
