"""Who is connecting: tenant authentication (API keys, single-use tickets) and the Origin check."""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

from websockets.http11 import Request

from agent_runtime.config import ServerConfig, is_loopback
from agent_runtime.errors import AuthenticationError
from privacy.tenants import ANONYMOUS_TENANT, TenantRegistry, TicketIssuer

__all__ = ["Authenticator"]


class Authenticator:
    """Resolves the tenant of a request; the tickets issuer is attached once Redis is open."""

    def __init__(self, config: ServerConfig, tenants: TenantRegistry) -> None:
        self.config = config
        self.tenants = tenants
        self.tickets: TicketIssuer | None = None
        self.port = config.port  # the bound port, set by the server once it listens
        self.peers: Callable[[], set[str]] | None = None  # the cluster's node URLs, if any

    def required(self) -> bool:
        """``required``; ``none``; or ``auto``: required once any tenant has ever been added.

        Revoking every key never turns authentication off again, so sessions made before the
        first tenant (the anonymous tenant's) are unreachable from then on.
        """
        mode = self.config.auth
        return mode == "required" or (mode == "auto" and bool(self.tenants.list()))

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
        return ANONYMOUS_TENANT

    def origin_allowed(self, request: Request) -> bool:
        """Browsers send Origin: allow the server's own origins and the configured ones.

        The server's own origins come from its bind address and port (on loopback also
        ``localhost``, ``127.0.0.1`` and ``[::1]``), never from the request's Host header,
        which a DNS-rebinding page controls.
        """
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser
        allowed = self.own_origins() | self.configured_origins() | self.peer_origins()
        return origin.rstrip("/") in allowed

    def peer_origins(self) -> set[str]:
        """In a cluster, the origins of the other nodes (a page served by one node may follow
        a redirect to another): their advertised base URLs, as announced in Redis."""
        return {u.rstrip("/") for u in self.peers()} if self.peers is not None else set()

    def configured_origins(self) -> set[str]:
        return {o.strip().rstrip("/") for o in self.config.allowed_origins.split(",") if o.strip()}

    def own_origins(self) -> set[str]:
        host = self.config.host
        hosts = {f"[{host}]" if ":" in host else host}
        if is_loopback(host):
            hosts |= {"localhost", "127.0.0.1", "[::1]"}
        return {f"{scheme}://{h}:{self.port}" for h in hosts for scheme in ("http", "https")}
