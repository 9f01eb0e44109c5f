"""engine: the single-process core. Arrays (backend), autograd (Tensor, Function), ops,
flat parameter buffers, nn modules, optimizers, data and checkpoint io. Knows nothing of MPI."""
from .autograd import Function, Tensor, no_grad, is_grad_enabled  # noqa: F401
from . import ops  # noqa: F401,E402  (importing ops attaches Tensor's operators and methods)
