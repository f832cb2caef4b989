"""The HTTP routes on the websocket port: health, readiness, metrics, tickets, the web page.

* ``GET /livez`` (process up), ``GET /readyz`` (the model has produced a token and Redis
  answers), ``GET /metrics`` (Prometheus text), ``GET /`` (the chat web page),
  ``GET /v1/auth`` (does the page need an API key), ``GET /v1/tickets`` (a single-use ticket
  for a browser's websocket URL).
* A websocket upgrade is checked here too (path, shutdown, Origin, tenant) before the
  handshake completes, so a refused client never reaches the event protocol.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from html import escape as html_escape
from http import HTTPStatus
from pathlib import Path

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from agent_runtime.errors import AuthenticationError
from agent_runtime.metrics import Registry
from privacy.audit import AuditLog
from server.auth import Authenticator
from server.front import Reply

__all__ = ["STATIC", "TEXT", "WS_PATH", "HttpRoutes", "response", "to_reply"]

WS_PATH = "/v1/realtime"
STATIC = Path(__file__).parent / "static"
TICKET_TTL_S = 30.0
TEXT = "text/plain; charset=utf-8"


class HttpRoutes:
    """``process_request`` for the websocket server: answers HTTP, vets upgrades."""

    def __init__(
        self,
        auth: Authenticator,
        audit: AuditLog,
        registry: Registry,
        ready: Callable[[], Awaitable[bool]],
        closing: Callable[[], bool],
        about: str = "",
    ) -> None:
        self.auth = auth
        self.audit = audit
        self.registry = registry
        self.ready = ready
        self.closing = closing
        self.tenant_of: dict[ServerConnection, str] = {}  # vetted upgrades, read by the handler
        index = STATIC / "index.html"
        html = index.read_text(encoding="utf-8") if index.exists() else None
        if html is not None and about:  # the served model's card, in one paragraph
            start, end = html.find('<p id="about">'), html.find("</p>", html.find('<p id="about">'))
            if start >= 0 and end > start:
                paragraph = f'<p id="about">{html_escape(about)}'
                html = html[:start] + paragraph + html[end:]
        self.page = (html, page_csp(html)) if html is not None else None

    async def __call__(self, conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._upgrade(conn, request, path)
        if path == "/v1/tickets":
            return await self._ticket(conn, request)
        if path == "/v1/auth":  # lets the web page know whether to ask for an API key
            return response(200, json.dumps({"required": self.auth.required()}), "application/json")
        if path == "/livez":
            return response(HTTPStatus.OK, "ok\n", TEXT)
        if path == "/readyz":
            if await self.ready():
                return response(HTTPStatus.OK, "ready\n", TEXT)
            return response(HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n", TEXT)
        if path == "/metrics":
            return response(200, self.registry.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path in ("/", "/index.html") and self.page is not None:
            html, csp = self.page
            peers = sorted(self.auth.peer_origins())
            if peers:  # in a cluster the page may follow its session to another node
                ws = [re.sub(r"^http", "ws", origin) for origin in peers]
                csp = csp.replace("connect-src 'self'", "connect-src 'self' " + " ".join(ws))
            return response(
                200, html, "text/html; charset=utf-8", [("Content-Security-Policy", csp)]
            )
        return response(404, "not found\n", "text/plain; charset=utf-8")

    async def _upgrade(
        self, conn: ServerConnection, request: Request, path: str
    ) -> Response | None:
        if path != WS_PATH:
            return response(HTTPStatus.NOT_FOUND, f"websocket endpoint is {WS_PATH}\n", TEXT)
        if self.closing():
            return response(HTTPStatus.SERVICE_UNAVAILABLE, "server is shutting down\n", TEXT)
        if not self.auth.origin_allowed(request):
            self.audit.post("-", "denied", None, code="origin_not_allowed")
            return response(HTTPStatus.FORBIDDEN, "origin not allowed\n", TEXT)
        try:
            self.tenant_of[conn] = await self.auth.tenant_of(request)
        except AuthenticationError as exc:
            self.audit.post("-", "denied", None, code=exc.code)
            return response(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n", TEXT)
        return None

    async def _ticket(self, conn: ServerConnection, request: Request) -> Response:
        """``GET /v1/tickets`` with ``Authorization: Bearer <api key>``: a single-use ticket for a
        browser's websocket URL, so that no long-lived key ever appears in a URL."""
        if not request.headers.get("Authorization"):
            return response(
                HTTPStatus.UNAUTHORIZED, "Authorization: Bearer <api key> required\n", TEXT
            )
        try:
            tenant = await self.auth.tenant_of(request)
        except AuthenticationError as exc:
            self.audit.post("-", "denied", None, code=exc.code)
            return response(HTTPStatus.UNAUTHORIZED, f"{exc.message}\n", TEXT)
        assert self.auth.tickets is not None
        ticket = self.auth.tickets.issue_ticket(tenant, TICKET_TTL_S)
        body = json.dumps({"ticket": ticket, "expires_in_s": TICKET_TTL_S})
        return response(200, body, "application/json")


SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
]


def response(
    status: int, body: str, content_type: str, extra: list[tuple[str, str]] | None = None
) -> Response:
    data = body.encode("utf-8")
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
            *SECURITY_HEADERS,
            *(extra or []),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, data)


def page_csp(html: str) -> str:
    """A Content-Security-Policy for the page: its own inline script and style (by hash), and
    connections to its own origin only; no frames, forms, plugins or other sources."""

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        digests = [base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() for b in found]
        return " ".join(f"'sha256-{d}'" for d in digests) or "'none'"

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')};"
        " connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none';"
        " frame-ancestors 'none'"
    )


def to_reply(answer: Response, extra: list[tuple[str, str]] | None = None) -> Reply:
    """A websockets ``Response`` as the front's :class:`Reply` (served by h11)."""
    headers = [(k, v) for k, v in answer.headers.raw_items() if k.lower() != "content-length"]
    return Reply(answer.status_code, [*headers, *(extra or [])], bytes(answer.body or b""))
