"""models/hf.py: our GPT <-> the Hugging Face GPT-2 layout. Round trips need only NumPy; the
interoperability tests open our files with transformers.GPT2LMHeadModel and the other way."""
import json
import os

import numpy as np
import pytest

from engine.autograd import no_grad
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
        np.testing.assert_array_equal(back[k], v)


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
        p.data[...] += np.random.default_rng(1).normal(0, 0.05, p.shape).astype(p.dtype)
    save_hf(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(model, idx()), hf_logits, rtol=1e-5, atol=1e-5)


def test_transformers_checkpoint_loads(tmp_path):
    torch = pytest.importorskip("torch", reason=TRANSFORMERS_REASON)
    transformers = pytest.importorskip("transformers", reason=TRANSFORMERS_REASON)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=16, vocab_size=40,
                                     bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "model.safetensors")
    ours = load_hf(tmp_path)
    assert ours.config == GPTConfig(**CFG)
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx())).logits.numpy()
    np.testing.assert_allclose(logits_of(ours, idx()), hf_logits, rtol=1e-5, atol=1e-5)
