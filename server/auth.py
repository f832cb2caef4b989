"""Who is connecting: tenant authentication (API keys, single-use tickets) and the Origin check."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from websockets.http11 import Request

from agent_runtime.config import ServerConfig
from agent_runtime.errors import AuthenticationError
from privacy.tenants import TenantRegistry, TicketIssuer

__all__ = ["DEFAULT_TENANT", "Authenticator"]

DEFAULT_TENANT = "default"


class Authenticator:
    """Resolves the tenant of a request; the tickets issuer is attached once Redis is open."""

    def __init__(self, config: ServerConfig, tenants: TenantRegistry) -> None:
        self.config = config
        self.tenants = tenants
        self.tickets: TicketIssuer | None = None

    def required(self) -> bool:
        mode = self.config.auth
        return mode == "required" or (mode == "auto" and any(t.active for t in self.tenants.list()))

    async def tenant_of(self, request: Request) -> str:
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
        if self.required():
            raise AuthenticationError(
                "authentication required: send 'Authorization: Bearer <api key>'"
            )
        return DEFAULT_TENANT

    def origin_allowed(self, request: Request) -> bool:
        """Browsers send Origin: allow the page's own origin and the configured ones."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser
        host = request.headers.get("Host", "")
        allowed = {o.strip() for o in self.config.allowed_origins.split(",") if o.strip()}
        return urlsplit(origin).netloc == host or origin in allowed
