"""The transport-neutral half of a client: decode, validate, dispatch, answer errors.

:class:`EventHandler` turns one payload (a websocket frame or an MQTT message) into a typed
client event (``agent_runtime.protocol``) and runs the handler for its type against the
:class:`~agent_runtime.sessions.SessionManager`. Errors a client caused come back as ``error``
events and the client stays usable. A transport subclasses it with :meth:`send` (one server
event to this client) and :meth:`superseded` (a client elsewhere took its session over):
``server/websocket.py`` for websocket connections, ``server/mqtt.py`` for MQTT sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from agent_runtime import protocol as p
from agent_runtime.config import RuntimeConfig
from agent_runtime.engine import SamplingParams
from agent_runtime.errors import (
    ConflictError,
    ProtocolError,
    RequestError,
    StoreError,
    UnavailableError,
)
from agent_runtime.metrics import Counter
from agent_runtime.sessions import Session, SessionManager
from agent_runtime.sessions.session import supersede

__all__ = ["Endpoint", "EventHandler", "Spawn"]

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


class Endpoint(Protocol):
    """What a handler needs from its transport's endpoint."""

    config: RuntimeConfig
    sessions: SessionManager
    errors: Counter
    closing: bool  # set at shutdown: new events are refused, pings still answered


class EventHandler:
    """One client of one transport: payloads in, its session's events out."""

    # Errors a transport lets through (its own "the peer went away").
    passthrough: tuple[type[BaseException], ...] = ()

    def __init__(self, endpoint: Endpoint, codec: p.Codec, tenant: str) -> None:
        self.endpoint = endpoint
        self.sessions = endpoint.sessions
        self.codec = codec
        self.tenant = tenant
        self.session: Session | None = None
        self._handlers: dict[type[p.ClientEvent], Callable[[Any], Awaitable[None]]] = {
            p.SessionCreate: self.on_session_create,
            p.SessionResume: self.on_session_resume,
            p.Ping: self.on_ping,
            p.ItemCreate: self.on_item_create,
            p.ResponseCreate: self.on_response_create,
            p.ResponseCancel: self.on_response_cancel,
            p.SessionDelete: self.on_session_delete,
            p.MemoryStats: self.on_memory_stats,
        }

    async def send(self, event: dict[str, Any]) -> None:
        """Send one (stamped) server event to this client."""
        raise NotImplementedError

    def superseded(self) -> None:
        """Another client (of any transport) took this client's session over."""
        self.session = None

    def attach(self, session: Session) -> None:
        """Make this client the session's only client; the previous one is superseded."""
        previous = session.client
        self.session = session
        session.attach(self.send, self)
        supersede(previous, self)

    def decode(self, frame: str | bytes) -> p.ClientEvent:
        """Size-check, decode and validate one payload (ProtocolError otherwise)."""
        limits = self.endpoint.config.server
        if len(frame) > limits.max_frame_bytes:
            raise ProtocolError(
                f"frame of {len(frame)} bytes exceeds the limit of {limits.max_frame_bytes}",
                code="frame_too_large",
            )
        raw = self.codec.decode(frame)
        try:
            return p.parse_client_event(raw, max_message_chars=limits.max_message_chars)
        except RequestError as exc:
            if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
                exc.event_id = exc.event_id or raw["event_id"]
            raise

    async def on_frame(self, frame: str | bytes) -> None:
        """Handle one payload; every failure a client caused is answered with an ``error``."""
        await self.on_event(frame, self.decode)

    async def on_event(self, frame: Any, decode: Callable[[Any], p.ClientEvent]) -> None:
        """Decode ``frame`` with ``decode`` and handle the event (errors answered)."""
        event_id: str | None = None
        event: p.ClientEvent | None = None
        try:
            event = decode(frame)
            event_id = event.event_id
            if self.endpoint.closing and not isinstance(event, p.Ping):
                raise UnavailableError("the server is shutting down", code="server_going_away")
            await self._handlers[type(event)](event)
        except RequestError as exc:
            self.endpoint.errors.inc()
            await self.send_error(exc, exc.event_id or event_id)
        except StoreError as exc:
            log.error("session store error: %s", exc)
            unavailable = UnavailableError(
                "the session store (Redis) is not answering; retry later",
                code="store_unavailable",
            )
            await self.send_error(unavailable, event_id)
        except self.passthrough:
            raise
        except Exception:  # a bug, never bad input (that is a RequestError above)
            log.exception("handling a %s event failed", type(event).__name__)
            await self.send_error(RuntimeError("internal"), event_id)

    async def send_error(self, exc: Exception, event_id: str | None) -> None:
        body = p.error_event(exc, event_id=event_id)
        if self.session is not None:
            await self.session.emit(body)
        else:
            await self.send(p.stamp(body, 0))

    def require_session(self) -> Session:
        if self.session is None or self.session.closed:
            raise ConflictError(
                "no session: send session.create or session.resume first", code="no_session"
            )
        return self.session

    def require_no_session(self) -> None:
        if self.session is not None:
            raise ConflictError("this connection already has a session", code="session_exists")

    # -- handlers, one per client event type ------------------------------------------------

    async def on_session_create(self, event: p.SessionCreate) -> None:
        self.require_no_session()
        session = await self.sessions.create(self.tenant, p.new_id("sess"), event.instructions)
        self.attach(session)
        await session.emit(p.session_created(session.describe()))

    async def on_session_resume(self, event: p.SessionResume) -> None:
        self.require_no_session()
        session = await self.sessions.get(self.tenant, event.session_id)
        await self.replay(session, event.last_seq)

    async def replay(self, session: Session, last_seq: int) -> None:
        """``session.resumed``, then every event after ``last_seq``, then attach."""
        missed = session.missed_events(last_seq)
        resumed = p.session_resumed(
            session.describe(), replayed=len(missed or []), events_lost=missed is None
        )
        await self.send(p.stamp(resumed, session.seq))
        # Replay in seq order, including events emitted while replaying; attach with no await
        # after the last check, so live events can never overtake replayed ones.
        last = last_seq
        while missed:
            for e in missed:
                await self.send(e)
                last = e["seq"]
            missed = session.missed_events(last)
        self.attach(session)

    async def on_ping(self, event: p.Ping) -> None:
        if self.session is None:
            await self.send(p.stamp(p.pong(event.data), 0))
        else:
            await self.session.emit(p.pong(event.data))

    async def on_item_create(self, event: p.ItemCreate) -> None:
        await self.sessions.add_item(self.require_session(), event.role, event.text)

    async def on_response_create(self, event: p.ResponseCreate) -> None:
        session = self.require_session()
        gen = self.endpoint.config.generation
        if event.max_tokens is not None and event.max_tokens > gen.max_tokens_limit:
            raise ProtocolError(
                f"response.create.response.max_tokens must be at most {gen.max_tokens_limit}"
                f" on this server, got {event.max_tokens}",
                code="invalid_value",
            )
        params = SamplingParams(
            max_tokens=event.max_tokens or gen.max_tokens,
            min_tokens=event.min_tokens,
            temperature=gen.temperature if event.temperature is None else event.temperature,
            top_p=gen.top_p if event.top_p is None else event.top_p,
            stop=event.stop,
            seed=event.seed,
        )
        await self.sessions.start_response(
            session, p.new_id("resp"), params, event.commit_on_cancel, prefix=event.prefix
        )

    async def on_response_cancel(self, event: p.ResponseCancel) -> None:
        session = self.require_session()
        if session.response_id is None or (
            event.response_id and event.response_id != session.response_id
        ):
            raise ConflictError("no such active response", code="no_active_response")
        self.sessions.cancel(session)

    async def on_session_delete(self, event: p.SessionDelete) -> None:
        session = self.require_session()
        await self.sessions.delete(session)
        self.session = None
        await self.send(p.stamp(p.session_deleted(session.session_id), session.seq + 1))

    async def on_memory_stats(self, event: p.MemoryStats) -> None:
        await self.sessions.memory_stats(self.require_session())
