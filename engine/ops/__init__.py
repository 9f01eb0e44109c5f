"""Differentiable ops on Tensors. basic: elementwise arithmetic, matmul, shape ops and
reductions (also attached to Tensor as operators and methods). fused: ops with hand-written
backward (linear, layer_norm, gelu, cross_entropy, embedding, dropout). attention: blockwise
flash attention, its array-level kernels (reused by ring attention) and the LSE merge."""
from .basic import (add, sub, mul, div, neg, pow, matmul, exp, log, tanh,  # noqa: F401
                    reshape, transpose, swapaxes, getitem, concat, split, sum, mean)
from .fused import linear, layer_norm, gelu, cross_entropy, embedding, dropout  # noqa: F401
from .attention import (attention, attention_forward, attention_backward,  # noqa: F401
                        merge_attention)

__all__ = ["add", "sub", "mul", "div", "neg", "pow", "matmul", "exp", "log", "tanh",
           "reshape", "transpose", "swapaxes", "getitem", "concat", "split", "sum", "mean",
           "linear", "layer_norm", "gelu", "cross_entropy", "embedding", "dropout",
           "attention", "attention_forward", "attention_backward", "merge_attention"]
