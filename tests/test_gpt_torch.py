"""models/gpt.py against an independent PyTorch GPT-2 (nanoGPT-style, written below) with the
same weights: logits, loss and every parameter gradient in float32 within 1e-5. Plus the
parts that need no oracle: config validation, names, KV-cache decoding, dropout, counting."""
import math

import numpy as np
import pytest

from engine.autograd import no_grad
from engine.backend import to_device, to_numpy
from models.gpt import GPT, GPTConfig

TORCH_REASON = "torch is the test oracle for the GPT (pip install -e .[test])"
SMALL = dict(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16)


def torch_gpt(torch, cfg):
    """A GPT-2 written directly in PyTorch, nanoGPT's model.py in miniature (Linear layout)."""
    nn, F = torch.nn, torch.nn.functional
    C, nh = cfg.n_embd, cfg.n_head

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // nh)
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            return self.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2, self.mlp = nn.LayerNorm(C), Attention(), nn.LayerNorm(C), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, C), wpe=nn.Embedding(cfg.block_size, C),
                h=nn.ModuleList([Block() for _ in range(cfg.n_layer)]), ln_f=nn.LayerNorm(C)))
            self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight        # tied

        def forward(self, idx, targets=None):
            t = self.transformer
            x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
            for block in t.h:
                x = block(x)
            logits = self.lm_head(t.ln_f(x))
            loss = None if targets is None else F.cross_entropy(
                logits.view(-1, logits.shape[-1]), targets.view(-1), ignore_index=-1)
            return logits, loss

    return TorchGPT()


def load_into_torch(torch, model, ours):
    sd = {k: torch.from_numpy(np.array(to_numpy(v))) for k, v in ours.state_dict().items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []   # the tied output layer


def batch(cfg, B=3, T=None, seed=1):
    rng = np.random.default_rng(seed)
    T = cfg.block_size if T is None else T
    return rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


def close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("ignore", [False, True])
def test_logits_loss_and_every_gradient_match_torch(ignore):
    torch = pytest.importorskip("torch", reason=TORCH_REASON)
    cfg = GPTConfig(**SMALL)
    ours = GPT(cfg, rng=np.random.default_rng(0))
    # Non-trivial LayerNorm parameters, so their gradients and effect are exercised too.
    r = np.random.default_rng(5)
    for name, p in ours.named_parameters():
        if ".ln_" in name or "ln_f" in name:
            p.data[...] += to_device(r.normal(0, 0.1, p.shape).astype(p.dtype))
    ref = torch_gpt(torch, cfg)
    load_into_torch(torch, ref, ours)
    idx, targets = batch(cfg)
    if ignore:
        targets[0, :5] = -1

    logits, loss = ours(idx, targets)
    loss.backward()
    t_logits, t_loss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    t_loss.backward()

    close(logits.numpy(), t_logits.detach().numpy(), "logits")
    close(loss.item(), t_loss.item(), "loss")
    t_params = dict(ref.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert names == list(t_params)                     # same names, same order, lm_head tied away
    for name, p in ours.named_parameters():
        close(to_numpy(p.grad), t_params[name].grad.numpy(), f"grad of {name}")


def test_parameter_names_are_hugging_face_gpt2():
    cfg = GPTConfig(**SMALL)
    names = [n for n, _ in GPT(cfg).named_parameters()]
    block = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    assert names == (["transformer.wte.weight", "transformer.wpe.weight"]
                     + [f"transformer.h.{i}.{b}" for i in range(cfg.n_layer) for b in block]
                     + ["transformer.ln_f.weight", "transformer.ln_f.bias"])


def test_gpt2_init_scales_residual_projections():
    cfg = GPTConfig(block_size=64, vocab_size=256, n_layer=8, n_head=4, n_embd=128)
    sd = GPT(cfg, rng=3).state_dict()
    assert abs(sd["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    assert abs(sd["transformer.h.0.mlp.c_proj.weight"].std() - 0.02 / math.sqrt(16)) < 2e-4
    assert not sd["transformer.h.0.attn.c_attn.bias"].any()
    assert (sd["transformer.ln_f.weight"] == 1).all()


def test_counts():
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg)
    C, V, L, T = cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.block_size
    per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    n = V * C + T * C + L * per_block + 2 * C
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) == n - T * C
    assert model.flops_per_token() == 6 * (n - T * C) + 12 * L * T * C


@pytest.mark.parametrize("field,value", [("n_embd", 17), ("n_layer", 0), ("block_size", -1),
                                         ("vocab_size", 2.5), ("dropout", 1.0), ("dropout", -0.1),
                                         ("n_head", True)])
def test_bad_config_names_the_field(field, value):
    kwargs = dict(SMALL, **{field: value})
    with pytest.raises(ValueError, match=field) as e:
        GPTConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_explicit_positions_equal_default():
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg)
    idx, _ = batch(cfg, T=10)
    with no_grad():
        base = model(idx)[0].numpy()
        same = model(idx, pos=np.arange(10))[0].numpy()
        per_row = model(idx, pos=np.tile(np.arange(10), (3, 1)))[0].numpy()
        shifted = model(idx, pos=np.arange(3, 13))[0].numpy()
    np.testing.assert_array_equal(base, same)
    np.testing.assert_array_equal(base, per_row)
    assert not np.allclose(base, shifted)
    with pytest.raises(ValueError, match="positions"):
        model(idx, pos=np.arange(10, 20))
    with pytest.raises(ValueError, match="block_size"):
        model(batch(cfg, T=17)[0])


@pytest.mark.parametrize("prompt_len,new", [(5, 8), (4, 30)])   # the second slides past block_size
def test_generate_with_kv_cache_equals_recompute(prompt_len, new):
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg, rng=1)
    model.astype(np.float64)      # greedy argmax: keep rounding far from any near-tie
    prompt, _ = batch(cfg, B=2, T=prompt_len, seed=7)
    cached = model.generate(prompt, new, temperature=0)
    full = model.generate(prompt, new, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new)
    np.testing.assert_array_equal(cached[:, :prompt_len], prompt)
    np.testing.assert_array_equal(cached, full)
    assert model.training                              # mode restored


def test_generate_sampling_top_k_and_temperature():
    cfg = GPTConfig(**SMALL)
    model = GPT(cfg, rng=2)
    prompt = np.array([[1, 2, 3]])
    a = model.generate(prompt, 20, temperature=1.0, top_k=5, rng=11)
    b = model.generate(prompt, 20, temperature=1.0, top_k=5, rng=11)
    np.testing.assert_array_equal(a, b)                # same rng seed, same tokens
    assert not np.array_equal(a, model.generate(prompt, 20, rng=12))
    np.testing.assert_array_equal(model.generate(prompt, 10, top_k=1, rng=0),
                                  model.generate(prompt, 10, temperature=0))
    assert model.generate(prompt[0], 4, rng=0).shape == (7,)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, 1, top_k=0)


def test_dropout_train_differs_from_eval_and_reproduces_from_seed():
    """Dropout masks are counter-based (engine/random.py): fresh at every step, the same at the
    same step and seed, and a half batch located at its global rows draws its rows' masks."""
    cfg = GPTConfig(**dict(SMALL, dropout=0.2))
    idx, targets = batch(cfg)

    def train_losses(seed, steps=2):
        model = GPT(cfg, rng=seed)
        out = []
        for k in range(steps):
            model.noise.set_step(k + 1)
            out.append(model(idx, targets)[1].item())
        return out, model

    (l1, l2), model = train_losses(4)
    assert l1 != l2                                    # fresh masks each step
    assert train_losses(4)[0] == [l1, l2]              # same seed, same masks
    assert train_losses(5)[0][0] != l1                 # another seed, other masks
    model.eval()
    with no_grad():
        e1, e2 = model(idx, targets)[1].item(), model(idx, targets)[1].item()
    assert e1 == e2 and e1 != l1                       # eval: no dropout
    model.train()
    model.noise.set_step(1)                            # the generator has no state beyond its step
    assert model(idx, targets)[1].item() == l1
    # rows [1, 3) alone, located at their global rows, give the logits those rows get in the whole batch
    full = model(idx)[0].data
    with model.noise.located(rows=np.arange(1, 3)):
        half = model(idx[1:3])[0].data
    np.testing.assert_allclose(to_numpy(half), to_numpy(full[1:3]), rtol=1e-5, atol=1e-6)   # other masks would differ by O(1)


@pytest.mark.parametrize("T", [16, 300])      # 300 > 256: the blockwise (multi-block) kernel
def test_attention_fn_override_equals_fused_default(T):
    """The generic path (split, transposes, any attention_fn) computes what the fused default does."""
    from engine import ops
    cfg = GPTConfig(**dict(SMALL, block_size=T, n_layer=1) if T > 16 else SMALL)
    idx, targets = batch(cfg, B=2)
    results = []
    for override in (False, True):
        model = GPT(cfg, rng=0)
        if override:
            for block in model.blocks:
                block.attn.attention_fn = lambda q, k, v: ops.attention(q, k, v, causal=True)
        logits, loss = model(idx, targets)
        loss.backward()
        results.append([logits.numpy()] + [to_numpy(p.grad) for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
