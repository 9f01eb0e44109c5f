"""Parallel strategies on engine/ and collectives/, one package each, and the one file that
composes them:

    config.py     ParallelConfig (the layout flags) and every layout check
    step.py       build_step(): the only place that knows how dp, ZeRO, sp and pp combine
    data/         gradient buckets (DDP), ZeroEngine (ZeRO stages 0-3), FSDP per-layer gathers
    sequence/     how tokens split, ring attention, Ulysses, a GPT run on its local tokens
    pipeline/     schedules as action lists, the stage, one executor for any schedule
    checkpoint/   sharded save/load, reshard to any layout by parameter name
    trace.py      Chrome trace of a step (a row per rank)

Each layout is tested to equal one process."""
from .checkpoint import open_checkpoint  # noqa: F401
from .config import LayoutError, ParallelConfig, check_layout  # noqa: F401
from .step import Step, build_step  # noqa: F401
