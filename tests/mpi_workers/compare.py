"""What the equivalence workers compare with: relative error on host copies (device arrays,
under ENGINE_DEVICE=gpu-emulated or a GPU, are moved explicitly; NumPy would refuse them)."""
import numpy as np

from engine.backend import to_numpy


def rel(a, b):
    """max |a - b| / max |b| in float64 (b all zero: the absolute error)."""
    a, b = (np.asarray(to_numpy(x), np.float64) for x in (a, b))
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))
