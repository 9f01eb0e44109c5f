"""Data parallelism: gradient buckets reduced during backward (DDP), the ZeroEngine (ZeRO
stages 0-3, Rajbhandari et al. 2019) and stage 3's per-layer gathers (FSDP).

    buckets.py   GradBuckets: flat gradient ranges all-reduced / reduce-scattered as backward fills them
    zero.py      ZeroEngine: the data-parallel engine of every run (one process included)
    fsdp.py      ShardedLayers: ZeRO-3, each layer gathered before its forward and backward
    offload.py   HostOptimizer: ZeRO-Offload, AdamW on the host over stages 1-2, gradients down per bucket
    wire.py      Wire: compressed gathers and gradient reduce-scatter (ZeRO++ qwZ / qgZ, bf16); step_bytes
"""
from .buckets import GradBuckets, overlap_counts  # noqa: F401
from .zero import STAGES, ZeroEngine  # noqa: F401
from .wire import Wire, step_bytes  # noqa: F401
