"""int8 weight-only decoding (engine/int8.py, models/quantized.py, sample.py --quantize): the
per-row product against the dequantized matrix in float64, whole GPTs (dense, sparse FFN, sparse
QKV, both) against the float GPT holding the dequantized weights, the file round trip, sample.py's
CLI and its bad input, and bench/int8_decode.py end to end at the tiny shape."""
import json

import numpy as np
import pytest

import sample
from engine import int8
from engine.autograd import no_grad
from engine.backend import to_numpy
from engine.checkpoint import save_checkpoint
from engine.int8 import Int8Weight
from engine.io import load_safetensors
from models.gpt import GPT, GPTConfig
from models.quantized import dequantized_state, int8_tensors, load_int8, quantize_gpt

SPARSE = {"dense": {}, "sparse_ff": dict(ffn_sparsity=8), "sparse_qkv": dict(qkv_modules=4),
          "both": dict(ffn_sparsity=8, qkv_modules=4)}


def config(**kw):
    return GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=32, **kw)


@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (300, 64), (97, 1000)])
@pytest.mark.parametrize("n", [1, 3])
def test_matmul_t_is_x_times_the_dequantized_matrix(monkeypatch, shape, n):
    """Small BLOCKs force several row blocks and a short last one; float64 reference."""
    monkeypatch.setattr(int8, "BLOCK", 256)
    monkeypatch.setattr(int8, "_scratch", type(int8._scratch)())
    rng = np.random.default_rng(shape[0])
    w = rng.standard_normal(shape).astype(np.float32)
    w[0] = 0.0                                                         # an all-zero row: scale 0
    q = Int8Weight.quantize(w)
    assert q.codes.dtype == np.int8 and q.codes.shape == shape and q.scales.shape == (shape[0],)
    deq = q.dequantize().astype(np.float64)
    assert np.all(np.abs(w - deq) <= q.scales[:, None].astype(np.float64) / 2)   # engine/quantize's bound, per row
    assert np.all(q.dequantize()[0] == 0) and q.scales[0] == 0
    x = rng.standard_normal((2, n, shape[1])).astype(np.float32)
    y = q.matmul_t(x)
    assert y.shape == (2, n, shape[0]) and y.dtype == np.float32
    ref = x.astype(np.float64) @ deq.T
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert q.nbytes == shape[0] * shape[1] + 4 * shape[0]


def test_int8_weight_refuses_bad_codes_and_shapes():
    with pytest.raises(ValueError, match="codes must be a 2-D int8 array"):
        Int8Weight(np.zeros((2, 3), np.int16), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match=r"scales must be float32 of shape \(2,\)"):
        Int8Weight(np.zeros((2, 3), np.int8), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="x has 4 features, the weight 3"):
        Int8Weight(np.zeros((2, 3), np.int8), np.zeros(2, np.float32)).matmul_t(np.zeros((1, 4), np.float32))


@pytest.mark.parametrize("variant", list(SPARSE))
def test_int8_gpt_computes_the_float_gpt_of_its_dequantized_weights(variant):
    """Logits of a whole window (prefill, a sparse FFN on more rows than N) and of cached
    decoding match the float model loaded with dequantize(Q) * s; greedy tokens are the same;
    every matrix a token is multiplied by was replaced."""
    cfg = config(**SPARSE[variant])
    q = quantize_gpt(GPT(cfg, rng=1))
    ref = GPT(cfg, rng=1).eval()
    ref.load_state_dict(dequantized_state(q))
    names = [n for n, _ in q.named_parameters()]
    assert not any(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "wte.weight", ".w1", ".w2",
                               ".c1", ".c2", ".E", ".wq", ".wk", ".wv")) for n in names), names
    idx = np.random.default_rng(0).integers(0, 40, (3, 12))
    with no_grad():
        lq, lr = q(idx)[0].data, ref(idx)[0].data
    np.testing.assert_allclose(to_numpy(lq), to_numpy(lr), rtol=1e-4, atol=1e-5)
    prompt = idx[:2, :5]
    out_q = q.generate(prompt, 14, temperature=0)                  # past block_size: the window slides
    assert np.array_equal(out_q, ref.generate(prompt, 14, temperature=0))
    assert np.array_equal(out_q, q.generate(prompt, 14, temperature=0, use_cache=False))


def test_int8_layers_refuse_to_record_a_graph():
    q = quantize_gpt(GPT(config(), rng=0))
    with pytest.raises(RuntimeError, match="int8 weights are for inference"):
        q(np.zeros((1, 4), np.int64))


@pytest.mark.parametrize("variant", ["dense", "both"])
def test_a_file_reads_back_the_model_quantized_at_load(tmp_path, variant):
    """int8_tensors -> safetensors -> load_int8 into a differently seeded GPT: the same codes,
    scales, float parameters and logits, bitwise; a file that does not fit is refused."""
    from engine.io import save_safetensors
    cfg = config(**SPARSE[variant])
    q = quantize_gpt(GPT(cfg, rng=1))
    path = tmp_path / "q.safetensors"
    save_safetensors(str(path), int8_tensors(q))
    tensors, _ = load_safetensors(str(path))
    assert {k: v.dtype for k, v in tensors.items() if k.endswith(".int8")} and \
        all(v.dtype == np.int8 for k, v in tensors.items() if k.endswith(".int8"))
    back = load_int8(GPT(cfg, rng=7), tensors)
    a, b = int8_tensors(q), int8_tensors(back)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    idx = np.random.default_rng(2).integers(0, 40, (2, 9))
    with no_grad():
        assert np.array_equal(q(idx)[0].data, back(idx)[0].data)
    wrong = GPT(config(**SPARSE[variant], ffn_lowrank=32) if variant == "both" else GPTConfig(
        block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=64), rng=0)
    with pytest.raises(ValueError, match="int8 file: .* has shape"):
        load_int8(wrong, tensors)
    extra = dict(tensors, **{"transformer.h.9.mlp.c_fc.weight.int8": tensors["transformer.h.0.attn.c_proj.weight.int8"]})
    with pytest.raises(ValueError, match="transformer.h.9.mlp.c_fc.weight.int8 matches no weight"):
        load_int8(GPT(cfg, rng=7), extra)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A byte-level sparse-both GPT saved as an engine/checkpoint.py checkpoint."""
    d = tmp_path_factory.mktemp("ckpt")
    cfg = GPTConfig(block_size=16, vocab_size=256, n_layer=2, n_head=2, n_embd=32, ffn_sparsity=8, qkv_modules=4)
    model = GPT(cfg, rng=3)
    manifest = {"config": {"model": vars(cfg), "train": {"dtype": "float32"}}, "tokenizer": {"type": "byte"}}
    save_checkpoint(str(d), 5, model.state_dict(), {}, manifest)
    return str(d)


def run(capsys, *argv):
    rc = sample.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_cli_int8_at_load_and_from_its_file(ckpt, tmp_path, capsys):
    """--quantize int8 samples; --save-quantized writes a file that --ckpt decodes to the same text."""
    args = ("--prompt", "ab", "--max-new-tokens", "12", "--temperature", "0")
    rc, at_load, err = run(capsys, "--ckpt", ckpt, "--quantize", "int8", *args)
    assert rc == 0 and err == "" and at_load.startswith("ab") and len(at_load) > 3
    f = tmp_path / "q.safetensors"
    rc, out, err = run(capsys, "--ckpt", ckpt, "--quantize", "int8", "--save-quantized", f)
    assert rc == 0 and out == f"wrote {f}\n" and err == ""
    tensors, meta = load_safetensors(str(f))
    manifest = json.loads(meta["manifest"])
    assert manifest["quantization"]["bits"] == 8 and manifest["step"] == 5 and manifest["tokenizer"] == {"type": "byte"}
    assert tensors["transformer.h.0.mlp.w1.int8"].dtype == np.int8
    rc, from_file, err = run(capsys, "--ckpt", f, *args)
    assert rc == 0 and err == "" and from_file == at_load
    rc, float_out, _ = run(capsys, "--ckpt", ckpt, *args)                # the float model decodes too
    assert rc == 0 and float_out.startswith("ab")


@pytest.mark.parametrize("argv, message", [
    (["--quantize", "int3"], "error: argument --quantize: invalid choice: 'int3'"),
    (["--save-quantized", "{tmp}/q.safetensors"], "error: --save-quantized needs --ckpt and --quantize int8"),
    (["--quantize", "int8", "--save-quantized", "{tmp}"], "already exists"),
    (["--quantize", "int8", "--save-quantized", "{tmp}/no/such/dir/q.safetensors"], "error: --save-quantized"),
    (["--quantize", "int8", "--tp", "2"], "error: --quantize int8 decodes on one process: it cannot be combined "
                                          "with --tp 2"),
])
def test_sample_cli_bad_int8_input_is_one_line_exit_2(ckpt, tmp_path, capsys, argv, message):
    rc, out, err = run(capsys, "--ckpt", ckpt, *[a.format(tmp=tmp_path) for a in argv])
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_int8_decode_bench_smoke(tmp_path, capsys):
    from bench import int8_decode
    out = tmp_path / "rows.json"
    assert int8_decode.main(["--shapes", "tiny", "--threads", "1", "--prompt", "3", "--warmup", "0",
                             "--tokens", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["dense", "int8", "both", "both_int8"]
    dense, q = rows[0], rows[1]
    assert all(r["threads"] == 1 and r["s_per_token"] > 0 for r in rows)
    assert rows[1]["speedup"] == pytest.approx(dense["s_per_token"] / q["s_per_token"])
    for f, i in ((dense, q), (rows[2], rows[3])):                                        # 1 byte + scales vs 4
        assert f["weight_bytes_per_token"] / 4 < i["weight_bytes_per_token"] < f["weight_bytes_per_token"] / 2.5
    assert "both_int8" in capsys.readouterr().out
    assert int8_decode.main(["--threads", "0"]) == 2


def test_int8_quality_bench_smoke(tmp_path, capsys):
    """Trains with train.py (2 steps) and compares float32 with int8 on that checkpoint."""
    from bench import int8_quality
    data = tmp_path / "tiny.txt"
    data.write_text("To be, or not to be, that is the question.\n" * 80)
    out = tmp_path / "quality.json"
    assert int8_quality.main(["--data", str(data), "--variants", "dense", "--steps", "2", "--windows", "2",
                              "--prompts", "1", "--new", "4", "--out-dir", str(tmp_path / "runs"),
                              "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["variant"] == "dense" and row["steps"] == 2 and row["positions"] == 2 * 128
    assert 0 <= row["argmax_agreement"] <= 1 and 0 <= row["greedy_agreement"] <= 1
    assert row["ppl_ratio"] == pytest.approx(row["ppl_int8"] / row["ppl_f32"])
    assert "argmax same" in capsys.readouterr().out
    assert int8_quality.main(["--variants", "sparse_only"]) == 2
