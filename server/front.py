"""One port, two protocols: websocket upgrades go to ``websockets``, plain HTTP to us (h11).

``websockets`` answers an HTTP request only with a whole body and refuses requests that have one,
so it cannot serve ``POST /v1/chat/completions`` or stream server-sent events. Every connection
is therefore a :class:`FrontConnection` (websockets' documented ``create_connection`` hook): it
reads the request head first, then either hands the bytes to the websocket handshake unchanged
or serves HTTP/1.1 itself with ``h11`` (keep-alive, request bodies, chunked streaming), writing
with the connection's own flow control so a client that stops reading never buffers without
bound.

Limits: a request head must arrive within :data:`HEAD_TIMEOUT_S` (slowloris) and fit in
:data:`MAX_HEAD_BYTES`; bodies are capped by the router (:class:`Reply` with 413 otherwise); an
idle keep-alive connection closes after :data:`KEEPALIVE_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11
from websockets.asyncio.server import ServerConnection

__all__ = [
    "HEAD_TIMEOUT_S",
    "MAX_HEAD_BYTES",
    "FrontConnection",
    "HttpRequest",
    "Reply",
    "connection_factory",
    "forward",
    "json_reply",
]

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 10.0
KEEPALIVE_S = 15.0
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class HttpRequest:
    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        name = name.lower()
        for k, v in self.headers:
            if k == name:
                return v
        return default


@dataclass
class Reply:
    """An HTTP response: a whole ``body``, or a ``stream`` of chunks (sent chunked)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    stream: AsyncIterator[bytes] | None = None
    close: Callable[[], Awaitable[None]] | None = None
    """Awaited once the reply is sent or abandoned (releases what the stream holds)."""


Router = Callable[[HttpRequest, "FrontConnection"], Awaitable[Reply]]


def json_reply(status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, [("Content-Type", "application/json"), *(headers or [])], body)


class FrontConnection(ServerConnection):
    """A websocket connection that serves plain HTTP itself when the request is not an upgrade."""

    def __init__(
        self,
        router: Router,
        closing: Callable[[], bool],
        live: set[FrontConnection],
        *args: Any,
        **kw: Any,
    ) -> None:
        super().__init__(*args, **kw)
        self.router = router
        self.closing = closing
        self.live = live  # the server's plain-HTTP connections (woken at shutdown)
        self.mode: str | None = None  # "ws" or "http" once the request head is in
        self._head = bytearray()
        self._decided = asyncio.Event()
        self._h11: h11.Connection | None = None
        self._wake = asyncio.Event()
        self.lost = False
        self.on_lost: list[Callable[[], None]] = []  # called once if the client goes away
        self.idle = False  # waiting for the next keep-alive request (closed at shutdown)

    # -- asyncio protocol callbacks -----------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.mode == "ws":
            super().data_received(data)
            return
        if self.mode == "http":
            assert self._h11 is not None
            self._h11.receive_data(data)
            self._wake.set()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= MAX_HEAD_BYTES:
            return
        buffered = bytes(self._head)
        self._head.clear()
        if end >= 0 and _is_upgrade(buffered[:end]):
            self.mode = "ws"
            super().data_received(buffered)
        else:
            self.mode = "http"
            self.live.add(self)
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
            self._h11.receive_data(buffered)
        self._decided.set()

    def eof_received(self) -> None:
        if self.mode == "ws":
            super().eof_received()
            return
        if self._h11 is not None:
            self._h11.receive_data(b"")
        self._wake.set()
        self._decided.set()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.live.discard(self)
        self.lost = True
        self._wake.set()
        self._decided.set()
        for callback in self.on_lost:
            callback()
        self.on_lost.clear()

    # -- the handshake hook: websockets' protocol handler awaits this first ---------------------

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                await self._decided.wait()
                if self.mode == "ws":
                    await super().handshake(*args, **kwargs)
                    return
        except TimeoutError:
            return  # the protocol handler aborts the transport
        if self.mode == "http" and not self.lost:
            try:
                await self._serve_http()
            finally:
                self.transport.close()  # flushed first; the handler's abort() then finds it gone
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(HEAD_TIMEOUT_S):
                        await asyncio.shield(self.connection_lost_waiter)

    def wake(self) -> None:
        """Shutdown: an idle keep-alive connection closes now."""
        self._wake.set()

    # -- HTTP/1.1 -------------------------------------------------------------------------------

    async def _next_event(self, limit_s: float) -> Any:
        assert self._h11 is not None
        async with asyncio.timeout(limit_s):
            while True:
                event = self._h11.next_event()
                if event is not h11.NEED_DATA:
                    return event
                if self.lost or (self.idle and self.closing()):
                    return h11.ConnectionClosed()
                self._wake.clear()
                await self._wake.wait()

    async def _serve_http(self) -> None:
        conn = self._h11
        assert conn is not None
        first = True
        while not self.lost:
            self.idle = not first
            try:
                event = await self._next_event(HEAD_TIMEOUT_S if first else KEEPALIVE_S)
            except TimeoutError:
                return
            except h11.RemoteProtocolError as exc:
                await self._send_error(exc.error_status_hint, str(exc))
                return
            finally:
                self.idle = False
            first = False
            if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
                return
            if conn.they_are_waiting_for_100_continue:  # curl does for bodies over 1 KiB
                self._write(h11.InformationalResponse(status_code=100, headers=[]))
            try:
                body = await self._read_body()
            except _TooLarge:
                await self._send_error(413, f"request body larger than {MAX_BODY_BYTES} bytes")
                return
            except (h11.RemoteProtocolError, TimeoutError):
                await self._send_error(400, "malformed or incomplete request body")
                return
            if body is None:
                return
            request = HttpRequest(
                event.method.decode("ascii", "replace"),
                event.target.decode("ascii", "replace"),
                [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers],
                body,
            )
            reply = await self.router(request, self)
            if not await self._send(reply, head_only=request.method == "HEAD"):
                return
            if conn.our_state is h11.MUST_CLOSE or self.closing():
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _read_body(self) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(HEAD_TIMEOUT_S)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_BODY_BYTES:
                    raise _TooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            else:
                return None

    def _write(self, event: Any) -> None:
        assert self._h11 is not None
        data = self._h11.send(event)
        if data:
            self.transport.write(data)

    async def _send(self, reply: Reply, *, head_only: bool = False) -> bool:
        """Send ``reply``; False when the client went away (a stream is closed either way)."""
        headers = [(k, v) for k, v in reply.headers if k.lower() != "content-length"]
        if reply.stream is None:
            headers.append(("Content-Length", str(len(reply.body))))
        try:
            self._write(
                h11.Response(
                    status_code=reply.status,
                    headers=headers,
                    reason=HTTPStatus(reply.status).phrase.encode(),
                )
            )
            if reply.stream is None:
                if reply.body and not head_only:
                    self._write(h11.Data(data=reply.body))
            else:
                async for chunk in reply.stream:
                    if self.lost:
                        return False
                    self._write(h11.Data(data=chunk))
                    await self.drain()
            self._write(h11.EndOfMessage())
            await self.drain()
        except (h11.LocalProtocolError, ConnectionError, RuntimeError):
            return False
        finally:
            if reply.stream is not None:
                with contextlib.suppress(Exception):
                    await reply.stream.aclose()  # type: ignore[attr-defined]
            if reply.close is not None:
                try:
                    await reply.close()
                except Exception:
                    log.exception("releasing an HTTP reply failed")
        return not self.lost

    async def _send_error(self, status: int, message: str) -> None:
        assert self._h11 is not None
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        code = {400: "bad_request", 413: "body_too_large", 431: "headers_too_large"}
        error = {
            "message": f"{HTTPStatus(status).phrase}: {message}",
            "type": "invalid_request_error",
            "param": None,
            "code": code.get(status, "bad_request"),
        }
        body = json.dumps({"error": error}).encode()
        with contextlib.suppress(Exception):
            await self._send(
                Reply(status, [("Content-Type", "application/json"), ("Connection", "close")], body)
            )


class _TooLarge(Exception):
    pass


def _is_upgrade(head: bytes) -> bool:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and b"websocket" in value.lower():
            return True
    return False


def connection_factory(
    router: Router, closing: Callable[[], bool], live: set[FrontConnection]
) -> Callable[..., FrontConnection]:
    """The ``create_connection`` argument of ``websockets.asyncio.server.serve``."""

    def create(*args: Any, **kwargs: Any) -> FrontConnection:
        return FrontConnection(router, closing, live, *args, **kwargs)

    return create


# -- forwarding a request to another node (a cluster's HTTP routing) ----------------------------

FORWARDED_HEADER = "X-Agent-Runtime-Forwarded"
"""Set on a request one node forwards to another: it is never forwarded again (no loops)."""
FORWARD_CONNECT_S = 5.0
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
     "proxy-connection", "content-length", "host", "expect"}
)  # fmt: skip


async def forward(request: HttpRequest, base_url: str) -> Reply:
    """Send ``request`` to the node at ``base_url`` and relay its answer as it streams (SSE
    chunks arrive as the owner sends them). Raises ``OSError`` or ``TimeoutError`` when the node
    cannot be reached or does not answer with a response head in time."""
    parts = urlsplit(base_url)
    tls = parts.scheme == "https"
    host, port = parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=True if tls else None), FORWARD_CONNECT_S
    )
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [(k, v) for k, v in request.headers if k not in _HOP_BY_HOP]
        headers += [
            ("host", parts.netloc),
            ("content-length", str(len(request.body))),
            ("connection", "close"),
            (FORWARDED_HEADER.lower(), "1"),
        ]
        writer.write(conn.send(h11.Request(method=request.method, target=request.path,
                                           headers=headers)))  # fmt: skip
        writer.write(conn.send(h11.Data(data=request.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        head = await asyncio.wait_for(_next_event(conn, reader), FORWARD_CONNECT_S * 2)
        while isinstance(head, h11.InformationalResponse):
            head = await asyncio.wait_for(_next_event(conn, reader), FORWARD_CONNECT_S * 2)
        if not isinstance(head, h11.Response):
            raise ConnectionError(f"{base_url} closed the connection without an answer")
    except BaseException:
        writer.close()
        raise
    relayed = [
        (k.decode("latin-1"), v.decode("latin-1"))
        for k, v in head.headers
        if k.decode("latin-1").lower() not in _HOP_BY_HOP
    ]

    async def body() -> AsyncIterator[bytes]:
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def close() -> None:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    return Reply(head.status_code, relayed, stream=body(), close=close)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))
