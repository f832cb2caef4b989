"""The HTTP routes on the websocket port: health, readiness, metrics, tickets, the web page.

* ``GET /livez`` (process up), ``GET /readyz`` (the model has produced a token and Redis
  answers), ``GET /metrics`` (Prometheus text), ``GET /`` (the chat web page),
  ``GET /v1/auth`` (does the page need an API key), ``GET /v1/tickets`` (a single-use ticket
  for a browser's websocket URL).
* A websocket upgrade is checked here too (path, shutdown, Origin, tenant) before the
  handshake completes, so a refused client never reaches the event protocol.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent_runtime.errors import AuthenticationError
from agent_runtime.metrics import Registry
from privacy.audit import AuditLog
from server.auth import Authenticator

__all__ = ["STATIC", "WS_PATH", "HttpRoutes", "response"]

WS_PATH = "/v1/realtime"
STATIC = Path(__file__).parent / "static"
TICKET_TTL_S = 30.0


class HttpRoutes:
    """``process_request`` for the websocket server: answers HTTP, vets upgrades."""

    def __init__(
        self,
        auth: Authenticator,
        audit: AuditLog,
        registry: Registry,
        ready: Callable[[], Awaitable[bool]],
        closing: Callable[[], bool],
    ) -> None:
        self.auth = auth
        self.audit = audit
        self.registry = registry
        self.ready = ready
        self.closing = closing
        self.tenant_of: dict[ServerConnection, str] = {}  # vetted upgrades, read by the handler

    async def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._upgrade(conn, request, path)
        if path == "/v1/tickets":
            return await self._ticket(conn, request)
        if path == "/v1/auth":  # lets the web page know whether to ask for an API key
            return response(200, json.dumps({"required": self.auth.required()}), "application/json")
        if path == "/livez":
            return conn.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            if await self.ready():
                return conn.respond(HTTPStatus.OK, "ready\n")
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
        if path == "/metrics":
            return response(200, self.registry.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/", "/index.html"):
            page = STATIC / "index.html"
            if page.exists():
                return response(200, page.read_text(encoding="utf-8"), "text/html; charset=utf-8")
        return conn.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _upgrade(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        if path != WS_PATH:
            return conn.respond(HTTPStatus.NOT_FOUND, f"websocket endpoint is {WS_PATH}\n")
        if self.closing():
            return conn.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n")
        if not self.auth.origin_allowed(request):
            self.audit.post("-", "denied", None, code="origin_not_allowed")
            return conn.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        try:
            self.tenant_of[conn] = await self.auth.tenant_of(request)
        except AuthenticationError as exc:
            self.audit.post("-", "denied", None, code=exc.code)
            return conn.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
        return None

    async def _ticket(self, conn: ServerConnection, request: Request) -> Response:
        """``GET /v1/tickets`` with ``Authorization: Bearer <api key>``: a single-use ticket for a
        browser's websocket URL, so that no long-lived key ever appears in a URL."""
        if not request.headers.get("Authorization"):
            return conn.respond(
                HTTPStatus.UNAUTHORIZED, "Authorization: Bearer <api key> required\n"
            )
        try:
            tenant = await self.auth.tenant_of(request)
        except AuthenticationError as exc:
            self.audit.post("-", "denied", None, code=exc.code)
            return conn.respond(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n")
        assert self.auth.tickets is not None
        ticket = self.auth.tickets.issue_ticket(tenant, TICKET_TTL_S)
        body = json.dumps({"ticket": ticket, "expires_in_s": TICKET_TTL_S})
        return response(200, body, "application/json")


def response(status: int, body: str, content_type: str) -> Response:
    data = body.encode("utf-8")
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, data)
