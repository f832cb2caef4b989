"""The generation-state file next to a session's bank: saved at every commit, sealed like the bank.

Written at every commit, so a turn acknowledged by ``response.done`` survives ``kill -9``
together with the bank's synced log. The state holds the last window's keys and values, which
are derived from the conversation, so it is encrypted at rest like the bank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent_runtime.files import atomic_write
from agent_runtime.layout import STATE_FILE
from agent_runtime.models.base import ChatModel, SessionState
from agent_runtime.sessions.session import Session
from privacy.crypto import SessionCipher

__all__ = ["load", "save"]

_STATE_AAD = b"agent-runtime generation state v1"


def save(model: ChatModel[Any], session: Session) -> None:
    """Persist the session's generation state durably (worker thread)."""
    blob = model.save_state(session.state)
    if session.cipher is not None:
        blob = session.cipher.seal(blob, _STATE_AAD)
    atomic_write(session.directory / STATE_FILE, [blob])


def load(
    model: ChatModel[Any], directory: Path, cipher: SessionCipher | None
) -> SessionState | None:
    """The saved state of the session in ``directory``, or None if it has none yet."""
    path = directory / STATE_FILE
    if not path.exists():
        return None
    blob = path.read_bytes()
    if cipher is not None:
        blob = cipher.open(blob, _STATE_AAD)
    state: SessionState = model.load_state(blob)
    return state
