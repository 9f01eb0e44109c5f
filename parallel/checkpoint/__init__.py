"""Sharded checkpoints: every rank writes what it owns, rank 0 a manifest; atomic,
checksummed, loadable at any layout (parameters found by name).

    sharded.py   save_sharded / open_checkpoint / load_sharded / consolidate
    reshard.py   a checkpoint's flat layouts (one per pipeline stage), their checks, reading
                 any range of a new layout by parameter name
"""
from .sharded import (FORMAT, Opened, check_params, consolidate, load_sharded, open_checkpoint,  # noqa: F401
                      read_sharded_manifest, save_sharded)
