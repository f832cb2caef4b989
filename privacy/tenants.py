"""Tenants and their credentials: API keys (stored hashed) and short-lived browser tickets.

API key format: ``ar_<key id: 12 hex>_<secret: 43 url-safe chars, 256 bits>``. The key id is
public (it names the key in ``list`` and ``revoke``); only ``sha256(salt || secret)`` is
stored, in ``<data_dir>/tenants.json`` (0600, atomic writes, cross-process lock).

Browser tickets let the web page open a websocket without putting the API key in a URL:
``issue_ticket`` (after API-key authentication) returns an HMAC-signed, single-use ticket
valid ``ttl_s`` seconds; ``redeem_ticket`` checks signature, expiry and first use. "First use"
is claimed through the tiny :class:`UsedTickets` interface: in memory for one node, or
:class:`RedisUsedTickets` (``SET NX PX``) when several nodes share one Redis.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent_runtime.errors import AuthenticationError, PrivacyError
from agent_runtime.files import atomic_write, ensure_private_dir, locked

__all__ = [
    "ANONYMOUS_TENANT",
    "ApiKeyInfo",
    "MemoryUsedTickets",
    "RedisUsedTickets",
    "TenantInfo",
    "TenantRegistry",
    "TicketIssuer",
    "UsedTickets",
]

REGISTRY_VERSION = 1
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
ANONYMOUS_TENANT = "default"
"""The tenant of unauthenticated sessions (auth off); no registered tenant may take this name."""
_KEY = re.compile(r"ar_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_INVALID = "invalid API key"  # one message for every failure: no oracle for which part was wrong


def _hash_secret(salt: bytes, secret: str) -> bytes:
    # SHA-256 rather than a slow KDF is deliberate: the secret has 256 bits from `secrets`, so
    # it cannot be guessed however fast the hash; scrypt would only add per-request latency (and
    # a denial-of-service lever). The per-key salt keeps equal inputs from having equal hashes.
    return hashlib.sha256(salt + secret.encode()).digest()


@dataclass(frozen=True)
class ApiKeyInfo:
    key_id: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class TenantInfo:
    name: str
    created_at: float
    keys: tuple[ApiKeyInfo, ...]

    @property
    def active(self) -> bool:
        """Whether the tenant has at least one unrevoked key."""
        return any(k.revoked_at is None for k in self.keys)


class TenantRegistry:
    """The tenants of one data directory. Reads see changes made by other processes (the CLI).

    Callers may rely on: :meth:`authenticate` compares hashes with ``hmac.compare_digest`` and
    raises the same AuthenticationError for every failure; a revoked key never authenticates
    again; API keys are returned once by :meth:`add` and never stored.
    """

    def __init__(self, data_dir: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.dir = ensure_private_dir(Path(data_dir))
        self.path = self.dir / "tenants.json"
        self._lock = self.dir / ".tenants.lock"
        self._clock = clock
        self._doc: dict[str, Any] = {"format_version": REGISTRY_VERSION, "tenants": {}}
        self._stamp: tuple[int, int, int] | None = None
        self._refresh()

    # -- file ----------------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Re-read the file if it changed since the last read (one stat per call)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._doc, self._stamp = {"format_version": REGISTRY_VERSION, "tenants": {}}, None
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            doc = json.loads(self.path.read_bytes())
            if doc["format_version"] != REGISTRY_VERSION or not isinstance(doc["tenants"], dict):
                raise ValueError(f"format version {doc['format_version']}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyError(f"{self.path.name}: unreadable tenant registry: {exc}") from exc
        self._doc, self._stamp = doc, stamp

    def _write(self) -> None:
        atomic_write(self.path, (json.dumps(self._doc, indent=1, sort_keys=True) + "\n").encode())
        self._stamp = None  # re-read our own write next time: cheap, and keeps the stamp honest

    # -- administration ------------------------------------------------------------------------

    def add(self, tenant: str) -> str:
        """Create ``tenant`` (or give an existing tenant another key); returns the new API key.

        The key is shown to the caller once; only its salted hash is stored.
        """
        if not _TENANT.fullmatch(tenant):
            raise PrivacyError(
                "tenant name must be 1-64 characters of [A-Za-z0-9._@-], starting alphanumeric"
            )
        if tenant == ANONYMOUS_TENANT:
            raise PrivacyError(
                f"tenant name {ANONYMOUS_TENANT!r} is reserved for sessions made without"
                " authentication; choose another name"
            )
        key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with locked(self._lock):
            self._refresh()
            now = self._clock()
            entry = self._doc["tenants"].setdefault(tenant, {"created_at": now, "keys": []})
            entry["keys"].append(
                {
                    "key_id": key_id,
                    "salt": salt.hex(),
                    "sha256": _hash_secret(salt, secret).hex(),
                    "created_at": now,
                    "revoked_at": None,
                }
            )
            self._write()
        return f"ar_{key_id}_{secret}"

    def list(self) -> builtins.list[TenantInfo]:
        """Every tenant with its key ids (never hashes), sorted by name."""
        self._refresh()
        return [
            TenantInfo(
                name,
                float(t["created_at"]),
                tuple(ApiKeyInfo(k["key_id"], k["created_at"], k["revoked_at"]) for k in t["keys"]),
            )
            for name, t in sorted(self._doc["tenants"].items())
        ]

    def revoke(self, tenant_or_key_id: str) -> int:
        """Revoke every key of a tenant, or one key by id; returns how many were revoked.

        Raises PrivacyError when nothing has that name or id.
        """
        with locked(self._lock):
            self._refresh()
            tenants = self._doc["tenants"]
            if tenant_or_key_id in tenants:
                keys = tenants[tenant_or_key_id]["keys"]
            else:
                keys = [
                    k
                    for t in tenants.values()
                    for k in t["keys"]
                    if k["key_id"] == tenant_or_key_id
                ]
                if not keys:
                    raise PrivacyError("no tenant or key id with that name")
            now = self._clock()
            count = 0
            for k in keys:
                if k["revoked_at"] is None:
                    k["revoked_at"] = now
                    count += 1
            self._write()
        return count

    def is_active(self, tenant: str) -> bool:
        """Whether ``tenant`` exists and has an unrevoked key."""
        self._refresh()
        t = self._doc["tenants"].get(tenant)
        return t is not None and any(k["revoked_at"] is None for k in t["keys"])

    def name_for_hash(self, digest: str) -> str | None:
        """The tenant whose ``sha256(name)[:24]`` is ``digest`` (for operator tools)."""
        self._refresh()
        for name in self._doc["tenants"]:
            if hashlib.sha256(name.encode()).hexdigest()[:24] == digest:
                return str(name)
        return None

    # -- authentication ------------------------------------------------------------------------

    def authenticate(self, api_key: str) -> str:
        """The tenant owning ``api_key``; AuthenticationError for any invalid or revoked key."""
        self._refresh()
        m = _KEY.fullmatch(api_key)
        found: tuple[str, dict[str, Any]] | None = None
        if m is not None:
            for name, t in self._doc["tenants"].items():
                for k in t["keys"]:
                    if k["key_id"] == m.group(1):
                        found = (name, k)
        # Hash and compare even when the id is unknown, so all failures cost the same work.
        salt = bytes.fromhex(found[1]["salt"]) if found else b"\0" * 16
        expected = bytes.fromhex(found[1]["sha256"]) if found else b"\0" * 32
        actual = _hash_secret(salt, m.group(2) if m else api_key)
        ok = hmac.compare_digest(actual, expected)
        if not ok or found is None or found[1]["revoked_at"] is not None:
            raise AuthenticationError(_INVALID, code="invalid_api_key")
        return found[0]


# -- browser tickets ---------------------------------------------------------------------------


class UsedTickets(Protocol):
    """Remembers redeemed ticket ids until they expire."""

    async def claim(self, ticket_id: str, ttl_ms: int) -> bool:
        """True the first time ``ticket_id`` is claimed within ``ttl_ms``; False afterwards."""
        ...


class MemoryUsedTickets:
    """Used ticket ids in this process (one node). Expired ids are dropped on each claim."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._until: dict[str, float] = {}

    async def claim(self, ticket_id: str, ttl_ms: int) -> bool:
        now = self._clock()
        self._until = {t: u for t, u in self._until.items() if u > now}
        if ticket_id in self._until:
            return False
        self._until[ticket_id] = now + ttl_ms / 1000
        return True

    def __len__(self) -> int:
        return len(self._until)


class _AsyncSetNX(Protocol):
    def set(self, name: str, value: str, *, nx: bool, px: int) -> Awaitable[Any]: ...


class RedisUsedTickets:
    """Used ticket ids in Redis (``SET key 1 NX PX ttl``), shared by every node.

    Takes any client with redis-py's async ``set`` (the session store's), so this module does
    not import redis; the caller translates RedisError to StoreError as the store does.
    """

    def __init__(self, client: _AsyncSetNX, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    async def claim(self, ticket_id: str, ttl_ms: int) -> bool:
        key = f"{self._prefix}:ticket:{ticket_id}"
        return bool(await self._client.set(key, "1", nx=True, px=max(1, ttl_ms)))


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TicketIssuer:
    """Issues and redeems single-use browser tickets: ``v1.<payload>.<hmac-sha256>``.

    Args:
        secret: the MAC key (at least 32 bytes), the same on every node, e.g.
            ``KeyStore.derive_secret("tickets")``.
        used: where redeemed ticket ids are claimed (default: in this process).
        registry: when given, tickets of tenants without an active key are refused.
        clock: seconds since the epoch (injectable for tests).
    """

    MAX_TTL_S = 300.0

    def __init__(
        self,
        secret: bytes,
        used: UsedTickets | None = None,
        *,
        registry: TenantRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(secret) < 32:
            raise PrivacyError("ticket secret must be at least 32 bytes")
        self._secret = secret
        self._used: UsedTickets = used if used is not None else MemoryUsedTickets(clock=clock)
        self._registry = registry
        self._clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, b"ticket.v1." + payload, hashlib.sha256).digest()

    def issue_ticket(self, tenant: str, ttl_s: float = 30.0) -> str:
        """A ticket for ``tenant`` valid ``ttl_s`` seconds (at most 300), redeemable once."""
        if not 0 < ttl_s <= self.MAX_TTL_S:
            raise PrivacyError(f"ticket ttl must be in (0, {self.MAX_TTL_S}] seconds")
        body = {"t": tenant, "id": secrets.token_hex(16), "exp": self._clock() + ttl_s}
        payload = json.dumps(body, separators=(",", ":")).encode()
        return f"v1.{_b64(payload)}.{_b64(self._mac(payload))}"

    async def redeem_ticket(self, ticket: str) -> str:
        """The tenant of a valid, unexpired, unused ticket; AuthenticationError otherwise."""
        try:
            version, p64, m64 = ticket.split(".")
            payload, mac = _unb64(p64), _unb64(m64)
        except ValueError:  # also binascii.Error
            raise AuthenticationError("invalid ticket", code="invalid_ticket") from None
        if version != "v1" or not hmac.compare_digest(mac, self._mac(payload)):
            raise AuthenticationError("invalid ticket", code="invalid_ticket")
        body = json.loads(payload)  # authenticated: it is our own JSON
        remaining_ms = int((float(body["exp"]) - self._clock()) * 1000)
        if remaining_ms <= 0:
            raise AuthenticationError("ticket expired", code="ticket_expired")
        # Claim for the ticket's remaining life: after that, expiry alone rejects it.
        if not await self._used.claim(str(body["id"]), remaining_ms):
            raise AuthenticationError("ticket already used", code="ticket_used")
        tenant = str(body["t"])
        if self._registry is not None and not self._registry.is_active(tenant):
            raise AuthenticationError("invalid ticket", code="invalid_ticket")
        return tenant
