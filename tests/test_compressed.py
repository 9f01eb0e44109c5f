"""Compressed communication (ZeRO++ qwZ / qgZ, bf16): the codecs (collectives/codecs.py), the
compressed all-gather and all-to-all reduce-scatter (collectives/compressed.py, bitwise
against a reference built from every rank's input, error feedback bounded over steps), ZeRO
stages 1-3 training with them through build_step (replicas bitwise identical after every step,
float32 masters kept apart, counted bytes equal to parallel/data/wire.py's formula), and
train.py's bytes per step. Bad flag combinations: tests/test_bad_input.py."""
import json

import ml_dtypes
import numpy as np
import pytest

from collectives.codecs import Codec
from mpi_util import TRAIN, describe, run_mpi


def test_bf16_codec_rounds_as_ml_dtypes():
    g = np.random.default_rng(0)
    x = (g.standard_normal(20000) * np.exp2(g.integers(-140, 120, 20000))).astype(np.float32)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.finfo(np.float32).max, np.finfo(np.float32).tiny,
                        1e-45, -1e-45, 1.00390625, 1.01171875, 3.3895313892515355e38], np.float32)  # ties, overflow
    x = np.concatenate([x, special])
    c = Codec("bf16")
    buf = c.encode(x)
    assert buf.dtype == np.uint8 and buf.size == c.wire_bytes(x.size) == 2 * x.size
    assert np.array_equal(buf.view(np.uint16), x.astype(ml_dtypes.bfloat16).view(np.uint16))
    out = c.decode(buf, np.empty(x.size, np.float64))
    assert np.array_equal(out, x.astype(ml_dtypes.bfloat16).astype(np.float64))
    nan = c.decode(c.encode(np.array([np.nan, -np.nan], np.float32)), np.empty(2, np.float32))
    assert np.isnan(nan).all()                            # not carried into the exponent (inf or 0)


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
def test_codecs_size_and_error(kind):
    g = np.random.default_rng(1)
    c = Codec(kind, block=64)
    for n in (0, 1, 63, 64, 65, 1000):
        x = (g.standard_normal(n) * 3).astype(np.float32)
        buf = c.encode(x)
        assert buf.size == c.wire_bytes(n)
        y = c.decode(buf, np.empty(n, np.float32))
        if n:
            pad = np.zeros(-(-n // 64) * 64, np.float32)
            pad[:n] = np.abs(x)
            scale = pad.reshape(-1, 64).max(axis=1).repeat(64)[:n] / {"int8": 127, "int4": 7}.get(kind, 1)
            bound = np.abs(x) * 2.0 ** -8 if kind == "bf16" else scale / 2 * (1 + 1e-6)
            assert (np.abs(x - y) <= bound).all()
    bad = np.array([1.0, np.inf, 2.0, np.nan] + [0.5] * 100, np.float32)
    decoded = c.decode(c.encode(bad), np.empty(bad.size, np.float32))
    if kind == "bf16":                                    # elementwise: inf stays inf, NaN NaN
        assert decoded[1] == np.inf and np.isnan(decoded[3]) and np.isfinite(np.delete(decoded, [1, 3])).all()
    else:                                                 # all NaN: the divergence reaches every rank
        assert np.isnan(decoded).all()
    with pytest.raises(ValueError, match="kind must be one of"):
        Codec("int2")
    with pytest.raises(ValueError, match="block must be an int >= 1"):
        Codec("int8", block=0)


@pytest.mark.parametrize("n", [2, 3, 4])
def test_compressed_collectives_equal_the_reference(n):
    proc = run_mpi(n, "compressed_worker.py", timeout=120)
    assert proc.returncode == 0 and "0 failures" in proc.stdout, describe(proc)
    cases = [ln for ln in proc.stdout.splitlines() if ln.startswith("case ")]
    assert cases and all(ln.endswith(" ok") for ln in cases), describe(proc)
    assert any("error feedback one hop" in ln for ln in cases)
    assert (n == 4) == any("two hops" in ln for ln in cases)


@pytest.mark.parametrize("n", [2, 4])
def test_compressed_zero_keeps_replicas_identical_and_bytes_equal_the_formula(n):
    proc = run_mpi(n, "wire_train.py", timeout=180)
    assert proc.returncode == 0 and "0 failures" in proc.stdout, describe(proc)
    cases = [ln for ln in proc.stdout.splitlines() if ln.startswith("case ")]
    assert len(cases) == (12 if n == 4 else 9) and all(ln.endswith(" ok") for ln in cases), describe(proc)


def test_train_logs_bytes_per_step(tmp_path, corpus):
    """train.py --metrics carries bytes_sent and bytes_by_kind; qwZ + qgZ int4 sends under 0.3x
    the float32 bytes of ZeRO-3, its gradients as an all-to-all instead of a reduce-scatter."""
    tiny = ["--data", corpus, "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
            "--batch-size", "8", "--max-steps", "3", "--eval-iters", "1", "--dp", "2", "--zero", "3"]
    rows = {}
    for name, extra in (("fp32", []), ("quant", ["--quant-weights", "int8", "--quant-grads", "int4"])):
        m = tmp_path / f"{name}.jsonl"
        proc = run_mpi(2, TRAIN, *tiny, *extra, "--out-dir", tmp_path / name, "--metrics", m, timeout=180)
        assert proc.returncode == 0, describe(proc)
        assert sum(" MiB | sent " in ln for ln in proc.stdout.splitlines()) == 3, describe(proc)
        rows[name] = [json.loads(ln) for ln in m.read_text().splitlines()]
    for fp, q in zip(rows["fp32"], rows["quant"]):
        assert set(fp["bytes_by_kind"]) == {"all_gather", "reduce_scatter", "all_reduce"}, fp
        assert set(q["bytes_by_kind"]) == {"all_gather", "all_to_all", "all_reduce"}, q
        for row in (fp, q):                              # the largest rank's total, and its kinds' maxima
            assert max(row["bytes_by_kind"].values()) <= row["bytes_sent"] <= sum(row["bytes_by_kind"].values())
        assert 0 < q["bytes_sent"] < 0.3 * fp["bytes_sent"], (q["bytes_sent"], fp["bytes_sent"])
