"""models/hf.py: our GPT <-> the Hugging Face GPT-2 layout. Round trips need only NumPy; the
interoperability tests open our files with transformers.GPT2LMHeadModel and the other way."""
import json
import os

import numpy as np
import pytest

from engine.autograd import no_grad
from engine.backend import to_device, to_numpy
from engine.io import load_safetensors, save_safetensors
from models.gpt import GPT, GPTConfig
from models.hf import from_hf, load_hf, save_hf, to_hf

CFG = dict(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
TRANSFORMERS_REASON = "transformers (with torch) is the interoperability oracle (pip install -e .[test])"


def logits_of(model, idx):
    model.eval()
    with no_grad():
        return model(idx)[0].numpy()


def idx(B=2, T=12, V=CFG["vocab_size"]):
    return np.random.default_rng(3).integers(0, V, (B, T))


def test_to_hf_transposes_conv1d_and_round_trips():
    model = GPT(GPTConfig(**CFG), rng=0)
    hf = to_hf(model.state_dict())
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)   # Conv1D (in, out)
    assert hf["transformer.h.1.mlp.c_proj.weight"].shape == (64, 16)
    assert hf["transformer.wte.weight"].shape == (40, 16)               # embeddings unchanged
    assert "lm_head.weight" not in hf
    back = from_hf(hf, model.config)
    assert list(back) == list(model.state_dict())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back[k], to_numpy(v))


def test_save_and_load_hf_round_trip(tmp_path):
    model = GPT(GPTConfig(**CFG), rng=0)
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 16 and cfg["activation_function"] == "gelu_new"
    loaded = load_hf(tmp_path)
    assert loaded.config == model.config
    np.testing.assert_array_equal(logits_of(loaded, idx()), logits_of(model, idx()))


def test_load_hf_accepts_openai_names_and_mask_buffers(tmp_path):
    model = GPT(GPTConfig(**CFG), rng=0)
    save_hf(model, tmp_path)
    tensors, _ = load_safetensors(str(tmp_path / "model.safetensors"))
    old = {k[len("transformer."):]: v for k, v in tensors.items()}      # the original gpt2 files
    for i in range(2):
        old[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), np.float32))
        old[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    old["lm_head.weight"] = tensors["transformer.wte.weight"]
    save_safetensors(str(tmp_path / "model.safetensors"), old)
    np.testing.assert_array_equal(logits_of(load_hf(tmp_path), idx()), logits_of(model, idx()))


def test_load_hf_shape_mismatch_is_one_line(tmp_path):
    save_hf(GPT(GPTConfig(**CFG)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_embd"], cfg["n_head"] = 32, 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="shape mismatch for transformer.wte.weight") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "nowhere")


def test_our_checkpoint_opens_in_transformers(tmp_path):
    pytest.importorskip("torch", reason=TRANSFORMERS_REASON)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_REASON)
    import torch
    model = GPT(GPTConfig(**CFG), rng=0)
    for _, p in model.named_parameters():      # make LayerNorms and biases non-trivial
        p.data[...] += to_device(np.random.default_rng(1).normal(0, 0.05, p.shape).astype(p.dtype))
    save_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(model, idx()), hf_logits, rtol=1e-5, atol=1e-5)


def tiny_transformers_gpt2():
    """(torch, a seeded transformers GPT2LMHeadModel of the CFG shape, in eval mode)."""
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_REASON)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_REASON)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=40,
                                     bos_token_id=None, eos_token_id=None)
    return torch, transformers.GPT2LMHeadModel(config).eval()


def test_transformers_checkpoint_loads(tmp_path):
    torch, hf = tiny_transformers_gpt2()
    hf.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors")
    ours = load_hf(tmp_path)
    assert ours.config == GPTConfig(**CFG)
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(ours, idx()), hf_logits, rtol=1e-5, atol=1e-5)


def test_load_hf_refuses_unscaled_attention_and_bad_fields(tmp_path):
    save_hf(GPT(GPTConfig(**CFG)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["scale_attn_weights"] = False                       # GPT-2 variants without 1/sqrt(hs)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="scale_attn_weights=false is not supported") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)
    cfg["scale_attn_weights"], cfg["layer_norm_epsilon"] = True, "1e-5"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer_norm_epsilon must be a number, got '1e-5'"):
        load_hf(tmp_path)


def test_float64_export_names_its_dtype(tmp_path):
    model = GPT(GPTConfig(**CFG), rng=0)
    model.astype("float64")
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    tensors, _ = load_safetensors(str(tmp_path / "model.safetensors"))
    assert {str(a.dtype) for a in tensors.values()} == {"float64"}
    assert cfg["dtype"] == cfg["torch_dtype"] == "float64"
    save_hf(GPT(GPTConfig(**CFG), rng=0), tmp_path / "f32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    loaded = load_hf(tmp_path)                              # read back as it was written
    assert loaded.transformer.wte.weight.dtype == np.float64
    np.testing.assert_array_equal(logits_of(loaded, idx()), logits_of(model, idx()))
    assert load_hf(tmp_path, dtype="float32").transformer.wte.weight.dtype == np.float32
    assert load_hf(tmp_path / "f32").transformer.wte.weight.dtype == np.float32


def shard(tmp_path, model):
    """model's Hugging Face tensors split over three shard files with an index, as
    save_pretrained(max_shard_size=...) writes them."""
    tensors = to_hf(model.state_dict())
    names = list(tensors)
    weight_map = {}
    for i, part in enumerate((names[:5], names[5:17], names[17:])):
        fname = f"model-0000{i + 1}-of-00003.safetensors"
        save_safetensors(str(tmp_path / fname), {n: tensors[n] for n in part}, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_load_hf_reads_sharded_directories(tmp_path):
    model = GPT(GPTConfig(**CFG), rng=0)
    save_hf(model, tmp_path)
    weight_map = shard(tmp_path, model)
    np.testing.assert_array_equal(logits_of(load_hf(tmp_path), idx()), logits_of(model, idx()))
    index = tmp_path / "model.safetensors.index.json"
    for bad, match in ((dict(weight_map, **{"transformer.wte.weight": "../elsewhere.safetensors"}),
                        "is not a file name"),
                       (dict(weight_map, **{"transformer.extra": "model-00001-of-00003.safetensors"}),
                        "lacks 'transformer.extra'"),
                       ({k: v for k, v in weight_map.items() if k != "transformer.wte.weight"},
                        "does not list"),
                       (dict(weight_map, **{"transformer.wte.weight": "model-00009-of-00003.safetensors"}),
                        "no such file")):
        index.write_text(json.dumps({"weight_map": bad}))
        with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
            load_hf(tmp_path)
        assert "\n" not in str(e.value)
    index.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin is a pickle and is not read"):
        load_hf(tmp_path)


def test_sharded_transformers_checkpoint_loads(tmp_path):
    torch, hf = tiny_transformers_gpt2()
    hf.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(load_hf(tmp_path), idx()), hf_logits, rtol=1e-5, atol=1e-5)


def test_float64_checkpoint_opens_in_transformers_as_float64(tmp_path):
    pytest.importorskip("torch", reason=TRANSFORMERS_REASON)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_REASON)
    import torch
    model = GPT(GPTConfig(**CFG), rng=0)
    model.astype("float64")
    save_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), dtype="auto").eval()
    assert hf.dtype == torch.float64
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(model, idx()), hf_logits, rtol=1e-10, atol=1e-10)
