"""A session's files besides its bank: the state file and the seq reservation.

**The state file** (``state.pt``) is written at every commit, before ``response.done``, so an
acknowledged turn survives ``kill -9`` together with the bank's committed log. It holds the
model's per-session state (the last window's keys and values: derived from the conversation,
so it is sealed like the bank) and a header with the session's metadata (created, turns,
tokens, seq). The session directory is the source of truth: Redis is a cache and an index,
and a session whose Redis metadata was lost is rebuilt from this header.

**The seq reservation** (``seq``) holds a number above every event seq the session may have
sent: the session reserves seqs in blocks before using them, so after a crash it resumes
above every seq a client may have seen, and never sends one seq twice.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_runtime.errors import BankFormatError, StorageError
from agent_runtime.files import atomic_write
from agent_runtime.layout import SEQ_FILE, STATE_FILE
from agent_runtime.models.base import ChatModel, SessionState
from privacy.crypto import SessionCipher

__all__ = [
    "SavedState",
    "StateHeader",
    "created_at_of",
    "load",
    "read_reserved_seq",
    "reserve_seq",
    "save",
]

_STATE_AAD = b"agent-runtime generation state v1"
_MAGIC = b"ARSTATE2"
_LEN = struct.Struct("<I")


@dataclass
class StateHeader:
    """The session metadata the state file carries (no conversation content)."""

    session_id: str
    created_at: float
    turns: int = 0
    tokens: int = 0
    seq: int = 0
    bank_position: tuple[int, int] | None = None
    """The bank's (generation, committed log records) when this state was saved."""
    ledger: dict[str, Any] | None = None
    """The item ledger (``agent_runtime.sessions.items``): ids, spans, digests; no text."""
    fence: int = 0
    """The fencing token of the owner that wrote it (0 outside a cluster)."""

    @classmethod
    def parse(cls, raw: object, session_id: str, fallback_created: float) -> StateHeader:
        doc = raw if isinstance(raw, dict) else {}
        try:
            return cls(
                session_id=session_id,
                created_at=float(doc.get("created_at", fallback_created)),
                turns=int(doc.get("turns", 0)),
                tokens=int(doc.get("tokens", 0)),
                seq=int(doc.get("seq", 0)),
                bank_position=_position(doc.get("bank")),
                ledger=doc.get("items") if isinstance(doc.get("items"), dict) else None,
                fence=int(doc.get("fence", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise BankFormatError(f"{STATE_FILE}: malformed header: {exc}") from exc


@dataclass
class SavedState:
    header: StateHeader
    state: SessionState


def save(
    model: ChatModel[Any],
    directory: Path,
    state: SessionState,
    header: StateHeader,
    cipher: SessionCipher | None,
) -> None:
    """Persist ``state`` and ``header`` atomically and durably (worker thread)."""
    head = json.dumps(
        {
            "created_at": header.created_at,
            "turns": header.turns,
            "tokens": header.tokens,
            "seq": header.seq,
            "bank": list(header.bank_position) if header.bank_position is not None else None,
            "items": header.ledger,
            "fence": header.fence,
        }
    ).encode()
    blob = _MAGIC + _LEN.pack(len(head)) + head + model.save_state(state)
    if cipher is not None:
        blob = cipher.seal(blob, _STATE_AAD)
    try:
        atomic_write(directory / STATE_FILE, [blob])
    except OSError as exc:
        raise StorageError(f"cannot write {STATE_FILE}: {exc.strerror or exc}", exc.errno) from exc


def load(
    model: ChatModel[Any], directory: Path, session_id: str, cipher: SessionCipher | None
) -> SavedState | None:
    """The saved state of the session in ``directory``, or None if it has none yet.

    A state file written before headers existed loads with a header of defaults.
    """
    path = directory / STATE_FILE
    if not path.exists():
        return None
    blob = path.read_bytes()
    if cipher is not None:
        blob = cipher.open(blob, _STATE_AAD)
    fallback = path.stat().st_mtime
    if not blob.startswith(_MAGIC):
        return SavedState(StateHeader(session_id, fallback), model.load_state(blob))
    at = len(_MAGIC)
    if len(blob) < at + _LEN.size:
        raise BankFormatError(f"{STATE_FILE}: truncated header")
    (n,) = _LEN.unpack_from(blob, at)
    at += _LEN.size
    try:
        raw = json.loads(blob[at : at + n])
    except ValueError as exc:
        raise BankFormatError(f"{STATE_FILE}: malformed header") from exc
    header = StateHeader.parse(raw, session_id, fallback)
    return SavedState(header, model.load_state(blob[at + n :]))


def _position(raw: object) -> tuple[int, int] | None:
    if raw is None:
        return None
    if not (isinstance(raw, list) and len(raw) == 2 and all(isinstance(x, int) for x in raw)):
        raise ValueError(f"bank position {raw!r} is not [generation, records]")
    return raw[0], raw[1]


def read_reserved_seq(directory: Path) -> int:
    """The session's reserved seq (0 when it has none yet)."""
    try:
        text = (directory / SEQ_FILE).read_text().strip()
    except FileNotFoundError:
        return 0
    try:
        return max(0, int(text))
    except ValueError as exc:
        raise BankFormatError(f"{SEQ_FILE}: not a number") from exc


def reserve_seq(directory: Path, seq: int) -> None:
    """Durably record that seqs up to ``seq`` may be in use."""
    try:
        atomic_write(directory / SEQ_FILE, f"{seq}\n".encode(), mode=0o600)
    except OSError as exc:
        raise StorageError(f"cannot write {SEQ_FILE}: {exc.strerror or exc}", exc.errno) from exc


def created_at_of(directory: Path) -> float:
    """When a session directory was made (for a session with no state file yet)."""
    try:
        return directory.stat().st_mtime
    except OSError:
        return time.time()
