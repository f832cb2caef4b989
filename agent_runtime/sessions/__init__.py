"""Sessions: the registry (``manager.py``), one conversation (``session.py``), its state file
(``state.py``) and the Redis metadata store (``store.py``)."""

from __future__ import annotations

from agent_runtime.sessions.manager import SessionManager
from agent_runtime.sessions.session import Session
from agent_runtime.sessions.store import SessionMeta, SessionStore

__all__ = ["Session", "SessionManager", "SessionMeta", "SessionStore"]
