"""Model families behind one seam (:mod:`agent_runtime.models.base`).

``byte/`` is the bundled byte-level Memorizing Transformer. :func:`load_model` picks the family
for a configured checkpoint; nothing above this package imports a model class.
"""

from __future__ import annotations

from agent_runtime.models.base import ChatModel, SessionState, StepStats, TextStream
from agent_runtime.models.loader import load_model

__all__ = ["ChatModel", "SessionState", "StepStats", "TextStream", "load_model"]
