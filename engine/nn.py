"""Modules: parameters that know their names, and the layers GPT-2 is built from.

A ``Module`` registers every ``Parameter`` and sub-``Module`` assigned to one of its
attributes, in the order they were assigned, as PyTorch's ``nn.Module`` does. Names are
dotted paths (``h.0.attn.c_attn.weight``). A parameter reachable under two names (GPT-2
ties the token embedding ``wte`` to the output projection ``lm_head``, Press & Wolf 2017)
is listed once, under the first name; the other names are aliases that
``load_state_dict`` accepts.

``state_dict()`` returns the live arrays; ``load_state_dict`` copies into them in place,
so parameters that are views into a flat buffer (engine/flat.py) stay views.

Initialisation follows GPT-2 (Radford et al. 2019, as nanoGPT): weights ~ N(0, 0.02),
biases 0, LayerNorm weight 1. Values are drawn on the host from a NumPy Generator, so a
seed gives the same model on the CPU and the GPU, then moved with ``to_device``.
Weight decay (``Parameter.decay``): on Linear weights; not on biases, LayerNorm or
embeddings unless asked.
"""
from collections import OrderedDict

import numpy as np

from .autograd import Tensor
from .backend import get_array_module, to_device
from .flat import copy_into


class Parameter(Tensor):
    """A leaf tensor that a Module owns and an optimizer updates."""

    def __init__(self, data, decay=True, name=None):
        super().__init__(data, requires_grad=True, name=name)
        self.decay = bool(decay)

    def __repr__(self):
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, decay={self.decay})"


class Module:
    """Base class: assign Parameters and Modules as attributes; define ``forward``."""

    training = True

    def __setattr__(self, name, value):
        reg = self.__dict__.get("_registry")
        if reg is None:                           # subclasses need not call super().__init__()
            reg = OrderedDict()
            object.__setattr__(self, "_registry", reg)
        if isinstance(value, (Parameter, Module)):
            reg[name] = value                     # a re-assignment keeps its place
        else:
            reg.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name):
        self.__dict__.get("_registry", {}).pop(name, None)
        object.__delattr__(self, name)

    def _items(self):
        return self.__dict__.get("_registry", {}).items()

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    # -- walking the tree -------------------------------------------------------------
    def named_children(self):
        return [(n, m) for n, m in self._items() if isinstance(m, Module)]

    def children(self):
        return [m for _, m in self.named_children()]

    def named_modules(self, prefix="", _memo=None):
        """(dotted name, module) for self and every sub-module, each module once."""
        memo = set() if _memo is None else _memo
        if id(self) in memo:
            return []
        memo.add(id(self))
        out = [(prefix, self)]
        for name, m in self.named_children():
            out += m.named_modules(f"{prefix}.{name}" if prefix else name, memo)
        return out

    def _all_named_parameters(self, prefix=""):
        """Every (name, parameter) in registration order, shared parameters under each name."""
        for name, v in self._items():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(v, Parameter):
                yield full, v
            else:
                yield from v._all_named_parameters(full)

    def named_parameters(self, prefix=""):
        """(dotted name, Parameter) in registration order; a shared parameter once, first name."""
        seen, out = set(), []
        for name, p in self._all_named_parameters(prefix):
            if id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # -- modes and gradients ----------------------------------------------------------
    def train(self, mode=True):
        for _, m in self.named_modules():
            m.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def zero_grad(self):
        """Zero every gradient in place (a flat-buffer view stays a view)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad[...] = 0

    def astype(self, dtype):
        """Cast every parameter (before flattening); shared parameters stay shared."""
        for p in self.parameters():
            p.data = p.data.astype(dtype)
            p.grad = None
        return self

    # -- state ------------------------------------------------------------------------
    def state_dict(self):
        """OrderedDict name -> the parameter's live array (shared parameters once)."""
        return OrderedDict((n, p.data) for n, p in self.named_parameters())

    def load_state_dict(self, state_dict, strict=True):
        """Copy arrays into the parameters in place; returns (missing, unexpected) names.

        Everything is checked before anything is copied, so a failed load leaves the model
        as it was. With ``strict``, a missing or unexpected key is an error; a shape
        mismatch always is. An alias of a shared parameter counts as that parameter."""
        names = OrderedDict()                     # every name, aliases included -> param
        for n, p in self._all_named_parameters():
            names[n] = p
        unexpected = [k for k in state_dict if k not in names]
        present = {id(names[k]) for k in state_dict if k in names}
        missing = [n for n, p in self.named_parameters() if id(p) not in present]
        if strict and missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ValueError(f"load_state_dict: missing key {missing[0]!r}{more}")
        if strict and unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise ValueError(f"load_state_dict: unexpected key {unexpected[0]!r}{more}")
        todo = []
        for k, v in state_dict.items():
            if k not in names:
                continue
            p = names[k]
            v = v.data if isinstance(v, Tensor) else v
            if not hasattr(v, "shape"):
                v = np.asarray(v)
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"load_state_dict: shape mismatch for {k!r}: "
                                 f"checkpoint {tuple(v.shape)}, model {tuple(p.shape)}")
            todo.append((p, v))
        for p, v in todo:
            copy_into(p.data, v)
        return missing, unexpected

    def __repr__(self):
        inner = ", ".join(f"{n}={type(m).__name__}" for n, m in self.named_children())
        return f"{type(self).__name__}({inner})"


class ModuleList(Module):
    """A list of modules registered under the names '0', '1', ..."""

    def __init__(self, modules=()):
        self._list = []
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self._list)), module)
        self._list.append(module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        return self._list[i]

    def __len__(self):
        return len(self._list)

    def __iter__(self):
        return iter(self._list)


def _normal(rng, shape, std, dtype):
    rng = np.random.default_rng() if rng is None else rng
    return to_device(rng.normal(0.0, std, size=shape).astype(dtype))


def _full(shape, value, dtype):
    return to_device(np.full(shape, value, dtype=dtype))


class Linear(Module):
    """y = x @ W.T + b, W of shape (out_features, in_features) as PyTorch."""

    def __init__(self, in_features, out_features, bias=True, dtype="float32", rng=None, std=0.02):
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_normal(rng, (out_features, in_features), std, dtype), decay=True)
        self.bias = Parameter(_full((out_features,), 0.0, dtype), decay=False) if bias else None

    def forward(self, x):
        from .ops import linear
        return linear(x, self.weight, self.bias)                  # (..., in) -> (..., out)


class Embedding(Module):
    """Rows of a (num_embeddings, dim) table picked by integer indices."""

    def __init__(self, num_embeddings, embedding_dim, dtype="float32", rng=None, std=0.02, decay=False):
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(_normal(rng, (num_embeddings, embedding_dim), std, dtype), decay=decay)

    def forward(self, idx):
        from .ops import embedding
        return embedding(idx.data if isinstance(idx, Tensor) else idx, self.weight)  # (B, T) -> (B, T, C)

    # -- a tied embedding is also the output layer (Press & Wolf 2017) ---------------------
    def logits(self, x):
        """x (..., C) -> x @ weight^T (..., num_embeddings)."""
        from .ops import linear
        return linear(x, self.weight)

    def full_logits(self, logits):
        """The whole vocabulary's logits of an array that logits() returned (here: itself;
        a vocabulary-parallel embedding gathers its ranks' columns)."""
        return logits

    def cross_entropy(self, logits, targets, reduction="mean"):
        """Cross-entropy of logits() against integer targets (-1 ignored); a vocabulary-parallel
        embedding (parallel/tensor/) computes it without the full logits."""
        from .ops import cross_entropy
        return cross_entropy(logits, targets, reduction=reduction)


class LayerNorm(Module):
    """Ba et al. 2016 over the last axis: (x - mean) / sqrt(var + eps) * weight + bias."""

    def __init__(self, dim, eps=1e-5, dtype="float32", bias=True):
        self.dim, self.eps = dim, eps
        self.weight = Parameter(_full((dim,), 1.0, dtype), decay=False)
        self.bias = Parameter(_full((dim,), 0.0, dtype), decay=False) if bias else None

    def forward(self, x):
        from .ops import layer_norm
        return layer_norm(x, self.weight, self.bias, self.eps)


class Dropout(Module):
    """Srivastava et al. 2014, inverted: zero with probability p, scale kept ones by 1/(1-p).

    ``rng`` is a NumPy Generator (a CuPy RandomState on the GPU); made from ``seed`` on the
    first call if not given. Identity when p == 0 or in eval mode."""

    def __init__(self, p=0.0, rng=None, seed=None):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p, self.rng, self.seed = float(p), rng, seed

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        if self.rng is None:
            xp = get_array_module(x.data if isinstance(x, Tensor) else x)
            self.rng = np.random.default_rng(self.seed) if xp is np else xp.random.RandomState(self.seed)
        from .ops import dropout
        return dropout(x, self.p, self.rng, self.training)
