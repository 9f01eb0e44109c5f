"""Convert between this engine's GPT and the Hugging Face GPT-2 checkpoint layout
(``model.safetensors`` + ``config.json``, as ``GPT2LMHeadModel.save_pretrained`` writes).

Names are the same on both sides (models/gpt.py uses Hugging Face's). Two differences:
  - Hugging Face's Conv1D stores weights (in, out); our Linear stores (out, in), like
    PyTorch. The four per-block projections c_attn, c_proj (attention), c_fc, c_proj (MLP)
    are transposed both ways.
  - The output layer is tied to wte: Hugging Face checkpoints carry ``lm_head.weight``
    either not at all or as a copy of wte; we write none and ignore it when reading.
Sparse models (GPTConfig.ffn_sparsity or qkv_modules > 0, Jaszczur et al. 2021) have no
GPT-2 counterpart: save_hf and expected_shapes refuse them with a one-line ValueError.
Reading also accepts the original OpenAI-converted files, whose names lack the
``transformer.`` prefix and which carry the causal-mask buffers ``attn.bias`` and
``attn.masked_bias`` (not parameters: ignored), and sharded directories
(``model.safetensors.index.json`` naming the shard file of every tensor, as
``save_pretrained(max_shard_size=...)`` writes). ``pytorch_model.bin`` (a pickle) is never
read. Configurations our GPT computes differently are refused with a one-line ValueError
(``scale_attn_weights=false``: attention logits not divided by sqrt(head size); other
activations, epsilons, inner widths, untied output layers, cross-attention).
"""
import json
import os

import numpy as np

from engine import backend
from engine.io import atomic_write_json, load_safetensors, save_safetensors

from .gpt import GPT, GPTConfig

_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")   # both are the tanh form of GELU


def _is_conv1d(name):
    return name.endswith(_CONV1D)


def to_hf(state_dict):
    """Our state dict (name -> array, any device) -> Hugging Face GPT-2 names and layouts, host arrays."""
    out = {}
    for name, a in state_dict.items():
        a = backend.to_numpy(a)
        out[name] = np.ascontiguousarray(a.T if _is_conv1d(name) else a)   # (out, in) -> (in, out)
    return out


def _refuse_sparse(config):
    if config.sparse:
        raise ValueError("Hugging Face GPT-2 has no sparse or Terraformer layers: a model with ffn_sparsity, "
                         "qkv_modules or loss_sparsity > 0, reversible or LSH attention (Jaszczur et al. 2021) "
                         "cannot be converted; keep it as an engine checkpoint")


def expected_shapes(config):
    """Our parameter names and shapes for a config (what from_hf checks against)."""
    _refuse_sparse(config)
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    shapes = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (config.block_size, C)}
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
            p + "attn.c_attn.weight": (3 * C, C), p + "attn.c_attn.bias": (3 * C,),
            p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
            p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
            p + "mlp.c_fc.weight": (4 * C, C), p + "mlp.c_fc.bias": (4 * C,),
            p + "mlp.c_proj.weight": (C, 4 * C), p + "mlp.c_proj.bias": (C,),
        })
    shapes.update({"transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)})
    return shapes


def from_hf(hf_state_dict, config):
    """Hugging Face GPT-2 tensors (name -> array) -> our state dict (name -> host array),
    checked name by name and shape by shape against ``config``; one-line ValueError otherwise."""
    expected = expected_shapes(config)
    out = {}
    for name, a in hf_state_dict.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue                                   # mask buffers; the tied output layer
        ours = name if name.startswith("transformer.") else "transformer." + name
        if ours not in expected:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint")
        a = np.asarray(a)
        a = a.T if _is_conv1d(ours) else a             # (in, out) -> (out, in)
        if a.shape != expected[ours]:
            raise ValueError(f"shape mismatch for {ours}: checkpoint has {a.shape}, "
                             f"config expects {expected[ours]}")
        out[ours] = np.ascontiguousarray(a)
    missing = [n for n in expected if n not in out]
    if missing:
        raise ValueError(f"missing tensor {missing[0]!r} in the Hugging Face checkpoint"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return {n: out[n] for n in expected}               # in registration order


def hf_config(config, dtype="float32"):
    """The GPT2Config fields (config.json) for one of our configs whose parameters are ``dtype``
    (``dtype`` is the field transformers 5 reads, ``torch_dtype`` the older name)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,                               # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None, "eos_token_id": None,    # byte/char vocabularies have none
        "use_cache": True,
        "dtype": str(dtype), "torch_dtype": str(dtype),
    }


def config_from_hf(hf):
    """GPTConfig from a config.json dict; one-line ValueError for what our GPT cannot express."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json model_type is {hf.get('model_type')!r}, expected 'gpt2'")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(f"config.json activation_function {act!r} is not the tanh GELU (gelu_new)")
    n_inner = hf.get("n_inner")
    if n_inner not in (None, 4 * hf.get("n_embd", 768)):
        raise ValueError(f"config.json n_inner {n_inner} != 4 * n_embd is not supported")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"config.json layer_norm_epsilon must be a number, got {eps!r}")
    if abs(eps - 1e-5) > 1e-12:
        raise ValueError(f"config.json layer_norm_epsilon {hf['layer_norm_epsilon']} != 1e-5 is not supported")
    if hf.get("scale_attn_weights", True) is not True:
        raise ValueError(f"config.json scale_attn_weights={json.dumps(hf['scale_attn_weights'])} is not supported "
                         "(our attention always divides the logits by sqrt(head size))")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if hf.get(flag):
            raise ValueError(f"config.json {flag}=true is not supported")
    if hf.get("tie_word_embeddings", True) is False:
        raise ValueError("config.json tie_word_embeddings=false is not supported (the output layer is wte)")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
                     n_embd=hf.get("n_embd", 768), dropout=0.0, bias=True)


def save_hf(model, directory):
    """Write model.safetensors and config.json that transformers.GPT2LMHeadModel.from_pretrained reads."""
    _refuse_sparse(model.config)
    if not model.config.bias:
        raise ValueError("GPT-2's layout has biases: a model with bias=False cannot be saved as Hugging Face GPT-2")
    os.makedirs(directory, exist_ok=True)
    tensors = to_hf(model.state_dict())
    dtypes = sorted({str(a.dtype) for a in tensors.values()})
    if len(dtypes) != 1:
        raise ValueError(f"a Hugging Face config.json names one dtype; the model has {'+'.join(dtypes)} parameters")
    save_safetensors(os.path.join(directory, "model.safetensors"), tensors, metadata={"format": "pt"})
    atomic_write_json(os.path.join(directory, "config.json"), hf_config(model.config, dtypes[0]))


INDEX = "model.safetensors.index.json"


def read_hf_tensors(directory):
    """{name: array} of a Hugging Face directory's weights: model.safetensors, or the shards
    that model.safetensors.index.json maps every tensor to; one-line error otherwise."""
    st_path, index_path = os.path.join(directory, "model.safetensors"), os.path.join(directory, INDEX)
    if os.path.isfile(st_path):
        return load_safetensors(st_path)[0]
    if not os.path.isfile(index_path):
        pickled = os.path.isfile(os.path.join(directory, "pytorch_model.bin"))
        raise FileNotFoundError(f"{st_path}: no such file (a Hugging Face GPT-2 directory has config.json and "
                                f"model.safetensors or {INDEX})"
                                + ("; pytorch_model.bin is a pickle and is not read: convert it to safetensors"
                                   if pickled else ""))
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index_path}: no weight_map of tensor name -> shard file")
    shards = sorted(set(weight_map.values()))
    for shard in shards:                                   # every file named and present before any read
        if os.path.basename(shard) != shard or shard in (".", ".."):
            raise ValueError(f"{index_path}: shard {shard!r} is not a file name in {directory}")
        if not os.path.isfile(os.path.join(directory, shard)):
            raise FileNotFoundError(f"{os.path.join(directory, shard)}: no such file ({INDEX} maps tensors to it)")
    tensors = {}
    for shard in shards:
        path = os.path.join(directory, shard)
        for name, a in load_safetensors(path)[0].items():
            where = weight_map.get(name)
            if where is None:
                raise ValueError(f"{path} holds {name!r}, which {INDEX} does not list")
            if where != shard:
                raise ValueError(f"{path} holds {name!r}, which {INDEX} maps to {where}")
            tensors[name] = a
    missing = [n for n in weight_map if n not in tensors]
    if missing:
        raise ValueError(f"{os.path.join(directory, weight_map[missing[0]])} lacks {missing[0]!r} "
                         f"that {INDEX} maps to it" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return tensors


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_hf(directory, rng=None, dtype=None):
    """A GPT with the weights of a Hugging Face GPT-2 directory (config.json + model.safetensors,
    or model.safetensors.index.json and its shards). Its parameters are ``dtype``; None:
    float64 if the file's tensors all are (a float64 export of save_hf), else float32."""
    cfg_path = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: no such file (a Hugging Face GPT-2 directory has "
                                f"config.json and model.safetensors)")
    hf = _read_json(cfg_path)
    if not isinstance(hf, dict):
        raise ValueError(f"{cfg_path}: not a JSON object")
    config = config_from_hf(hf)
    state = from_hf(read_hf_tensors(directory), config)
    if dtype is None:
        dtype = "float64" if all(a.dtype == np.float64 for a in state.values()) else "float32"
    model = GPT(config, rng=rng)
    if np.dtype(dtype) != model.transformer.wte.weight.dtype:
        model.astype(dtype)
    dtype = model.transformer.wte.weight.dtype
    model.load_state_dict({n: a.astype(dtype, copy=False) for n, a in state.items()})
    return model
