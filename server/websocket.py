"""The websocket endpoint: one :class:`Connection` per client; frames in, session events out.

A frame is size-checked, decoded by the connection's codec, validated into a typed client event
(``agent_runtime.protocol``) and dispatched to the handler for its type. Errors a client caused
come back as ``error`` events and the connection stays open.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.typing import Subprotocol

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

__all__ = ["Connection", "WebsocketEndpoint", "select_subprotocol"]

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, Any]], None]


class WebsocketEndpoint:
    """The websocket handler: tracks open connections and runs one :class:`Connection` each."""

    def __init__(
        self,
        config: RuntimeConfig,
        sessions: SessionManager,
        tenant_of: dict[ServerConnection, str],
        errors: Counter,
        spawn: Spawn,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.tenant_of = tenant_of  # filled by the HTTP layer when it vets the upgrade
        self.errors = errors
        self.spawn = spawn
        self.connections: set[ServerConnection] = set()
        self.closing = False  # set at shutdown: new events are refused, pings still answered

    def displace(self, session: Session) -> None:
        """Another client takes ``session``: the websocket attached to it is closed (4000)."""
        previous = session.client
        if isinstance(previous, Connection):
            previous.session = None
            self.spawn(previous.ws.close(4000, "session resumed on another connection"))

    async def __call__(self, ws: ServerConnection) -> None:
        codec = p.CODECS[ws.subprotocol or p.JSON_SUBPROTOCOL]
        conn = Connection(self, ws, codec, tenant=self.tenant_of.pop(ws))
        self.connections.add(ws)
        try:
            async for frame in ws:
                await conn.on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)
            conn.on_close()


class Connection:
    """One websocket client: decodes frames, dispatches events, sends its session's events."""

    def __init__(
        self, endpoint: WebsocketEndpoint, ws: ServerConnection, codec: p.Codec, tenant: str
    ) -> None:
        self.endpoint = endpoint
        self.sessions = endpoint.sessions
        self.ws = ws
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
        await self.ws.send(self.codec.encode(event))

    async def on_frame(self, frame: str | bytes) -> None:
        limits = self.endpoint.config.server
        event_id: str | None = None
        raw: object = None
        try:
            if len(frame) > limits.max_frame_bytes:
                raise ProtocolError(
                    f"frame of {len(frame)} bytes exceeds the limit of {limits.max_frame_bytes}",
                    code="frame_too_large",
                )
            raw = self.codec.decode(frame)
            if isinstance(raw, dict) and isinstance(raw.get("event_id"), str):
                event_id = raw["event_id"]
            event = p.parse_client_event(raw, max_message_chars=limits.max_message_chars)
            if self.endpoint.closing and not isinstance(event, p.Ping):
                raise UnavailableError("the server is shutting down", code="server_going_away")
            try:
                await self._handlers[type(event)](event)
            except RequestError as exc:
                exc.event_id = exc.event_id or event.event_id
                raise
        except RequestError as exc:
            self.endpoint.errors.inc()
            await self.send_error(exc, event_id)
        except StoreError as exc:
            log.error("session store error: %s", exc)
            unavailable = UnavailableError(
                "the session store (Redis) is not answering; retry later",
                code="store_unavailable",
            )
            await self.send_error(unavailable, event_id)
        except ConnectionClosed:
            raise
        except Exception:  # a bug, never bad input (that is a RequestError above)
            log.exception("connection: handling a %s event failed", type(raw).__name__)
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
        missed = session.missed_events(event.last_seq)
        resumed = p.session_resumed(
            session.describe(), replayed=len(missed or []), events_lost=missed is None
        )
        await self.send(p.stamp(resumed, session.seq))
        # Replay in seq order, including events emitted while replaying; attach with no await
        # after the last check, so live events can never overtake replayed ones.
        last = event.last_seq
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

    # -- attachment ---------------------------------------------------------------------------

    def attach(self, session: Session) -> None:
        """Make this connection the session's only client; a previous one is closed (4000)."""
        if session.client is not self:
            self.endpoint.displace(session)
        self.session = session
        session.attach(self.send, self)

    def on_close(self) -> None:
        if self.session is not None:
            self.session.detach(self.send)  # a no-op unless this connection is still attached


def select_subprotocol(
    conn: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """The client's first supported subprotocol; JSON when it names none; refuse unknown ones."""
    if not offered:
        return None
    for name in offered:
        if name in p.SUBPROTOCOLS:
            return name
    raise NegotiationError(
        f"unsupported subprotocols {list(offered)}; this server speaks {list(p.SUBPROTOCOLS)}"
    )
