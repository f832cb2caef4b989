"""The server: wires the session store, the engine, the sessions and the listener on one port.

* ``ws://HOST:PORT/v1/realtime`` — the event protocol (``agent_runtime/protocol.py``,
  ``docs/asyncapi.yaml``), handled by ``server/websocket.py``;
* the HTTP routes (health, readiness, metrics, tickets, the web page): ``server/http.py``;
* with ``--mqtt-url``, the same events over an MQTT broker: ``server/mqtt.py``.

:class:`Server` owns, in start order, the session store, the engine and the websocket listener,
and closes them in reverse order; ``aclose()`` is idempotent and performs a graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Coroutine
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.server import Server as WsServer
from websockets.asyncio.server import serve
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest
from websockets.typing import Subprotocol

from agent_runtime import protocol as p
from agent_runtime.config import RuntimeConfig, ServerConfig, redacted
from agent_runtime.engine import Engine
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.files import DirectoryLock
from agent_runtime.metrics import EngineMetrics, Registry
from agent_runtime.models.base import ChatModel
from agent_runtime.sessions import SessionManager, SessionStore
from privacy.audit import AuditLog
from privacy.crypto import KeyStore
from privacy.tenants import RedisUsedTickets, TenantRegistry, TicketIssuer
from server.auth import Authenticator
from server.front import FrontConnection, HttpRequest, Reply, connection_factory
from server.http import TEXT, WS_PATH, HttpRoutes, response, to_reply
from server.mqtt import MqttBridge
from server.openai_api import OpenAIRoutes, is_api_path
from server.websocket import WebsocketEndpoint, select_subprotocol

__all__ = ["Server"]

log = logging.getLogger(__name__)

STORAGE_PROBE_S = 1.0


class Server:
    """``async with Server(config, model) as server: await server.serve_forever()``"""

    def __init__(self, config: RuntimeConfig, model: ChatModel[Any]) -> None:
        self.config = config
        self.model = model
        self.node_id = config.cluster.node_id or uuid.uuid4().hex[:12]
        self.store = SessionStore(config.store)
        data_dir = Path(config.store.data_dir)
        # Tenants, keys and the audit log live in the data directory; see docs/privacy.md.
        self.keystore = KeyStore(data_dir) if config.privacy.encrypt_at_rest else None
        self.tenants = TenantRegistry(data_dir)
        self.audit = AuditLog(data_dir / "audit.log")
        self.auth = Authenticator(config.server, self.tenants)
        self.registry = Registry()
        self.metrics = EngineMetrics(self.registry)
        self.engine = Engine(
            model,
            max_batch=config.engine.max_batch,
            max_queue=config.engine.max_queue,
            batching=config.engine.batching,
            metrics=self.metrics,
        )
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
            cluster=config.cluster,
        )
        self._background: set[asyncio.Task[Any]] = set()
        self._ws: WsServer | None = None
        self._http_conns: set[FrontConnection] = set()  # connections serving plain HTTP
        self._reaper: asyncio.Task[None] | None = None
        self._storage_watch: asyncio.Task[None] | None = None
        self._lease_keeper: asyncio.Task[None] | None = None
        # One process per data directory; in a cluster the data root is shared, and the lock
        # is per node id (two nodes with one id would take each other's leases).
        self.lock = DirectoryLock(
            data_dir / "nodes" / self.node_id if config.cluster.enabled else data_dir
        )
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
            lambda: len(self.websocket.connections),
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
        self.http = HttpRoutes(
            self.auth, self.audit, r, self._is_ready, lambda: self._closing, model.card
        )
        self.websocket = WebsocketEndpoint(
            config, self.sessions, self.http.tenant_of, self.errors, self.spawn
        )
        self.mqtt: MqttBridge | None = None
        if config.mqtt.enabled:
            self.mqtt = MqttBridge(
                config, self.sessions, self.auth, self.audit, r, self.spawn, self.node_id
            )
        self.openai = OpenAIRoutes(
            config,
            self.sessions,
            self.auth,
            self.audit,
            served_model_id(config, model),
            self.websocket.displace,
            lambda: self._closing,
        )

    @property
    def advertise_url(self) -> str:
        """The base URL other nodes name in redirects and proxy HTTP requests to."""
        url = self.config.cluster.advertise_url.rstrip("/")
        return url or f"http://{self.config.server.host}:{self.port}"

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
        """Start everything, or nothing: a failure stops what already started (no child
        process is left behind) and re-raises."""
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        log.info("effective config: %s", redacted(self.config))
        self.lock.acquire()  # one process per data directory
        await self.store.open()
        secret = (self.keystore or KeyStore(Path(self.config.store.data_dir))).derive_secret(
            "tickets"
        )
        used = RedisUsedTickets(self.store.redis, f"{self.config.store.key_prefix}:ticket")
        self.auth.tickets = TicketIssuer(secret, used, registry=self.tenants)
        self.engine.start()
        cfg = self.config.server
        try:
            self._ws = await self._listen(cfg)
        except OSError as exc:
            raise AgentRuntimeError(
                f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self.auth.port = self.port
        if self.sessions.leases is not None:
            self.sessions.leases.url = self.advertise_url
            self.sessions.leases.internal_url = self.config.cluster.internal_url.rstrip("/")
            self.auth.peers = lambda: self.sessions.peers
            self._lease_keeper = asyncio.create_task(
                self.sessions.keep_leases(), name="lease-keeper"
            )
            log.info("cluster node %s, advertised as %s", self.node_id, self.advertise_url)
        await self._warm_up()
        if self.mqtt is not None:
            await self.mqtt.start()  # connects in the background; /readyz waits for it
        self._reaper = asyncio.create_task(self._reap_idle(), name="idle-session-reaper")
        self._storage_watch = asyncio.create_task(self._watch_storage(), name="storage-watch")
        log.info("serving on ws://%s:%d%s", cfg.host, self.port, WS_PATH)

    async def _listen(self, cfg: ServerConfig) -> WsServer:
        return await serve(
            self.websocket,
            cfg.host,
            cfg.port,
            process_request=self.http,
            select_subprotocol=select_subprotocol,
            subprotocols=[Subprotocol(s) for s in p.SUBPROTOCOLS],
            # Frames up to 4x the limit are read and answered with an error event; larger ones
            # close the connection (1009) before they are buffered.
            max_size=4 * cfg.max_frame_bytes,
            compression=None,  # token deltas are tiny; deflate would cost more than it saves
            # plain HTTP (the OpenAI API, SSE) is served by server/front.py on the same port;
            # it applies the handshake timeout itself (a stream may outlive any open timeout)
            create_connection=connection_factory(  # type: ignore[arg-type]  # a factory is allowed
                self._route_http, lambda: self._closing, self._http_conns
            ),
            open_timeout=None,
        )

    async def _route_http(self, request: HttpRequest, conn: FrontConnection) -> Reply:
        if is_api_path(request.path):
            return await self.openai(request, conn)
        if request.method not in ("GET", "HEAD"):
            return to_reply(
                response(HTTPStatus.METHOD_NOT_ALLOWED, "method not allowed\n", TEXT),
                [("Allow", "GET, HEAD")],
            )
        ws_request = WsRequest(request.path, Headers(request.headers))
        answer = await self.http(conn, ws_request)
        assert answer is not None  # not an upgrade: always answered
        return to_reply(answer)

    async def _warm_up(self) -> None:
        """Produce one token with a throwaway state, so /readyz means the model really answers."""

        def run() -> None:
            self.model.prefill(self.model.new_state(), [0], None)

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

    async def _watch_storage(self) -> None:
        """While the data directory refuses writes, probe it every second until it takes
        them again (then /readyz is ready again and new sessions are admitted)."""
        health = self.sessions.storage
        while True:
            await asyncio.sleep(STORAGE_PROBE_S)
            if not health.healthy:
                await asyncio.to_thread(health.probe)

    async def serve_forever(self) -> None:
        assert self._ws is not None
        await self._ws.serve_forever()

    async def aclose(self) -> None:
        """Graceful shutdown: stop accepting, tell clients, drain, snapshot banks, close with 1001."""
        if self._closing:
            return
        self._closing = True
        self.ready = False
        for task in (self._reaper, self._storage_watch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._ws is not None:
            self._ws.close(close_connections=False)  # stop accepting new connections
            for front in list(self._http_conns):
                front.wake()  # idle keep-alive HTTP connections close now
        self.websocket.closing = True  # and new work on open ones: nothing outlives the snapshot
        if self.mqtt is not None:
            self.mqtt.closing = True
        for session in list(self.sessions.sessions.values()):
            if session.sender is not None:  # tell attached clients; a detached one misses nothing
                with contextlib.suppress(Exception):
                    await session.emit(p.server_going_away("shutdown"))
        tasks = [
            s.response_task
            for s in self.sessions.sessions.values()
            if s.response_task and s.responding
        ]
        if tasks:
            _done, pending = await asyncio.wait(
                tasks, timeout=self.config.server.shutdown_timeout_s
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for conn in list(self.websocket.connections):
            await conn.close(1001, "server shutting down")
        if self.mqtt is not None:
            await self.mqtt.aclose()  # flushes what it can, clears this node's presence
        with contextlib.suppress(Exception):
            await self.sessions.aclose()  # snapshots, and releases each lease: a handoff
        if self._lease_keeper is not None:  # renewed until every session was handed off
            self._lease_keeper.cancel()
            await asyncio.gather(self._lease_keeper, return_exceptions=True)
        if self._ws is not None:
            await self._ws.wait_closed()
        await self.engine.aclose()
        await self.store.aclose()
        await asyncio.to_thread(self.audit.close)  # every posted record is on disk
        self.lock.release()

    async def _is_ready(self) -> bool:
        if self.mqtt is not None and not self.mqtt.connected:
            return False  # a configured bridge that lost its broker is not ready
        return self.ready and self.sessions.storage.healthy and await self.store.ping()


def served_model_id(config: RuntimeConfig, served: ChatModel[Any]) -> str:
    """The ``model`` the OpenAI API serves: ``agent-runtime-bundled`` for a byte model, else
    the pretrained model's name (a registry name; a file's or directory's name)."""
    model = config.engine.pretrained()
    if served.family == "byte" or not model:
        return "agent-runtime-bundled"
    return Path(model).name if ("/" in model or model.endswith(".gguf")) else model
