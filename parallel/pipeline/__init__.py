"""Pipeline parallelism: the layers cut into stages, each batch into micro-batches.

    schedules.py   GPipe, 1F1B, interleaved 1F1B, ZB-H1 as pure action lists; simulator, bubble theory
    stage.py       PipelineStage: the layers one pp rank holds; the layout checks
    executor.py    PipelineEngine: one executor for any schedule (non-blocking sends, B/W split)
"""
from .executor import PipelineEngine  # noqa: F401
from .schedules import SCHEDULES  # noqa: F401
from .stage import PipelineConfigError, PipelineStage, check_config, layer_ranges  # noqa: F401
