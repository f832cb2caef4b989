"""Clients of the event protocol: the async Python library (``agent.py``) and the terminal chat
(``chat.py``, ``agent-runtime chat``).

::

    from agent_runtime.client import AgentClient
"""

from __future__ import annotations

from agent_runtime.client.agent import (
    DEFAULT_URL,
    AgentClient,
    ClientError,
    ClientState,
    ClientStateError,
    DisconnectedError,
    EventsLostError,
    MemoryStats,
    RejectedError,
    RemoteError,
    Response,
    SessionInfo,
)

__all__ = [
    "DEFAULT_URL",
    "AgentClient",
    "ClientError",
    "ClientState",
    "ClientStateError",
    "DisconnectedError",
    "EventsLostError",
    "MemoryStats",
    "RejectedError",
    "RemoteError",
    "Response",
    "SessionInfo",
]
