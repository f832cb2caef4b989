"""agent-runtime: a streaming chat runtime for a Memorizing Transformer with per-session kNN memory.

Import-light on purpose: heavy modules (torch, faiss, redis, websockets) are imported by the
modules that need them, so ``import agent_runtime`` is cheap and has no side effects.
"""

from __future__ import annotations

from agent_runtime.errors import AgentRuntimeError, ConfigError, RequestError

__version__ = "0.1.0"

__all__ = ["AgentRuntimeError", "ConfigError", "RequestError", "__version__"]
