"""Sessions: one conversation each, with its generation state, memory bank and event stream.

A :class:`Session` outlives its websocket connection: its response keeps streaming into a
bounded buffer of recent server events while no client is attached, and a client that resumes
with ``last_seq`` gets every event it missed. The :class:`SessionManager` creates, resolves
(always from the authenticated tenant), snapshots and deletes sessions; metadata goes to the
session store, banks and generation state to the data directory.

Ownership: the generation state and bank are touched only on the engine's worker thread
(through ``engine.call``); everything else here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agent_runtime.config import PrivacyConfig, ServerConfig
from agent_runtime.engine import Engine, Generation, OutputCollector, ResponseResult
from agent_runtime.errors import (
    BankFormatError,
    ConflictError,
    OverloadedError,
    SessionNotFoundError,
)
from agent_runtime.files import atomic_write
from agent_runtime.generation import GenerationState, SamplingParams
from agent_runtime.metrics import EngineMetrics
from agent_runtime.store import SessionMeta, SessionStore
from agent_runtime.tokenizer import ASSISTANT, encode_turn
from memory import MemoryBank, MemoryConfig
from privacy.audit import AuditLog
from privacy.crypto import KeyStore, SessionCipher, tenant_hash
from privacy.erasure import erase_session
from privacy.session import SessionPrivacy

__all__ = ["Session", "SessionManager"]

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any]], Awaitable[None]]


class Session:
    """One conversation. Server events go through :meth:`emit` (seq, buffer, live send)."""

    def __init__(
        self,
        session_id: str,
        tenant: str,
        state: GenerationState,
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
        self.privacy: SessionPrivacy | None = None
        self.memory_stop_reported = False
        self.cipher: SessionCipher | None = None
        self.seq = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=buffer_events)
        self.sender: Sender | None = None
        self.client: object = None  # the attached connection
        self.response_id: str | None = None
        self.response_task: asyncio.Task[None] | None = None
        self.detached_at: float | None = None
        self.no_client = asyncio.Event()  # set while no client is attached
        self.no_client.set()
        self.closed = False

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.session_id}"

    async def emit(self, event: dict[str, Any]) -> None:
        """Stamp ``event`` with ``event_id`` and ``seq``, buffer it, and send it if a client is attached."""
        from server.protocol import new_id  # protocol ids are a server concern; imported lazily

        self.seq += 1
        event = {"event_id": new_id("evt"), "seq": self.seq, **event}
        self.events.append(event)
        sender = self.sender
        if sender is not None:
            try:
                await sender(event)
            except Exception:  # the connection died mid-send: keep buffering for a resume
                log.info("session %s: client went away during send", self.session_id)
                self.detach(sender)

    def protect_keys(self, keys: np.ndarray) -> np.ndarray:
        """Noise a block's keys (worker thread); under the ``message`` unit a turn is the message."""
        assert self.privacy is not None
        return self.privacy.protect(keys, message_id=f"turn-{self.meta.turns}")

    def attach(self, sender: Sender, client: object = None) -> None:
        """Route live events to ``sender`` (``client`` identifies the connection that owns it)."""
        self.sender = sender
        self.client = client
        self.detached_at = None
        self.no_client.clear()

    def detach(self, sender: Sender | None = None) -> None:
        if sender is None or self.sender == sender:
            self.sender = None
            self.client = None
            self.detached_at = time.monotonic()
            self.no_client.set()

    def missed_events(self, last_seq: int) -> list[dict[str, Any]] | None:
        """Buffered events after ``last_seq``, or None when some of them are no longer buffered."""
        if last_seq >= self.seq:
            return []
        if not self.events or self.events[0]["seq"] > last_seq + 1:
            return None
        return [e for e in self.events if e["seq"] > last_seq]


class SessionManager:
    """Creates, resolves, persists and deletes sessions."""

    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        data_dir: Path,
        memory: MemoryConfig,
        limits: ServerConfig | None = None,
        *,
        privacy: PrivacyConfig | None = None,
        keystore: KeyStore | None = None,
        audit: AuditLog | None = None,
        node_id: str = "",
        metrics: EngineMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.data_dir = data_dir
        self.memory = memory
        self.limits = limits or ServerConfig()
        self.node_id = node_id
        self.metrics = metrics
        self.privacy = privacy or PrivacyConfig()
        self.keystore = keystore
        self.audit = audit
        self.sessions: dict[str, Session] = {}  # key: tenant/session_id
        self.fingerprint = engine.model.cfg.fingerprint()

    def _admit(self, tenant: str) -> None:
        """Refuse a new live session past the server's or the tenant's limit."""
        if len(self.sessions) >= self.limits.max_sessions:
            raise OverloadedError("too many live sessions on this server", retry_after_ms=5000)
        if (
            sum(s.tenant == tenant for s in self.sessions.values())
            >= self.limits.max_sessions_per_tenant
        ):
            raise OverloadedError("too many live sessions for this tenant", retry_after_ms=5000)

    def directory(self, tenant: str, session_id: str) -> Path:
        # Tenant names are hashed so that no tenant-chosen string becomes a path component.
        return self.data_dir / "sessions" / tenant_hash(tenant) / session_id

    def _audit(
        self, tenant: str, action: str, session_id: str | None, **details: str | float | int | None
    ) -> None:
        if self.audit is not None:
            self.audit.append(tenant, action, session_id, **details)

    def _open(self, tenant: str, session_id: str, *, new: bool) -> _Opened:
        """Open (or create) a session's bank, generation state and privacy state (worker thread).

        Everything on disk is sealed with the session's data key when encryption at rest is on;
        a file of another tenant or session fails authentication before it is parsed.
        """
        directory = self.directory(tenant, session_id)
        cipher = None
        if self.keystore is not None:
            cipher = self.keystore.session_cipher(tenant, session_id, create=new)
        key_dim, value_dim = self.engine.model.memory_dims
        bank = MemoryBank.open(directory / "bank", key_dim, value_dim, self.memory, cipher=cipher)
        try:
            bank.meta.setdefault("model_fingerprint", self.fingerprint)
            if bank.meta["model_fingerprint"] != self.fingerprint:
                raise BankFormatError(
                    f"bank of session {session_id} was written by model {bank.meta['model_fingerprint']},"
                    f" not {self.fingerprint}"
                )
            privacy = SessionPrivacy.open(
                directory,
                self.privacy,
                unit=self.privacy.unit,
                budget_epsilon=self.privacy.budget_epsilon or None,
            )
            state_file = directory / "state.pt"
            if not new and state_file.exists():
                blob = state_file.read_bytes()
                if cipher is not None:
                    blob = cipher.open(blob, _STATE_AAD)
                device = next(self.engine.model.parameters()).device
                state = GenerationState.from_state_dict(
                    torch.load(io.BytesIO(blob), weights_only=True), device
                )
            else:
                state = GenerationState.new(self.engine.model)
        except BaseException:
            bank.close()
            raise
        return _Opened(state, bank, privacy, cipher, directory)

    def _register(
        self, opened: _Opened, session_id: str, tenant: str, meta: SessionMeta
    ) -> Session:
        session = Session(
            session_id,
            tenant,
            opened.state,
            opened.bank,
            opened.directory,
            meta,
            buffer_events=self.limits.event_buffer,
        )
        session.privacy = opened.privacy
        session.cipher = opened.cipher
        if opened.privacy.enabled:
            opened.state.protect = session.protect_keys
        self.sessions[session.key] = session
        return session

    async def create(self, tenant: str, session_id: str, instructions: str = "") -> Session:
        self._admit(tenant)
        opened = await self.engine.call(lambda: self._open(tenant, session_id, new=True))
        now = time.time()
        meta = SessionMeta(session_id, tenant, created_at=now, last_active=now, owner=self.node_id)
        await self.store.create(meta)
        session = self._register(opened, session_id, tenant, meta)
        if instructions:
            session.pending += encode_turn("system", instructions)
        self._audit(tenant, "create", session_id)
        self._audit(tenant, "privacy_params", session_id, **opened.privacy.audit_details())
        log.info("session %s created for tenant %s", session_id, _tenant_tag(tenant))
        return session

    async def get(self, tenant: str, session_id: str) -> Session:
        """The tenant's live session, loading it from disk if needed; otherwise not found.

        A session of another tenant and a session that does not exist give the same error.
        """
        session = self.sessions.get(f"{tenant}/{session_id}")
        if session is None:
            meta = await self.store.get(session_id)
            directory = self.directory(tenant, session_id)
            if meta is None or meta.tenant != tenant or not (directory / "bank").exists():
                self._audit(tenant, "denied", session_id, code="session_not_found")
                raise SessionNotFoundError("no such session")
            self._admit(tenant)
            opened = await self.engine.call(lambda: self._open(tenant, session_id, new=False))
            session = self._register(opened, session_id, tenant, meta)
            session.seq = meta.last_seq
            session.memory_stop_reported = opened.state.memory_stopped is not None
            log.info(
                "session %s loaded from disk (%d memory entries)", session_id, len(opened.bank)
            )
        self._audit(tenant, "resume", session_id)
        return session

    # -- responses ------------------------------------------------------------------------------

    async def start_response(
        self,
        session: Session,
        response_id: str,
        params: SamplingParams,
        commit_on_cancel: bool = False,
    ) -> None:
        """Admit a response for the session's pending items and stream it in a session-owned task."""
        if session.response_task is not None and not session.response_task.done():
            raise ConflictError(
                "a response is already active on this session", code="response_in_progress"
            )
        prompt = [*session.pending, ASSISTANT]
        collector = OutputCollector()
        generator = None
        if params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        gen = Generation(
            session.state,
            session.bank,
            prompt,
            params,
            collector,
            asyncio.get_running_loop(),
            commit_on_cancel=commit_on_cancel,
            generator=generator,
        )
        self.engine.generate(
            response_id, session.key, gen
        )  # may raise OverloadedError/ConflictError
        session.pending = []
        session.response_id = response_id
        await session.emit(
            {"type": "response.created", "response": {"id": response_id, "status": "in_progress"}}
        )
        session.response_task = asyncio.create_task(
            self._stream(session, response_id, collector), name=f"response-{response_id}"
        )

    async def _stream(self, session: Session, response_id: str, collector: OutputCollector) -> None:
        try:
            while True:
                text, result = await collector.get()
                if text:
                    await session.emit(
                        {
                            "type": "response.output_text.delta",
                            "response_id": response_id,
                            "delta": text,
                        }
                    )
                if result is not None:
                    break
            await self._commit(session, result)
            await session.emit(
                {
                    "type": "response.done",
                    "response": _response_body(response_id, result, len(session.bank)),
                }
            )
        except asyncio.CancelledError:
            self.engine.abort(response_id)
            raise
        finally:
            session.response_id = None

    async def _commit(self, session: Session, result: ResponseResult) -> None:
        """Make the turn durable (bank log fsync) and record it in the store before acknowledging."""

        def sync() -> int:
            session.bank.sync()
            _save_state(session)
            return len(session.bank)

        entries = await self.engine.call(sync)
        if session.state.memory_stopped is not None and not session.memory_stop_reported:
            # The privacy budget is spent: tell the client once, and the auditor.
            session.memory_stop_reported = True
            self._audit(session.tenant, "budget_exhausted", session.session_id)
            await session.emit(
                {"type": "memory.write_stopped", "reason": "privacy_budget_exhausted"}
            )
        if result.memory_written:
            await session.emit(
                {"type": "memory.committed", "written": result.memory_written, "entries": entries}
            )
        session.meta.turns += 1
        session.meta.tokens = session.state.position
        session.meta.bank_entries = entries
        await self.store.update(
            session.session_id,
            turns=session.meta.turns,
            tokens=session.meta.tokens,
            bank_entries=entries,
            last_seq=session.seq + 1,  # the response.done that follows
        )

    def cancel(self, session: Session) -> bool:
        return session.response_id is not None and self.engine.abort(session.response_id)

    # -- persistence ----------------------------------------------------------------------------

    async def snapshot(self, session: Session) -> None:
        """Write a new bank generation and the generation state (atomically) on the worker thread."""

        def write() -> int:
            session.bank.snapshot()
            _save_state(session)
            return len(session.bank)

        started = time.perf_counter()
        entries = await self.engine.call(write)
        if self.metrics is not None:
            self.metrics.snapshot.observe(time.perf_counter() - started)
        await self.store.update(session.session_id, bank_entries=entries)

    async def unload(self, session: Session) -> None:
        """Snapshot and drop a session from memory (it can be resumed later)."""
        if session.response_task is not None and not session.response_task.done():
            self.cancel(session)
            with contextlib.suppress(asyncio.CancelledError):
                await session.response_task
        await self.snapshot(session)
        await self.engine.call(session.bank.close)
        self.sessions.pop(session.key, None)

    async def delete(self, session: Session) -> None:
        """Cancel, forget and erase a session everywhere: the in-memory caches, the data key
        (crypto-erasure), every bank generation, log and state file, and its Redis keys. The
        audit log keeps the fact of the erasure, without content."""
        if session.response_task is not None and not session.response_task.done():
            self.cancel(session)
            with contextlib.suppress(asyncio.CancelledError):
                await session.response_task
        session.closed = True
        await self.engine.call(session.bank.close)
        self.sessions.pop(session.key, None)
        session.events.clear()
        sid, tenant = session.session_id, session.tenant

        async def delete_keys(keys: list[str]) -> None:
            await self.store.delete(sid, tenant)

        await erase_session(
            self.data_dir,
            tenant,
            sid,
            self.keystore,
            delete_keys,
            [self.store.session_key(sid)],
            audit=self.audit,
        )
        log.info("session %s erased", sid)

    def detached(self, session: Session) -> None:
        """The session's client went away: cancel its response unless a client resumes within the grace period."""
        if session.response_id is None:
            return
        response_id = session.response_id

        def expire() -> None:
            if session.sender is None and session.response_id == response_id:
                log.info(
                    "session %s: no client resumed within the grace period; cancelling",
                    session.session_id,
                )
                self.engine.abort(response_id)

        asyncio.get_running_loop().call_later(self.limits.disconnect_grace_s, expire)

    async def unload_idle(self, now: float | None = None) -> int:
        """Snapshot and unload sessions with no client and no response for ``idle_unload_s``."""
        now = time.monotonic() if now is None else now
        idle = [
            s
            for s in self.sessions.values()
            if s.sender is None
            and s.detached_at is not None
            and now - s.detached_at >= self.limits.idle_unload_s
            and (s.response_task is None or s.response_task.done())
        ]
        for session in idle:
            await self.unload(session)
            log.info("session %s unloaded after idling", session.session_id)
        return len(idle)

    async def aclose(self) -> None:
        """Snapshot every live session (graceful shutdown)."""
        for session in list(self.sessions.values()):
            try:
                await self.unload(session)
            except Exception:
                log.exception("could not snapshot session %s", session.session_id)


_STATE_AAD = b"agent-runtime generation state v1"


@dataclass
class _Opened:
    state: GenerationState
    bank: MemoryBank
    privacy: SessionPrivacy
    cipher: SessionCipher | None
    directory: Path


def _save_state(session: Session) -> None:
    """Persist the generation state durably next to the bank (worker thread), sealed like the bank.

    Written at every commit, so a turn acknowledged by ``response.done`` survives ``kill -9``
    together with the bank's synced log. The state holds the last window's keys and values,
    which are derived from the conversation, so it is encrypted at rest like the bank.
    """
    buf = io.BytesIO()
    torch.save(session.state.state_dict(), buf)
    blob = buf.getvalue()
    if session.cipher is not None:
        blob = session.cipher.seal(blob, _STATE_AAD)
    atomic_write(session.directory / "state.pt", [blob])


def _response_body(response_id: str, result: ResponseResult, entries: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response_id,
        "status": result.status,
        "status_details": {"reason": result.reason},
        "usage": {
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
            "total_tokens": result.input_tokens + result.output_tokens,
        },
        "memory": {
            "retrieved": result.memory_retrieved,
            "written": result.memory_written,
            "entries": entries,
        },
    }
    if result.error:
        body["status_details"]["error"] = "internal error"
    return body


def _tenant_tag(tenant: str) -> str:
    """A short, stable, non-reversible tag for logs."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:8]
