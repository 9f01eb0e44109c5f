"""bench/sparse_decode.py and bench/sparse_quality.py run end to end at tiny sizes and write the
JSON rows they promise; bad arguments exit 2 with one line."""
import json

import pytest

from bench import blas_core, sparse_decode, sparse_quality
from engine import backend


def test_sparse_decode_smoke(tmp_path, capsys):
    out = tmp_path / "decode.json"
    assert sparse_decode.main(["--shapes", "tiny", "--prompt", "3", "--warmup", "1", "--tokens", "2",
                               "--triad-mib", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "sparse_ff", "sparse_qkv", "both"]
    dense = rows[0]["s_per_token"]
    for r in rows:
        assert r["shape"] == "tiny" and r["device"] == backend.device() and r["s_per_token"] > 0 and r["triad_gb_per_s"] > 0
        assert r["blas_core"] == ("-" if backend.device() != "cpu" else blas_core())
        assert r["read_gb_per_s"] > 0 and r["bw_gb_per_s"] == max(r["triad_gb_per_s"], r["read_gb_per_s"])
        assert r["speedup"] == pytest.approx(dense / r["s_per_token"])
        assert r["bw_fraction"] == pytest.approx(r["bytes_per_token"] / r["s_per_token"] / 1e9 / r["bw_gb_per_s"])
    assert rows[3]["paper_s_per_token"] == 0.061
    printed = capsys.readouterr().out
    assert "paper s/token" in printed and "sparse_qkv" in printed and "decoding on " in printed and "of bw" in printed and "read" in printed


def test_weight_bytes_per_token_counts_what_a_decoded_token_reads():
    """tiny: d 32, d_ff 128, 2 layers, vocab 64, N 8 (16 units of 128 read), S 4 (M 8); float32."""
    d, dff, L, V = 32, 128, 2, 64
    dense_block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (2 * d * dff + dff + d)   # 2 LNs, c_attn, c_proj, MLP
    dense = L * dense_block + 2 * d + V * d + d + d                                     # ln_f, wte (head + a row), wpe row
    assert sparse_decode.weight_bytes_per_token(sparse_decode.build("tiny", "dense", 8)) == 4 * dense
    ffn_read = 2 * (dff // 8) * d + (64 * d + dff * 64 + dff) + d                       # rows, controller (r 64), b2
    sparse = dense - L * (2 * d * dff + dff + d) + L * ffn_read
    assert sparse_decode.weight_bytes_per_token(sparse_decode.build("tiny", "sparse_ff", 8)) == 4 * sparse


def test_sparse_decode_bad_shape_exits_2(capsys):
    assert sparse_decode.main(["--shapes", "huge"]) == 2
    assert "unknown shape 'huge'" in capsys.readouterr().err
    assert sparse_decode.main(["--shapes", "tiny", "--threads", "1,x"]) == 2
    assert "--threads takes positive integers" in capsys.readouterr().err


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
