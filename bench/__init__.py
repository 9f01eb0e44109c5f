"""bench: benchmarks that run their baseline in the same launch and report ratios (the
README's Benchmarks table lists each command). --json files are written atomically
(engine/io.py atomic_write_json): a crash leaves the previous file, never half of one.

    collectives.py   hand-written collectives against the MPI library's own (OSU / nccl-tests style)
    train_step.py    train.py's step against PyTorch eager (torch_gpt.py: nanoGPT's model); nanoGPT's char-level run
    scaling.py       DP weak-scaling efficiency and each ZeRO stage's step time
    zero_memory.py   per-rank model-state bytes against the ZeRO formulas
    long_context.py  memory per rank and ring overlap under sequence parallelism
    pipeline.py      bubble and activation memory per pipeline schedule, against theory
    tensor_parallel.py  activation bytes, wire bytes, the largest model and decode speed per tp
    sparse_decode.py, sparse_quality.py   the sparse layers' decoding speed and quality
    quantized.py     ZeRO-3 with compressed gathers / gradients (ZeRO++, bf16): bytes, step time, val loss
    terraformer.py   reversible and LSH memory, the sparse loss layer's decoding, Terraformer quality
    int8_decode.py, int8_quality.py       int8 weight-only decoding's speed (and bytes read) and quality
"""
import time

from engine.io import atomic_write_json


def blas_core():
    """The kernel set NumPy's OpenBLAS runs (its get_corename: "Haswell", "SkylakeX", ...; it
    follows OPENBLAS_CORETYPE where that is set), or "unknown" where NumPy carries no OpenBLAS."""
    import ctypes
    import glob
    import os

    import numpy as np
    libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
    for path in sorted(glob.glob(os.path.join(libs, "*openblas*"))):
        lib = ctypes.CDLL(path)                          # already loaded by NumPy: the same copy
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode().strip() or "unknown"
    return "unknown"


def use_device(device):
    """backend.set_device(device); False (after one error line) where it cannot be had (no CuPy)."""
    import sys

    from engine import backend
    try:
        backend.set_device(device)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def idle(comm):
    """Wait at a barrier of ``comm`` without spinning a core (MPICH's barrier busy-polls), so
    ranks outside the group being measured do not steal its cores. Every rank of ``comm``
    calls it, the measured ones too: a blocking barrier would not match this non-blocking one."""
    h = comm.barrier(async_op=True)
    while not h.test():
        time.sleep(0.002)


def report(title, head, lines, rows, json_path=None):
    """Print a benchmark's table (title, header, rule, one line per row) and, with ``json_path``,
    write its rows as JSON."""
    print(title)
    print("\n".join([head, "-" * len(head), *lines]))
    if json_path:
        atomic_write_json(json_path, rows)
