"""An async Python client for the agent-runtime event protocol (``docs/asyncapi.yaml``).

::

    async with AgentClient("ws://127.0.0.1:8765/v1/realtime") as client:
        session_id = await client.create_session()
        reply = client.respond("Remember this: my locker code is 7QK2ZP.", max_tokens=64)
        async for delta in reply:
            print(delta, end="", flush=True)
        print(reply.status, reply.usage, reply.memory)

The client tracks the session's ``seq``: every server event it has seen advances
:attr:`AgentClient.last_seq`, and :meth:`AgentClient.reconnect` opens a new connection and sends
``session.resume`` with it, so a response interrupted by a dropped connection continues where it
stopped (the server buffers a detached session's events). Replayed duplicates are dropped.

One connection carries one session and at most one streaming :class:`Response`; request methods
(``memory_stats``, ``ping``...) may be awaited while a response streams, from the loop body or
another task. :meth:`AgentClient.cancel` may be called from anywhere.

Exceptions::

    AgentRuntimeError
    ├── RequestError
    │   └── RemoteError           the server answered with an ``error`` event: type, code,
    │                             message, event_id, retry_after_ms (set for ``overloaded``)
    └── ClientError               failures on this side of the socket
        ├── ClientStateError      misuse: not connected, no session, a response already streaming
        ├── DisconnectedError     could not connect, or the connection dropped: ``reconnect()``
        ├── RejectedError         the server refused the handshake (401 bad API key, 403 origin...)
        └── EventsLostError       a resume found events after last_seq no longer buffered
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Subprotocol

from agent_runtime import protocol as p
from agent_runtime.errors import (
    ClientError,
    ClientStateError,
    DisconnectedError,
    EventsLostError,
    ProtocolError,
    RejectedError,
    RemoteError,
)

__all__ = [
    "DEFAULT_URL",
    "AgentClient",
    "ClientError",
    "ClientState",
    "ClientStateError",
    "CodecName",
    "DisconnectedError",
    "EventsLostError",
    "MemoryStats",
    "RejectedError",
    "RemoteError",
    "Response",
    "SessionInfo",
]

log = logging.getLogger(__name__)

DEFAULT_URL = "ws://127.0.0.1:8765/v1/realtime"
SUBPROTOCOLS: dict[str, str] = {
    "json": p.JSON_SUBPROTOCOL,
    "msgpack": p.MSGPACK_SUBPROTOCOL,
}
# Events that belong to the streaming response rather than to a request/reply pair.
RESPONSE_EVENTS = frozenset(
    {"response.created", "response.output_text.delta", "memory.committed", "response.done"}
)

Event = p.Event


def remote_error(event: Event) -> RemoteError:
    """The :class:`RemoteError` an ``error`` event describes."""
    body = event.get("error")
    if not isinstance(body, dict):
        return RemoteError(
            f"malformed error event: {event!r}", type="client_error", code="malformed"
        )
    retry = body.get("retry_after_ms")
    event_id = body.get("event_id")
    location = body.get("location")
    return RemoteError(
        str(body.get("message", "")),
        type=str(body.get("type", "invalid_request_error")),
        code=str(body.get("code", "invalid_request")),
        event_id=event_id if isinstance(event_id, str) else None,
        retry_after_ms=int(retry) if isinstance(retry, int | float) else None,
        location=location if isinstance(location, str) else None,
    )


def websocket_url(base: str) -> str:
    """The websocket endpoint of a node's base URL (``http://h:p`` -> ``ws://h:p/v1/realtime``)."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/realtime"):
        path += "/v1/realtime"
    return urlunsplit((scheme, parts.netloc, path, "", ""))


MAX_REDIRECTS = 3
"""How many ``session_elsewhere`` redirects one resume follows."""


CodecName = Literal["json", "msgpack"]


# -- results ------------------------------------------------------------------------------------


class ClientState(enum.Enum):
    UNOPENED = "unopened"
    OPEN = "open"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


@dataclass(frozen=True)
class SessionInfo:
    """The ``session`` body of ``session.created``/``session.resumed`` plus resume details."""

    id: str
    created_at: float = 0.0
    turns: int = 0
    memory_entries: int = 0
    position: int = 0
    replayed: int = 0
    """Events the server replayed after ``last_seq`` (resume only)."""
    events_lost: bool = False
    """True when some events after ``last_seq`` were no longer buffered (resume only)."""
    events: tuple[Event, ...] = ()
    """The replayed events themselves (resume only), after duplicates were dropped."""

    @classmethod
    def from_event(cls, event: Event, events: Sequence[Event] = ()) -> SessionInfo:
        s = event.get("session") or {}
        return cls(
            id=str(s.get("id", "")),
            created_at=float(s.get("created_at", 0.0)),
            turns=int(s.get("turns", 0)),
            memory_entries=int(s.get("memory_entries", 0)),
            position=int(s.get("position", 0)),
            replayed=int(event.get("replayed", 0)),
            events_lost=bool(event.get("events_lost", False)),
            events=tuple(events),
        )


@dataclass(frozen=True)
class MemoryStats:
    """The session bank's statistics (``memory.stats``); ``raw`` holds every field sent."""

    entries: int
    capacity: int
    position: int
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Waiter:
    reply: str  # the event type that answers the request
    event_id: str
    future: asyncio.Future[Event]


class Response:
    """One streaming response: an async iterator of text deltas, then the ``response.done`` body.

    Created by :meth:`AgentClient.respond`; nothing is sent until it is first iterated (or
    :meth:`wait` is awaited). If the connection drops, iteration raises
    :class:`DisconnectedError`; after :meth:`AgentClient.reconnect` the same iterator continues.
    """

    def __init__(self, client: AgentClient, text: str | None, role: str, params: Event) -> None:
        self._client = client
        self._input = text
        self._role = role
        self._params = params
        self._items: deque[Event | ClientError] = deque()
        self._wakeup = asyncio.Event()
        self._started = False
        self.event_ids: set[str] = set()
        self.id: str | None = None
        self.text = ""
        """All text received so far."""
        self.deltas = 0
        """Delta events received (deltas are coalesced when the client reads slowly)."""
        self.finished = False
        self.status: str | None = None
        """``completed``, ``cancelled``, ``incomplete`` or ``failed`` once finished."""
        self.reason: str | None = None
        """Why it ended: ``end``, ``stop``, ``length``, ``cancelled`` or ``error``."""
        self.usage: dict[str, int] = {}
        self.memory: dict[str, int] = {}
        self.committed: Event | None = None
        """The ``memory.committed`` event, if the turn wrote to the bank."""
        self.done: Event | None = None
        """The complete ``response`` body of ``response.done``."""

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> str:
        if not self._started:
            try:
                await self._start()
            except BaseException:
                # Not started (or not known to be): nothing to continue after a reconnect.
                self.finished, self.status = True, "failed"
                self._client._response_finished(self)
                raise
        while True:
            if self.finished:
                raise StopAsyncIteration
            item = await self._next_item()
            if isinstance(item, BaseException):
                raise item
            kind = item["type"]
            if kind == "response.output_text.delta":
                delta = str(item.get("delta", ""))
                self.text += delta
                self.deltas += 1
                return delta
            if kind == "response.created":
                self.id = str(item["response"]["id"])
            elif kind == "memory.committed":
                self.committed = item
            elif kind == "response.done":
                self._finish(item["response"])
            elif kind == "error":
                self.finished = True
                self.status = "failed"
                self._client._response_finished(self)
                raise remote_error(item)

    async def wait(self) -> Response:
        """Receive the rest of the response; returns ``self`` with every field filled in."""
        async for _ in self:
            pass
        return self

    async def _start(self) -> None:
        self._started = True
        client = self._client
        if self._input is not None:
            item = p.item_create(self._input, self._role)
            # Wait for the item to be accepted, so a rejected item never starts a response.
            await client._request(item, "conversation.item.created")
        event_id = client._next_id()
        self.event_ids.add(event_id)
        await client._send({**p.response_create(self._params), "event_id": event_id})

    async def _next_item(self) -> Event | ClientError:
        while not self._items:
            state = self._client.state
            if state is ClientState.DISCONNECTED:
                raise DisconnectedError("connection lost during the response; call reconnect()")
            if state is ClientState.CLOSED:
                raise ClientStateError("the client is closed")
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()

    def _push(self, item: Event | ClientError) -> None:
        self._items.append(item)
        self._wakeup.set()

    def _finish(self, body: Event) -> None:
        self.finished = True
        self.done = body
        self.id = str(body.get("id", self.id))
        self.status = str(body.get("status"))
        details = body.get("status_details") or {}
        self.reason = str(details.get("reason")) if details.get("reason") is not None else None
        self.usage = dict(body.get("usage") or {})
        self.memory = dict(body.get("memory") or {})
        self._client._response_finished(self)


# -- the client ---------------------------------------------------------------------------------


class AgentClient:
    """A connection to an agent-runtime server: ``async with AgentClient(url) as client``.

    Args:
        url: the websocket endpoint, ``ws://HOST:PORT/v1/realtime``; or, for a cluster without
            a load balancer in front, a list of the nodes' endpoints: :meth:`connect` and
            :meth:`reconnect` try them in turn, from the one last used.
        codec: ``"json"`` (text frames) or ``"msgpack"`` (binary frames); picks the subprotocol.
        headers: extra HTTP headers for the opening handshake.
        api_key: the tenant's API key, sent as ``Authorization: Bearer <api_key>``.
        timeout: seconds to wait for the reply of a request (None: forever). Streaming a
            response is not bounded by it; wrap it in ``asyncio.timeout`` if needed.
    """

    def __init__(
        self,
        url: str | Sequence[str] = DEFAULT_URL,
        *,
        codec: CodecName = "json",
        headers: Mapping[str, str] | None = None,
        api_key: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        if codec not in SUBPROTOCOLS:
            raise ValueError(f"codec must be 'json' or 'msgpack', got {codec!r}")
        self.urls = [url] if isinstance(url, str) else list(url)
        if not self.urls:
            raise ValueError("url must name at least one endpoint")
        self.url = self.urls[0]
        """The endpoint of the current (or last) connection."""
        self.codec: CodecName = codec
        self.subprotocol = SUBPROTOCOLS[codec]
        self.headers = dict(headers or {})
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.state = ClientState.UNOPENED
        self.session_id: str | None = None
        self.last_seq = 0
        """Highest ``seq`` seen on the current session (sent by :meth:`reconnect`)."""
        self.going_away: str | None = None
        """The reason of a ``server.going_away`` event, once one arrives."""
        self.unclaimed_errors: list[RemoteError] = []
        """``error`` events that answered no pending request (kept for inspection)."""
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: list[_Waiter] = []
        self._response: Response | None = None
        self._cancel_ids: set[str] = set()
        self._replay_left = 0
        self._replayed: list[Event] = []
        self._resumed: Event | None = None
        self._n = 0
        self._prefix = uuid.uuid4().hex[:8]

    # -- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> AgentClient:
        await self.connect()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Open the websocket (the client is not reusable once closed). With several endpoints,
        the current one is tried first, then the others in order."""
        if self.state is ClientState.CLOSED:
            raise ClientStateError("the client is closed")
        if self.state is ClientState.OPEN:
            raise ClientStateError("the client is already connected")
        start = self.urls.index(self.url) if self.url in self.urls else 0
        order = [self.url, *(u for u in self.urls[start:] + self.urls[:start] if u != self.url)]
        failure: DisconnectedError | None = None
        for url in order:
            self.url = url
            try:
                return await self._connect_one()
            except DisconnectedError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def _routing_header(self) -> dict[str, str]:
        return {"X-Session-Id": self.session_id} if self.session_id else {}

    async def _connect_one(self) -> None:
        try:
            ws = await connect(
                self.url,
                subprotocols=[Subprotocol(self.subprotocol)],
                # A load balancer in front of a cluster can route by it (docs/scaling.md).
                additional_headers={**self.headers, **self._routing_header()} or None,
                open_timeout=self.timeout,
                compression=None,
                max_size=None,
            )
        except InvalidStatus as exc:
            status = int(exc.response.status_code)
            body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
            raise RejectedError(
                f"{self.url} refused the connection: HTTP {status} {body}".rstrip(), status
            ) from exc
        except (OSError, InvalidHandshake, InvalidURI, TimeoutError) as exc:
            raise DisconnectedError(f"could not connect to {self.url}: {exc}") from exc
        if ws.subprotocol != self.subprotocol:
            await ws.close()
            raise ClientError(
                f"server chose subprotocol {ws.subprotocol!r}, expected {self.subprotocol!r}"
            )
        self._ws = ws
        self._replay_left, self._replayed, self._resumed = 0, [], None
        self.state = ClientState.OPEN
        self._reader = asyncio.create_task(self._read(ws), name=f"agent-client-reader-{self._n}")

    async def aclose(self) -> None:
        """Close the connection (idempotent). The session stays on the server and can be resumed."""
        if self.state is ClientState.CLOSED:
            return
        self.state = ClientState.CLOSED
        await self._drop_connection()
        self._fail_waiters(ClientStateError("the client is closed"))
        if self._response is not None:
            self._response._wakeup.set()

    async def reconnect(self) -> SessionInfo | None:
        """Open a new connection and resume the session from :attr:`last_seq`.

        A response that was streaming continues: iterate the same :class:`Response` again. Returns
        the resume details, or None when the client had no session.
        """
        if self.state is ClientState.CLOSED:
            raise ClientStateError("the client is closed")
        await self._drop_connection()
        self.state = ClientState.DISCONNECTED
        await self.connect()
        if self.session_id is None:
            return None
        return await self.resume(self.session_id, self.last_seq)

    async def _drop_connection(self) -> None:
        ws, reader = self._ws, self._reader
        self._ws, self._reader = None, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader

    # -- requests -------------------------------------------------------------------------------

    async def create_session(self, instructions: str = "") -> str:
        """Create a session on this connection; returns its id."""
        self._require_open()
        self.last_seq = 0
        event = await self._request(p.session_create(instructions), "session.created")
        info = SessionInfo.from_event(event)
        self.session_id = info.id
        return info.id

    async def resume(self, session_id: str, last_seq: int | None = None) -> SessionInfo:
        """Attach this connection to an existing session and receive the events after ``last_seq``.

        ``last_seq`` defaults to :attr:`last_seq` when resuming the client's own session, else 0
        (every buffered event is replayed; they are in :attr:`SessionInfo.events`). Returns after
        the replay has been received.
        """
        self._require_open()
        if last_seq is None:
            last_seq = self.last_seq if session_id == self.session_id else 0
        self.session_id, self.last_seq = session_id, last_seq
        event = await self._resume_following(session_id, last_seq)
        info = SessionInfo.from_event(event, self._replayed)
        self._replayed = []
        response = self._response
        if info.events_lost and response is not None and not response.finished:
            response._push(EventsLostError(f"events after seq {last_seq} were no longer buffered"))
        return info

    async def _resume_following(self, session_id: str, last_seq: int) -> Event:
        """``session.resume``, following ``session_elsewhere`` redirects to the owning node. An
        owner that does not answer (it died; its lease has not expired yet) is retried through
        the configured endpoints with a growing pause, until :attr:`timeout` runs out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.timeout if self.timeout is not None else 60.0)
        hops, pause = 0, 0.1
        while True:
            try:
                return await self._request(
                    p.session_resume(session_id, last_seq), "session.resumed"
                )
            except RemoteError as exc:
                if exc.code != "session_elsewhere" or not exc.location:
                    raise
                location = websocket_url(exc.location)
                lease_left = exc.retry_after_ms
            hops += 1
            if hops > MAX_REDIRECTS * 4:
                raise ClientError(f"session {session_id}: too many redirects (last: {location})")
            log.info("session %s is served at %s; following", session_id, location)
            await self._drop_connection()
            self.state = ClientState.DISCONNECTED
            here, self.url = self.url, location
            try:
                await self._connect_one()
                continue
            except DisconnectedError:
                if loop.time() + pause > deadline:
                    raise
            # The owner is gone but its lease holds: wait until it runs out (the node told us
            # how long it had left) or, not told, a growing pause; then ask a node we know.
            if lease_left is not None:
                await asyncio.sleep(min(lease_left / 1000 + 0.05, max(0.0, deadline - loop.time())))
            else:
                await asyncio.sleep(pause)
                pause = min(2.0, pause * 2)
            self.url = here if here in self.urls else self.urls[0]
            await self.connect()

    def respond(
        self,
        text: str | None = None,
        *,
        role: str = "user",
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        commit_on_cancel: bool | None = None,
        prefix: str | None = None,
    ) -> Response:
        """A streaming response to ``text`` (a new ``role`` message; None: to the items so far).

        Unset sampling parameters take the server's defaults. ``prefix`` is text the reply
        starts with (the stream continues it). The returned :class:`Response` sends its events
        when first iterated.
        """
        self._require_session()
        current = self._response
        if current is not None and current._started and not current.finished:
            raise ClientStateError("a response is already streaming on this client")
        params: Event = {}
        for name, value in (
            ("max_tokens", max_tokens),
            ("temperature", temperature),
            ("top_p", top_p),
            ("seed", seed),
            ("commit_on_cancel", commit_on_cancel),
            ("prefix", prefix),
        ):
            if value is not None:
                params[name] = value
        if stop is not None:
            params["stop"] = list(stop)
        response = Response(self, text, role, params)
        self._response = response
        return response

    async def add_item(self, text: str, role: str = "user") -> None:
        """Add a message to the conversation without asking for a response."""
        self._require_session()
        await self._request(p.item_create(text, role), "conversation.item.created")

    async def cancel(self) -> bool:
        """Ask the server to stop the streaming response (its iterator then ends ``cancelled``).

        Returns False when there was nothing to cancel. A cancel that races with the response's
        natural end is harmless.
        """
        response = self._response
        if response is None or response.finished or not response._started:
            return False
        event_id = self._next_id()
        self._cancel_ids.add(event_id)
        event: Event = {**p.response_cancel(), "event_id": event_id}
        if response.id is not None:
            event["response_id"] = response.id
        await self._send(event)
        return True

    async def memory_stats(self) -> MemoryStats:
        """The session bank's statistics."""
        self._require_session()
        event = await self._request(p.memory_stats_request(), "memory.stats")
        memory = dict(event.get("memory") or {})
        return MemoryStats(
            entries=int(memory.get("entries", 0)),
            capacity=int(memory.get("capacity", 0)),
            position=int(event.get("position", 0)),
            raw=memory,
        )

    async def ping(self, data: Any = None) -> Any:
        """Round trip through the session's event stream; returns the echoed ``data``."""
        self._require_session()
        event = await self._request(p.ping(data), "pong")
        return event.get("data")

    async def delete_session(self) -> None:
        """Erase the session on the server (memory bank, state and metadata)."""
        self._require_session()
        await self._request(p.session_delete(), "session.deleted")
        self.session_id = None
        self.last_seq = 0

    # -- plumbing -------------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self.state is ClientState.DISCONNECTED:
            raise DisconnectedError("the connection was lost; call reconnect()")
        if self.state is not ClientState.OPEN:
            raise ClientStateError(f"the client is {self.state.value}; it must be open")

    def _require_session(self) -> None:
        self._require_open()
        if self.session_id is None:
            raise ClientStateError("no session: call create_session() or resume() first")

    def _next_id(self) -> str:
        self._n += 1
        return f"evt_cli_{self._prefix}_{self._n}"

    def _encode(self, event: Event) -> str | bytes:
        return p.CODECS[self.subprotocol].encode(event)

    def _decode(self, frame: str | bytes) -> Event | None:
        try:
            obj = p.CODECS[self.subprotocol].decode(frame)
        except ProtocolError as exc:
            log.warning("undecodable frame from the server: %s", exc.message)
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            log.warning("server sent a frame that is not an event")
            return None
        return obj

    async def _send(self, event: Event) -> str:
        self._require_open()
        event.setdefault("event_id", self._next_id())
        ws = self._ws
        assert ws is not None
        try:
            await ws.send(self._encode(event))
        except ConnectionClosed as exc:
            raise DisconnectedError(f"connection lost: {exc}") from exc
        return str(event["event_id"])

    async def _request(self, event: Event, reply: str) -> Event:
        """Send ``event`` and wait for the ``reply`` event (or the ``error`` naming its event_id)."""
        self._require_open()
        event.setdefault("event_id", self._next_id())
        waiter = _Waiter(reply, str(event["event_id"]), asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await self._send(event)
            async with asyncio.timeout(self.timeout):
                return await waiter.future
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _response_finished(self, response: Response) -> None:
        if self._response is response:
            self._cancel_ids.clear()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                event = self._decode(frame)
                if event is None:
                    continue
                try:
                    self._dispatch(event)
                except Exception:  # a malformed event must not kill the reader
                    log.exception("could not handle a %r event from the server", event["type"])
        except ConnectionClosed:
            pass
        finally:
            if self._ws is ws or self._ws is None:
                if self.state is ClientState.OPEN:
                    self.state = ClientState.DISCONNECTED
                self._fail_waiters(DisconnectedError("connection lost"))
                if self._response is not None:
                    self._response._wakeup.set()

    def _fail_waiters(self, exc: ClientError) -> None:
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.future.done():
                w.future.set_exception(exc)
                w.future.exception()  # retrieved here so an abandoned request does not warn

    def _dispatch(self, event: Event) -> None:
        kind = event["type"]
        if kind == "session.resumed":
            # Its seq is the session's latest, *not* a buffered event's: the replay follows.
            seq = event.get("seq")
            if isinstance(seq, int) and seq < self.last_seq:
                # The session was reloaded from disk (idle unload, server restart) and its seq
                # counter started again: follow it, or every new event would look like a replay.
                self.last_seq = seq
            self._replay_left = int(event.get("replayed", 0))
            self._replayed = []
            self._resumed = event
            if self._replay_left == 0:
                self._resolve("session.resumed", event)
            return
        replay = self._replay_left > 0
        seq = event.get("seq")
        if kind != "session.deleted" and isinstance(seq, int) and seq > 0:
            if seq <= self.last_seq:
                self._count_replay(replay)
                return  # a duplicate from a replay
            self.last_seq = seq
        if replay:
            self._replayed.append(event)
        self._route(event, replay)
        self._count_replay(replay)

    def _count_replay(self, replay: bool) -> None:
        if replay:
            self._replay_left -= 1
            if self._replay_left == 0 and self._resumed is not None:
                self._resolve("session.resumed", self._resumed)
                self._resumed = None

    def _route(self, event: Event, replay: bool) -> None:
        kind = event["type"]
        response = self._response
        active = response is not None and not response.finished
        if kind in RESPONSE_EVENTS:
            if response is None or not active:
                return  # history (a replay) or a response this client did not start
            if kind == "response.created":
                rid = event.get("response", {}).get("id")
                if response.id is None:
                    response.id = rid
                elif rid != response.id:
                    return
            elif kind != "memory.committed":
                rid = event.get("response_id") or event.get("response", {}).get("id")
                if rid != response.id:
                    return
            response._push(event)
            return
        if kind == "error":
            self._route_error(event, replay)
            return
        if kind == "server.going_away":
            self.going_away = str(event.get("reason", ""))
            return
        if replay:
            return  # replies to requests of an earlier connection
        for w in self._waiters:
            if w.reply == kind and not w.future.done():
                self._waiters.remove(w)
                w.future.set_result(event)
                return

    def _route_error(self, event: Event, replay: bool) -> None:
        err = remote_error(event)
        eid = err.event_id
        response = self._response
        active = response is not None and not response.finished
        if eid is not None and eid in self._cancel_ids:
            self._cancel_ids.discard(eid)
            if err.code == "no_active_response":
                return  # the cancel raced with the response's end
        for w in self._waiters:
            if w.event_id == eid and not w.future.done():
                self._waiters.remove(w)
                w.future.set_exception(err)
                return
        if response is not None and active and eid in response.event_ids:
            response._push(event)
            return
        if eid is None and not replay:
            if self._waiters:
                w = self._waiters.pop(0)
                w.future.set_exception(err)
                return
            if response is not None and active:
                response._push(event)
                return
        if not replay:
            log.warning("unclaimed error from the server: %s", err)
            self.unclaimed_errors.append(err)

    def _resolve(self, reply: str, event: Event) -> None:
        for w in self._waiters:
            if w.reply == reply and not w.future.done():
                self._waiters.remove(w)
                w.future.set_result(event)
                return
