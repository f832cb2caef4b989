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
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from agent_runtime.engine import Engine, Generation, OutputCollector, ResponseResult
from agent_runtime.errors import ConflictError, OverloadedError, SessionNotFoundError
from agent_runtime.generation import GenerationState, SamplingParams
from agent_runtime.store import SessionMeta, SessionStore
from agent_runtime.tokenizer import ASSISTANT, encode_turn
from memory import MemoryBank, MemoryConfig

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
        self.seq = 0
        self.events: deque[dict[str, Any]] = deque(maxlen=buffer_events)
        self.sender: Sender | None = None
        self.response_id: str | None = None
        self.response_task: asyncio.Task[None] | None = None
        self.detached_at: float | None = None
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

    def attach(self, sender: Sender) -> None:
        self.sender = sender
        self.detached_at = None

    def detach(self, sender: Sender | None = None) -> None:
        if sender is None or self.sender is sender:
            self.sender = None
            self.detached_at = time.monotonic()

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
        *,
        max_sessions: int = 1024,
        node_id: str = "",
    ) -> None:
        self.engine = engine
        self.store = store
        self.data_dir = data_dir
        self.memory = memory
        self.max_sessions = max_sessions
        self.node_id = node_id
        self.sessions: dict[str, Session] = {}  # key: tenant/session_id
        self.fingerprint = engine.model.cfg.fingerprint()

    def directory(self, tenant: str, session_id: str) -> Path:
        # Tenant names are hashed so that no tenant-chosen string becomes a path component.
        t = hashlib.sha256(tenant.encode()).hexdigest()[:24]
        return self.data_dir / "sessions" / t / session_id

    def _open_bank(self, directory: Path) -> MemoryBank:
        key_dim, value_dim = self.engine.model.memory_dims
        bank = MemoryBank.open(directory / "bank", key_dim, value_dim, self.memory)
        bank.meta.setdefault("model_fingerprint", self.fingerprint)
        if bank.meta["model_fingerprint"] != self.fingerprint:
            bank.close()
            from agent_runtime.errors import BankFormatError

            raise BankFormatError(
                f"bank in {directory} was written by model {bank.meta['model_fingerprint']}, not {self.fingerprint}"
            )
        return bank

    async def create(self, tenant: str, session_id: str, instructions: str = "") -> Session:
        if len(self.sessions) >= self.max_sessions:
            raise OverloadedError("too many live sessions on this server", retry_after_ms=5000)
        directory = self.directory(tenant, session_id)

        def build() -> tuple[GenerationState, MemoryBank]:
            return GenerationState.new(self.engine.model), self._open_bank(directory)

        state, bank = await self.engine.call(build)
        now = time.time()
        meta = SessionMeta(session_id, tenant, created_at=now, last_active=now, owner=self.node_id)
        await self.store.create(meta)
        session = Session(session_id, tenant, state, bank, directory, meta)
        if instructions:
            session.pending += encode_turn("system", instructions)
        self.sessions[session.key] = session
        log.info("session %s created for tenant %s", session_id, _tenant_tag(tenant))
        return session

    async def get(self, tenant: str, session_id: str) -> Session:
        """The tenant's live session, loading it from disk if needed; otherwise not found.

        A session of another tenant and a session that does not exist give the same error.
        """
        session = self.sessions.get(f"{tenant}/{session_id}")
        if session is not None:
            return session
        meta = await self.store.get(session_id)
        directory = self.directory(tenant, session_id)
        if meta is None or meta.tenant != tenant or not (directory / "bank").exists():
            raise SessionNotFoundError("no such session")
        if len(self.sessions) >= self.max_sessions:
            raise OverloadedError("too many live sessions on this server", retry_after_ms=5000)
        device = next(self.engine.model.parameters()).device

        def load() -> tuple[GenerationState, MemoryBank]:
            bank = self._open_bank(directory)
            state_file = directory / "state.pt"
            if state_file.exists():
                state = GenerationState.from_state_dict(
                    torch.load(state_file, weights_only=True), device
                )
            else:
                state = GenerationState.new(self.engine.model)
            return state, bank

        state, bank = await self.engine.call(load)
        session = Session(session_id, tenant, state, bank, directory, meta)
        self.sessions[session.key] = session
        log.info("session %s loaded from disk (%d memory entries)", session_id, len(bank))
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
            return len(session.bank)

        entries = await self.engine.call(sync)
        session.meta.turns += 1
        session.meta.tokens = session.state.position
        session.meta.bank_entries = entries
        await self.store.update(
            session.session_id,
            turns=session.meta.turns,
            tokens=session.meta.tokens,
            bank_entries=entries,
        )
        if result.memory_written:
            await session.emit(
                {"type": "memory.committed", "written": result.memory_written, "entries": entries}
            )

    def cancel(self, session: Session) -> bool:
        return session.response_id is not None and self.engine.abort(session.response_id)

    # -- persistence ----------------------------------------------------------------------------

    async def snapshot(self, session: Session) -> None:
        """Write a new bank generation and the generation state (atomically) on the worker thread."""

        def write() -> int:
            session.bank.snapshot()
            tmp = session.directory / "state.pt.tmp"
            torch.save(session.state.state_dict(), tmp)
            tmp.replace(session.directory / "state.pt")
            return len(session.bank)

        entries = await self.engine.call(write)
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
        """Cancel, forget and erase a session: bank files, state, metadata."""
        if session.response_task is not None and not session.response_task.done():
            self.cancel(session)
            with contextlib.suppress(asyncio.CancelledError):
                await session.response_task
        session.closed = True
        await self.engine.call(session.bank.close)
        self.sessions.pop(session.key, None)
        await self.store.delete(session.session_id, session.tenant)
        await asyncio.to_thread(shutil.rmtree, session.directory, True)
        log.info("session %s deleted", session.session_id)

    async def aclose(self) -> None:
        """Snapshot every live session (graceful shutdown)."""
        for session in list(self.sessions.values()):
            try:
                await self.unload(session)
            except Exception:
                log.exception("could not snapshot session %s", session.session_id)


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
