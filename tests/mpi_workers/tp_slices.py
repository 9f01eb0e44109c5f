"""This tp rank's slice of a one-process parameter, written out from the layers' own index
arrays (independent of parallel/tensor/model.py slice_specs), for tp_worker.py and
tp_step_worker.py to compare against."""
import numpy as np

from engine.backend import to_numpy
from parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from parallel.tensor.layers import ParallelSparseFFN


def slice_of(module, name, full):
    """The part of ``full`` (the one-process parameter ``name``) that ``module`` holds, on the host."""
    full, m = to_numpy(full), module
    for part in name.rsplit(".", 1)[0].split("."):
        m = getattr(m, part)
    leaf = name.rsplit(".", 1)[1]
    if isinstance(m, ColumnParallelLinear):
        return full[m.rows]
    if isinstance(m, ParallelSparseFFN) and leaf in ("w1", "w2", "c2", "cb"):
        return full[m.units]
    if isinstance(m, RowParallelLinear) and leaf == "weight":
        return full[:, m.cols]
    if isinstance(m, VocabParallelEmbedding):
        rows = full[m.lo:m.lo + m.weight.shape[0]]                  # then the padded rows: zero
        return np.concatenate([rows, np.zeros((m.weight.shape[0] - rows.shape[0], full.shape[1]))])
    return full
