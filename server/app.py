"""The websocket server and its HTTP routes, on one port.

* ``ws://HOST:PORT/v1/realtime`` — the event protocol (see ``server/protocol.py`` and
  ``docs/asyncapi.yaml``), subprotocol ``agent-runtime.v1.json`` or ``agent-runtime.v1.msgpack``.
* ``GET /livez`` (process up), ``GET /readyz`` (the model has produced a token and Redis
  answers), ``GET /metrics`` (Prometheus text), ``GET /`` (the chat web page).

:class:`Server` owns, in start order, the session store, the engine and the websocket listener,
and closes them in reverse order; ``aclose()`` is idempotent and performs a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from agent_runtime.config import RuntimeConfig, redacted
from agent_runtime.engine import Engine
from agent_runtime.errors import (
    AuthenticationError,
    ConflictError,
    ProtocolError,
    RequestError,
    StoreError,
)
from agent_runtime.generation import GenerationState, SamplingParams, prefill
from agent_runtime.metrics import EngineMetrics, Registry
from agent_runtime.model import MemorizingTransformer
from agent_runtime.sessions import Session, SessionManager
from agent_runtime.store import SessionStore
from privacy.audit import AuditLog
from privacy.crypto import KeyStore
from privacy.tenants import RedisUsedTickets, TenantRegistry, TicketIssuer
from server import protocol as p

__all__ = ["Server"]

log = logging.getLogger(__name__)

WS_PATH = "/v1/realtime"
STATIC = Path(__file__).parent / "static"
DEFAULT_TENANT = "default"


class Server:
    """``async with Server(config, model) as server: await server.serve_forever()``"""

    def __init__(self, config: RuntimeConfig, model: MemorizingTransformer) -> None:
        self.config = config
        self.model = model
        self.node_id = uuid.uuid4().hex[:12]
        self.store = SessionStore(config.store)
        data_dir = Path(config.store.data_dir)
        # Tenants, keys and the audit log live in the data directory; see docs/privacy.md.
        self.keystore = KeyStore(data_dir) if config.privacy.encrypt_at_rest else None
        self.tenants = TenantRegistry(data_dir)
        self.audit = AuditLog(data_dir / "audit.log")
        self.tickets: TicketIssuer | None = None
        self.registry = Registry()
        self.metrics = EngineMetrics(self.registry)
        self.engine = Engine(
            model,
            max_batch=config.engine.max_batch,
            max_queue=config.engine.max_queue,
            metrics=self.metrics,
        )
        self.engine.batching = config.engine.batching
        self.sessions = SessionManager(
            self.engine,
            self.store,
            Path(config.store.data_dir),
            config.memory,
            config.server,
            privacy=config.privacy,
            keystore=self.keystore,
            audit=self.audit,
            node_id=self.node_id,
            metrics=self.metrics,
        )
        self._tenant_of: dict[ServerConnection, str] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: WsServer | None = None
        self._connections: set[ServerConnection] = set()
        self._reaper: asyncio.Task[None] | None = None
        self.ready = False
        self.started_at = time.time()
        self._closing = False
        r = self.registry
        r.gauge(
            "agent_runtime_sessions_active",
            "Live sessions on this node.",
            lambda: len(self.sessions.sessions),
        )
        r.gauge(
            "agent_runtime_connections",
            "Open websocket connections.",
            lambda: len(self._connections),
        )
        r.gauge(
            "agent_runtime_responses_running",
            "Responses in the running batch.",
            lambda: self.engine.load()[0],
        )
        r.gauge(
            "agent_runtime_responses_waiting",
            "Responses waiting for a batch slot.",
            lambda: self.engine.load()[1],
        )
        r.gauge(
            "agent_runtime_ready",
            "1 once the model has produced a token.",
            lambda: float(self.ready),
        )
        self.errors = r.counter(
            "agent_runtime_client_errors_total", "Error events sent to clients."
        )

    @property
    def port(self) -> int:
        assert self._ws is not None, "server not started"
        return int(self._ws.sockets[0].getsockname()[1])

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        log.info("effective config: %s", redacted(self.config))
        await self.store.open()
        secret = (self.keystore or KeyStore(Path(self.config.store.data_dir))).derive_secret(
            "tickets"
        )
        used = RedisUsedTickets(self.store.redis, f"{self.config.store.key_prefix}:ticket")
        self.tickets = TicketIssuer(secret, used, registry=self.tenants)
        self.engine.start()
        cfg = self.config.server
        self._ws = await serve(
            self._handle,
            cfg.host,
            cfg.port,
            process_request=self._process_request,
            select_subprotocol=_select_subprotocol,
            subprotocols=[Subprotocol(s) for s in p.SUBPROTOCOLS],
            # Frames up to 4x the limit are read and answered with an error event; larger ones
            # close the connection (1009) before they are buffered.
            max_size=4 * cfg.max_frame_bytes,
            compression=None,  # token deltas are tiny; deflate would cost more than it saves
        )
        await self._warm_up()
        self._reaper = asyncio.create_task(self._reap_idle(), name="idle-session-reaper")
        log.info("serving on ws://%s:%d%s", cfg.host, self.port, WS_PATH)

    async def _warm_up(self) -> None:
        """Produce one token with a throwaway state, so /readyz means the model really answers."""

        def run() -> None:
            prefill(self.model, GenerationState.new(self.model), [0], None)

        await self.engine.call(run)
        self.ready = True

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a small background job owned by the server (kept referenced until done)."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reap_idle(self) -> None:
        period = min(30.0, max(0.5, self.config.server.idle_unload_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                await self.sessions.unload_idle()
            except Exception:  # keep reaping; the failure is logged with its session
                log.exception("unloading idle sessions failed")

    async def serve_forever(self) -> None:
        assert self._ws is not None
        await self._ws.serve_forever()

    async def aclose(self) -> None:
        """Graceful shutdown: stop accepting, tell clients, drain, snapshot banks, close with 1001."""
        if self._closing:
            return
        self._closing = True
        self.ready = False
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        if self._ws is not None:
            self._ws.close(close_connections=False)  # stop accepting new connections
        for session in list(self.sessions.sessions.values()):
            with contextlib.suppress(Exception):
                await session.emit({"type": "server.going_away", "reason": "shutdown"})
        tasks = [
            s.response_task
            for s in self.sessions.sessions.values()
            if s.response_task and not s.response_task.done()
        ]
        if tasks:
            _done, pending = await asyncio.wait(
                tasks, timeout=self.config.server.shutdown_timeout_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.sessions.aclose()
        for conn in list(self._connections):
            await conn.close(1001, "server shutting down")
        if self._ws is not None:
            await self._ws.wait_closed()
        await self.engine.aclose()
        await self.store.aclose()

    # -- HTTP -----------------------------------------------------------------------------------

    def auth_required(self) -> bool:
        mode = self.config.server.auth
        return mode == "required" or (mode == "auto" and any(t.active for t in self.tenants.list()))

    async def _authenticate(self, request: Request) -> str:
        """The tenant of a handshake: ``Authorization: Bearer <api key>`` for services, a
        single-use ``?ticket=`` for browsers, or the default tenant when auth is off."""
        header = request.headers.get("Authorization", "")
        query = parse_qs(urlsplit(request.path).query)
        if header:
            scheme, _, key = header.partition(" ")
            if scheme.lower() != "bearer" or not key:
                raise AuthenticationError("Authorization must be 'Bearer <api key>'")
            return self.tenants.authenticate(key.strip())
        if "ticket" in query:
            assert self.tickets is not None
            return await self.tickets.redeem_ticket(query["ticket"][0])
        if self.auth_required():
            raise AuthenticationError(
                "authentication required: send 'Authorization: Bearer <api key>'"
            )
        return DEFAULT_TENANT

    def _origin_allowed(self, request: Request) -> bool:
        """Browsers send Origin: allow the page's own origin and the configured ones."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser
        host = request.headers.get("Host", "")
        allowed = {o.strip() for o in self.config.server.allowed_origins.split(",") if o.strip()}
        return urlsplit(origin).netloc == host or origin in allowed

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            if path != WS_PATH:
                return conn.respond(HTTPStatus.NOT_FOUND, f"websocket endpoint is {WS_PATH}\n")
            if self._closing:
                return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
            if not self._origin_allowed(request):
                self.audit.append("-", "denied", None, code="origin_not_allowed")
                return conn.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
            try:
                self._tenant_of[conn] = await self._authenticate(request)
            except AuthenticationError as exc:
                self.audit.append("-", "denied", None, code=exc.code)
                return conn.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
            return None
        if path == "/v1/tickets":
            return await self._ticket(conn, request)
        if path == "/v1/auth":  # lets the web page know whether to ask for an API key
            body = json.dumps({"required": self.auth_required()})
            return _response(200, body, "application/json")
        if path == "/livez":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if self.ready and await self.store.ping():
                return conn.respond(HTTPStatus.OK, "ready\n")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path == "/metrics":
            return _response(200, self.metrics_text(), "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/", "/index.html"):
            page = STATIC / "index.html"
            if page.exists():
                return _response(200, page.read_text(encoding="utf-8"), "text/html; charset=utf-8")
        return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _ticket(self, conn: ServerConnection, request: Request) -> Response:
        """``GET /v1/tickets`` with ``Authorization: Bearer <api key>``: a single-use ticket for a
        browser's websocket URL, so that no long-lived key ever appears in a URL."""
        if not request.headers.get("Authorization"):
            return conn.respond(
                HTTPStatus.UNAUTHORIZED, "Authorization: Bearer <api key> required\n"
            )
        try:
            tenant = await self._authenticate(request)
        except AuthenticationError as exc:
            self.audit.append("-", "denied", None, code=exc.code)
            return conn.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
        assert self.tickets is not None
        ttl = 30.0
        body = json.dumps({"ticket": self.tickets.issue_ticket(tenant, ttl), "expires_in_s": ttl})
        return _response(200, body, "application/json")

    def metrics_text(self) -> str:
        return self.registry.render()

    # -- websocket ------------------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        codec = p.CODECS[ws.subprotocol or p.JSON_SUBPROTOCOL]
        conn = Connection(self, ws, codec, tenant=self._tenant_of.pop(ws))
        self._connections.add(ws)
        try:
            async for frame in ws:
                await conn.on_frame(frame)
        except ConnectionClosed:
            pass
        finally:
            self._connections.discard(ws)
            conn.on_close()


class Connection:
    """One websocket client: decodes frames, dispatches events, sends its session's events."""

    def __init__(self, server: Server, ws: ServerConnection, codec: p.Codec, tenant: str) -> None:
        self.server = server
        self.ws = ws
        self.codec = codec
        self.tenant = tenant
        self.session: Session | None = None

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(self.codec.encode(event))

    async def on_frame(self, frame: str | bytes) -> None:
        limits = self.server.config.server
        event_id: str | None = None
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
            await self.dispatch(event)
        except RequestError as exc:
            self.server.errors.inc()
            await self.send_error(exc, event_id)
        except StoreError as exc:
            log.error("session store error: %s", exc)
            await self.send_error(exc, event_id)

    async def send_error(self, exc: Exception, event_id: str | None) -> None:
        body = p.error_event(exc, event_id=event_id)
        if self.session is not None:
            await self.session.emit(body)
        else:
            await self.send({"event_id": p.new_id("evt"), "seq": 0, **body})

    def require_session(self, event: p.ClientEvent) -> Session:
        if self.session is None or self.session.closed:
            raise ConflictError(
                "no session: send session.create or session.resume first",
                code="no_session",
                event_id=event.event_id,
            )
        return self.session

    async def dispatch(self, event: p.ClientEvent) -> None:
        mgr = self.server.sessions
        if isinstance(event, p.SessionCreate | p.SessionResume):
            if self.session is not None:
                raise ConflictError(
                    "this connection already has a session",
                    code="session_exists",
                    event_id=event.event_id,
                )
            if isinstance(event, p.SessionCreate):
                session = await mgr.create(self.tenant, p.new_id("sess"), event.instructions)
                self.attach(session)
                await session.emit(
                    {"type": "session.created", "session": self.session_body(session)}
                )
            else:
                try:
                    session = await mgr.get(self.tenant, event.session_id)
                except RequestError as exc:
                    exc.event_id = event.event_id
                    raise
                missed = session.missed_events(event.last_seq)
                await self.send(
                    {
                        "event_id": p.new_id("evt"),
                        "seq": session.seq,
                        "type": "session.resumed",
                        "session": self.session_body(session),
                        "replayed": len(missed or []),
                        "events_lost": missed is None,
                    }
                )
                # Replay in seq order, including events emitted while replaying; attach with no
                # await after the last check, so live events can never overtake replayed ones.
                last = event.last_seq
                while missed:
                    for e in missed:
                        await self.send(e)
                        last = e["seq"]
                    missed = session.missed_events(last)
                self.attach(session)
            return
        if isinstance(event, p.Ping) and self.session is None:
            await self.send(
                {"event_id": p.new_id("evt"), "seq": 0, "type": "pong", "data": event.data}
            )
            return
        session = self.require_session(event)
        if isinstance(event, p.ItemCreate):
            from agent_runtime.tokenizer import encode_turn

            session.pending += encode_turn(event.role, event.text)
            await session.emit(
                {
                    "type": "conversation.item.created",
                    "item": {"id": p.new_id("item"), "type": "message", "role": event.role},
                }
            )
        elif isinstance(event, p.ResponseCreate):
            gen = self.server.config.generation
            params = SamplingParams(
                max_tokens=event.max_tokens or gen.max_tokens,
                min_tokens=event.min_tokens,
                temperature=gen.temperature if event.temperature is None else event.temperature,
                top_p=gen.top_p if event.top_p is None else event.top_p,
                stop=event.stop,
                seed=event.seed,
            )
            try:
                await mgr.start_response(session, p.new_id("resp"), params, event.commit_on_cancel)
            except RequestError as exc:
                exc.event_id = event.event_id
                raise
        elif isinstance(event, p.ResponseCancel):
            if session.response_id is None or (
                event.response_id and event.response_id != session.response_id
            ):
                raise ConflictError(
                    "no such active response", code="no_active_response", event_id=event.event_id
                )
            mgr.cancel(session)
        elif isinstance(event, p.SessionDelete):
            await mgr.delete(session)
            self.session = None
            await self.send(
                {
                    "event_id": p.new_id("evt"),
                    "seq": session.seq + 1,
                    "type": "session.deleted",
                    "session_id": session.session_id,
                }
            )
        elif isinstance(event, p.MemoryStats):
            stats = await self.server.engine.call(session.bank.stats)
            await session.emit(
                {
                    "type": "memory.stats",
                    "memory": _stats_dict(stats),
                    "position": session.state.position,
                }
            )
        elif isinstance(event, p.Ping):
            await session.emit({"type": "pong", "data": event.data})

    def attach(self, session: Session) -> None:
        """Make this connection the session's only client; a previous one is closed (4000)."""
        previous = session.client
        self.session = session
        session.attach(self.send, self)
        if isinstance(previous, Connection) and previous is not self:
            previous.session = None
            self.server.spawn(previous.ws.close(4000, "session resumed on another connection"))

    def session_body(self, session: Session) -> dict[str, Any]:
        return {
            "id": session.session_id,
            "created_at": session.meta.created_at,
            "turns": session.meta.turns,
            "memory_entries": len(session.bank),
            "position": session.state.position,
        }

    def on_close(self) -> None:
        if self.session is not None and self.session.client is self:
            self.session.detach(self.send)
            self.server.sessions.detached(self.session)


def _stats_dict(stats: object) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(stats) if is_dataclass(stats) and not isinstance(stats, type) else {}


def _select_subprotocol(
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


def _response(status: int, body: str, content_type: str) -> Response:
    data = body.encode("utf-8")
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, data)
