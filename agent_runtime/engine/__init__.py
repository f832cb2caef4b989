"""The inference engine: a sans-I/O scheduler, the worker-thread loop, sampling and output.

``scheduler.py`` decides each step's batch; ``runner.py`` runs the loop and drives the model
through the seam (``agent_runtime.models.base``); ``sampling.py`` turns logits into tokens and
handles stop sequences; ``output.py`` hands text to the event loop.
"""

from __future__ import annotations

from agent_runtime.engine.output import OutputCollector, ResponseResult
from agent_runtime.engine.runner import Engine, Generation
from agent_runtime.engine.sampling import SamplingParams

__all__ = ["Engine", "Generation", "OutputCollector", "ResponseResult", "SamplingParams"]
