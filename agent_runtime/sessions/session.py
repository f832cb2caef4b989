"""One conversation: its generation state, memory bank and event stream.

A :class:`Session` outlives its connection: its response keeps streaming into a bounded buffer
of recent server events while no client is attached, and a client that resumes with
``last_seq`` gets every event it missed.

Ownership: the generation state and bank are touched only on the engine's worker thread
(through ``engine.call``); everything else here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np

import agent_runtime.sessions.state as state_file
from agent_runtime import protocol as p
from agent_runtime.errors import FencedError, StorageError
from agent_runtime.models.base import SessionState
from agent_runtime.sessions.items import Ledger
from agent_runtime.sessions.ownership import Lease, check_fence
from agent_runtime.sessions.store import SessionMeta
from memory import MemoryBank
from privacy.crypto import SessionCipher
from privacy.session import SessionPrivacy

__all__ = ["Sender", "Session", "supersede"]

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any]], Awaitable[None]]
SEQ_BLOCK = 4096
"""Event seqs reserved at a time (one small durable write per block)."""


class Session:
    """One conversation. Server events go through :meth:`emit` (seq, buffer, live send)."""

    def __init__(
        self,
        session_id: str,
        tenant: str,
        state: SessionState,
        bank: MemoryBank,
        directory: Path,
        meta: SessionMeta,
        *,
        buffer_events: int = 4096,
    ) -> None:
        self.session_id = session_id
        self.tenant = tenant
        self.state = state
        self.bank = bank
        self.directory = directory
        self.meta = meta
        self.pending: list[int] = []  # tokens of items not yet fed to the model
        self.ledger = Ledger()  # which item each token came from (no text): provenance, history
        self.reply_prompt_tokens: list[int] = []  # the active reply's opening (markup, prefix)
        self.reply_prefix_text = ""
        self.reply_commit_on_cancel = False
        self.privacy: SessionPrivacy | None = None
        self.memory_stop_reported = False
        self.cipher: SessionCipher | None = None
        self.seq = 0
        self.seq_reserved = 0  # every seq up to this one may be in use (durably recorded)
        self._reserve_retry_at = 0.0
        self.events: deque[dict[str, Any]] = deque(maxlen=buffer_events)
        self.sender: Sender | None = None
        self.client: object = None  # the attached connection
        self.response_id: str | None = None
        self.response_task: asyncio.Task[None] | None = None
        # A session with no client is idle from birth: one that is never attached still unloads.
        self.detached_at: float | None = time.monotonic()
        self.no_client = asyncio.Event()  # set while no client is attached
        self.no_client.set()
        # Called whenever the last client goes, however it went (closed, or a send failed).
        self.on_detach: Callable[[Session], None] | None = None
        self.closed = False
        self.lease: Lease | None = None  # this node's lease when it runs in a cluster

    def check_fence(self) -> None:
        """Before a write to the session's files: refuse it (FencedError) when another node
        has claimed the session since this node took its lease (a no-op outside a cluster)."""
        if self.lease is not None:
            check_fence(self.directory, self.lease.token)

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.session_id}"

    async def emit(self, event: dict[str, Any]) -> None:
        """Stamp ``event`` with ``event_id`` and ``seq``, buffer it, and send it if a client is attached.

        Seqs are reserved durably in blocks before they are sent (:meth:`_reserve`), so a
        session reloaded after a crash continues above every seq a client may have seen.
        """
        self.seq += 1
        if self.seq > self.seq_reserved:
            self._reserve()
        event = p.stamp(event, self.seq)
        self.events.append(event)
        sender = self.sender
        if sender is not None:
            try:
                await sender(event)
            except Exception:  # the connection died mid-send: keep buffering for a resume
                log.info("session %s: client went away during send", self.session_id)
                self.detach(sender)

    def _reserve(self) -> None:
        """Durably reserve the next block of seqs (one small write per block, on the loop, so
        seqs are stamped and sent strictly in order). While the disk refuses, events still go
        out (retried at most once a second): only a crash during the outage could reuse seqs."""
        now = time.monotonic()
        if now < self._reserve_retry_at:
            return
        upto = self.seq + SEQ_BLOCK - 1
        try:
            self.check_fence()
            state_file.reserve_seq(self.directory, upto)
        except (StorageError, FencedError) as exc:  # fenced: the lease keeper drops the session
            self._reserve_retry_at = now + 1.0
            log.warning("session %s: cannot reserve event seqs: %s", self.session_id, exc)
            return
        self.seq_reserved = upto

    def describe(self) -> dict[str, Any]:
        """The ``session`` object of ``session.created`` / ``session.resumed``."""
        return {
            "id": self.session_id,
            "created_at": self.meta.created_at,
            "turns": self.meta.turns,
            "memory_entries": len(self.bank),
            "position": self.state.position,
        }

    @property
    def responding(self) -> bool:
        return self.response_task is not None and not self.response_task.done()

    def protect_keys(self, keys: np.ndarray) -> np.ndarray:
        """Noise a block's keys (worker thread); under the ``message`` unit a turn is the message."""
        assert self.privacy is not None
        self.check_fence()  # the ledger is written before the keys are stored
        return self.privacy.protect(keys, message_id=f"turn-{self.meta.turns}")

    def attach(self, sender: Sender, client: object = None) -> None:
        """Route live events to ``sender`` (``client`` identifies the connection that owns it)."""
        self.sender = sender
        self.client = client
        self.detached_at = None
        self.no_client.clear()

    def detach(self, sender: Sender | None = None) -> None:
        """Stop routing live events to ``sender`` (any client when None); idempotent."""
        if self.sender is None or (sender is not None and self.sender != sender):
            return
        self.sender = None
        self.client = None
        self.detached_at = time.monotonic()
        self.no_client.set()
        if self.on_detach is not None:
            self.on_detach(self)

    def missed_events(self, last_seq: int) -> list[dict[str, Any]] | None:
        """Buffered events after ``last_seq``, or None when some of them are no longer buffered."""
        if last_seq >= self.seq:
            return []
        if not self.events or self.events[0]["seq"] > last_seq + 1:
            return None
        return [e for e in self.events if e["seq"] > last_seq]


def supersede(previous: object, by: object = None) -> None:
    """Tell the client that had a session (any transport: websocket, MQTT, an HTTP request)
    that ``by`` took it over (None: the session left this node)."""
    if previous is not None and previous is not by:
        superseded = getattr(previous, "superseded", None)
        if callable(superseded):
            superseded()
