"""bench/train_step.py runs end to end (two steps per side) and writes the JSON keys it promises."""
import json
import os

import pytest

from bench import blas_core, train_step


def test_bench_train_step_smoke(tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch", reason="the benchmark's baseline is PyTorch (pip install -e .[test])")
    data = tmp_path / "tiny.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 40)
    out = tmp_path / "bench.json"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")          # one thread a side: the GEMM reading is printed
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rc = train_step.main(["--data", str(data), "--steps", "1", "--warmup", "1", "--block", "1",
                          "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["engine_ms_per_step"] > 0 and result["torch_ms_per_step"] > 0
    assert result["ratio"] == pytest.approx(result["engine_ms_per_step"] / result["torch_ms_per_step"])
    first = result["first_loss"]
    assert first["engine"] == pytest.approx(first["torch"], abs=1e-4)   # the same function, same weights
    gemms, text = result["linear_gemms_ms"], capsys.readouterr().out
    assert "ratio engine/torch" in text, text
    if result["engine_device"] == "cpu":                                # one process on the CPU: measured
        assert gemms["engine"] > 0 and gemms["torch"] > 0 and "the Linears' GEMMs alone" in text, (gemms, text)
    else:                                                               # the device double: no CPU GEMM reading
        assert gemms is None and "the Linears' GEMMs alone" not in text, (gemms, text)


def test_bench_train_step_tiny_random_tokens(tmp_path, capsys):
    """--model tiny trains on random tokens (the gpt2 preset's data path) and records its model and
    devices; on the CPU both sides say cpu."""
    pytest.importorskip("torch", reason="the benchmark's baseline is PyTorch (pip install -e .[test])")
    out = tmp_path / "tiny.json"
    assert train_step.main(["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "1", "--block", "1",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny" and result["data"].startswith("random tokens (vocab 256")
    assert (result["engine_device"], result["torch_device"]) == ("cpu", "cpu")
    assert result["blas_core"] == blas_core() and "OpenBLAS kernels" in capsys.readouterr().out
    assert result["first_loss"]["engine"] == pytest.approx(result["first_loss"]["torch"], abs=1e-4)


def test_blas_core_names_the_kernels_openblas_runs():
    """NumPy's OpenBLAS names its kernel set; where OPENBLAS_CORETYPE forces one, that one."""
    core, forced = blas_core(), os.environ.get("OPENBLAS_CORETYPE")
    assert core and core != "unknown"                     # NumPy's wheels carry OpenBLAS
    if forced:
        assert core.lower() == forced.lower(), (core, forced)
