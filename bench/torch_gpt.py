"""The PyTorch side of bench/train_step.py: nanoGPT's model (Karpathy, nanoGPT model.py, flash
path: Linear layout, scaled_dot_product_attention, tanh GELU, tied wte) and its training step
(forward with the loss, backward, clip_grad_norm_ 1.0, AdamW non-fused on the CPU as nanoGPT
picks it, fused on CUDA, zero_grad). Same parameter names and layouts as models/gpt.py, so it
starts from the engine's initial weights. Cost and memory: PyTorch eager's; nothing of it is a
runtime dependency of the engine (bench and tests only).
"""
from engine import backend

TRAIN = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, grad_clip=1.0)   # bench/train_step.py's


def torch_gpt(torch, cfg):
    """nanoGPT's model.py (flash path) in miniature: same names and layouts as models/gpt.py."""
    nn, F = torch.nn, torch.nn.functional
    C, nh, p = cfg.n_embd, cfg.n_head, cfg.dropout

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj, self.resid_dropout = nn.Linear(C, 3 * C), nn.Linear(C, C), nn.Dropout(p)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))   # (B, nh, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p if self.training else 0, is_causal=True)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(C), Attention(), nn.LayerNorm(C)
            self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C)))
            self.mlp_dropout = nn.Dropout(p)

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            m = self.mlp
            return x + self.mlp_dropout(m.c_proj(F.gelu(m.c_fc(self.ln_2(x)), approximate="tanh")))

    class TorchGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(cfg.vocab_size, C), wpe=nn.Embedding(cfg.block_size, C), drop=nn.Dropout(p),
                h=nn.ModuleList([Block() for _ in range(cfg.n_layer)]), ln_f=nn.LayerNorm(C)))
            self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
            self.lm_head.weight = self.transformer.wte.weight

        def forward(self, idx, targets):
            t = self.transformer
            x = t.drop(t.wte(idx) + t.wpe(torch.arange(idx.shape[1], device=idx.device)))
            for block in t.h:
                x = block(x)
            logits = self.lm_head(t.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    return TorchGPT()


class TorchTrainer:
    """nanoGPT's step on ``device`` ('cpu' or 'cuda'); fused AdamW on CUDA, as nanoGPT picks it."""

    def __init__(self, torch, cfg, initial, decay, device="cpu", batcher=None):
        self.torch, self.device, self.batcher = torch, torch.device(device), batcher
        self.model = torch_gpt(torch, cfg)
        self.model.load_state_dict({k: torch.from_numpy(backend.to_numpy(v)) for k, v in initial.items()},
                                   strict=False)
        self.model.to(self.device)
        named = list(self.model.named_parameters())
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": TRAIN["weight_decay"]},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(groups, lr=TRAIN["lr"], betas=TRAIN["betas"], **fused)

    def step(self, lr, batch=None):
        """One step on ``batch`` (x, y) (B, T) int64, or the next of ``self.batcher`` (the same
        windows train.py draws, so the two sides see the same data)."""
        torch = self.torch
        x, y = self.batcher.next() if batch is None else batch
        x, y = x.copy(), y.copy()                              # contiguous, as nanoGPT's get_batch
        for g in self.opt.param_groups:
            g["lr"] = lr
        _, loss = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(y).to(self.device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), TRAIN["grad_clip"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()

    def synchronize(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()
