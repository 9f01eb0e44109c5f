"""bench/sparse_decode.py and bench/sparse_quality.py run end to end at tiny sizes and write the
JSON rows they promise; bad arguments exit 2 with one line."""
import json

import pytest

from bench import sparse_decode, sparse_quality
from engine import backend


def test_sparse_decode_smoke(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert sparse_decode.main(["--shapes", "tiny", "--prompt", "3", "--warmup", "1", "--tokens", "2",
                               "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "sparse_ff", "sparse_qkv", "both"]
    dense = rows[0]["s_per_token"]
    for r in rows:
        assert r["shape"] == "tiny" and r["device"] == backend.default_device() and r["s_per_token"] > 0
        assert r["speedup"] == pytest.approx(dense / r["s_per_token"])
    assert rows[3]["paper_s_per_token"] == 0.061
    printed = capsys.readouterr().out
    where = "the device double" if backend.emulated() else backend.default_device()
    assert "paper s/token" in printed and "sparse_qkv" in printed and f"decoding on {where}" in printed


def test_sparse_decode_bad_shape_exits_2(capsys):
    assert sparse_decode.main(["--shapes", "huge"]) == 2
    assert "unknown shape 'huge'" in capsys.readouterr().err


def test_sparse_quality_smoke(tmp_path, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 60)
    out = tmp_path / "quality.json"
    assert sparse_quality.main(["--data", str(data), "--iters", "2", "--eval-batches", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "sparse_ff", "both"]
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["val_loss"] > 0 and r["tokens"] == 2 * 12 * 64
        assert r["ratio"] == pytest.approx(r["val_loss"] / rows[0]["val_loss"])
    assert sparse_quality.main(["--data", str(data), "--variants", "sparse"]) == 2
