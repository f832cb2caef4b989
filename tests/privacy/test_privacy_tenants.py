"""Tenant API keys (stored hashed, constant-time checks, revocation) and browser tickets."""

from __future__ import annotations

import json
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent_runtime.errors import AuthenticationError, PrivacyError
from privacy.tenants import MemoryUsedTickets, RedisUsedTickets, TenantRegistry, TicketIssuer
from tests.conftest import external_redis_available

SECRET = b"s" * 32


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_added_key_authenticates_and_is_stored_only_as_a_salted_hash(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    key = registry.add("acme")
    assert registry.authenticate(key) == "acme"
    raw = (tmp_path / "tenants.json").read_text()
    secret = key.split("_", 2)[2]
    assert key not in raw and secret not in raw
    assert stat.S_IMODE((tmp_path / "tenants.json").stat().st_mode) == 0o600
    entry = json.loads(raw)["tenants"]["acme"]["keys"][0]
    assert set(entry) == {"key_id", "salt", "sha256", "created_at", "revoked_at"}


def test_equal_secrets_would_not_share_a_hash(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    registry.add("a")
    registry.add("b")
    keys = [
        t["keys"][0]
        for t in json.loads((tmp_path / "tenants.json").read_text())["tenants"].values()
    ]
    assert keys[0]["salt"] != keys[1]["salt"]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret
        lambda k: "ar_000000000000_" + k[16:],  # unknown key id
        lambda k: k + "x",  # malformed
        lambda k: "",
        lambda k: k.upper(),
    ],
)
def test_every_invalid_key_gets_the_same_error(tmp_path: Path, mutate: object) -> None:
    registry = TenantRegistry(tmp_path)
    key = registry.add("acme")
    with pytest.raises(AuthenticationError) as info:
        registry.authenticate(mutate(key))  # type: ignore[operator]
    assert info.value.code == "invalid_api_key" and str(info.value) == "invalid API key"


def test_revoke_by_key_id_or_tenant_and_other_processes_see_it(tmp_path: Path) -> None:
    admin, server = TenantRegistry(tmp_path), TenantRegistry(tmp_path)
    k1, k2 = admin.add("acme"), admin.add("acme")
    k3 = admin.add("globex")
    assert server.authenticate(k1) == server.authenticate(k2) == "acme"
    assert admin.revoke(k1.split("_")[1]) == 1
    with pytest.raises(AuthenticationError):
        server.authenticate(k1)
    assert server.authenticate(k2) == "acme"
    assert admin.revoke("acme") == 1  # only k2 was still active
    with pytest.raises(AuthenticationError):
        server.authenticate(k2)
    assert server.authenticate(k3) == "globex"
    assert not server.is_active("acme") and server.is_active("globex")
    with pytest.raises(PrivacyError, match="no tenant"):
        admin.revoke("nobody")


def test_list_shows_key_ids_never_hashes(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    key = registry.add("acme")
    registry.revoke(key.split("_")[1])
    registry.add("acme")
    (info,) = registry.list()
    assert info.name == "acme" and len(info.keys) == 2 and info.active
    assert info.keys[0].key_id == key.split("_")[1] and info.keys[0].revoked_at is not None
    from privacy.crypto import tenant_hash

    assert registry.name_for_hash(tenant_hash("acme")) == "acme"


@pytest.mark.parametrize("name", ["", "-lead", "has space", "x" * 65, "slash/"])
def test_bad_tenant_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(PrivacyError, match="tenant name"):
        TenantRegistry(tmp_path).add(name)


async def test_ticket_is_single_use() -> None:
    issuer = TicketIssuer(SECRET)
    ticket = issuer.issue_ticket("acme")
    assert await issuer.redeem_ticket(ticket) == "acme"
    with pytest.raises(AuthenticationError) as info:
        await issuer.redeem_ticket(ticket)
    assert info.value.code == "ticket_used"


async def test_ticket_expires() -> None:
    clock = Clock()
    issuer = TicketIssuer(SECRET, clock=clock)
    ticket = issuer.issue_ticket("acme", ttl_s=30)
    clock.now += 30.001
    with pytest.raises(AuthenticationError) as info:
        await issuer.redeem_ticket(ticket)
    assert info.value.code == "ticket_expired"


async def test_forged_or_foreign_tickets_are_invalid() -> None:
    issuer = TicketIssuer(SECRET)
    ticket = issuer.issue_ticket("acme")
    version, payload, mac = ticket.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    for bad in [
        f"{version}.{forged}.{mac}",
        TicketIssuer(b"t" * 32).issue_ticket("acme"),
        "v2." + ticket[3:],
        "garbage",
        "v1.!!.!!",
    ]:
        with pytest.raises(AuthenticationError) as info:
            await issuer.redeem_ticket(bad)
        assert info.value.code == "invalid_ticket"


async def test_ticket_of_a_revoked_tenant_is_refused(tmp_path: Path) -> None:
    registry = TenantRegistry(tmp_path)
    registry.add("acme")
    issuer = TicketIssuer(SECRET, registry=registry)
    ticket = issuer.issue_ticket("acme")
    registry.revoke("acme")
    with pytest.raises(AuthenticationError):
        await issuer.redeem_ticket(ticket)


async def test_memory_used_tickets_forget_expired_ids() -> None:
    clock = Clock()
    used = MemoryUsedTickets(clock=clock)
    assert await used.claim("a", 1000)
    assert not await used.claim("a", 1000)
    clock.now += 2
    assert await used.claim("b", 1000)
    assert len(used) == 1  # "a" was dropped once expired


def test_ticket_parameters_are_validated() -> None:
    with pytest.raises(PrivacyError):
        TicketIssuer(b"short")
    with pytest.raises(PrivacyError):
        TicketIssuer(SECRET).issue_ticket("acme", ttl_s=0)
    with pytest.raises(PrivacyError):
        TicketIssuer(SECRET).issue_ticket("acme", ttl_s=301)


@pytest.fixture
async def redis_client() -> AsyncIterator[object]:
    if not external_redis_available():
        pytest.skip("needs a Redis on 127.0.0.1:6379")
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=6379, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_used_tickets_make_tickets_single_use_across_nodes(
    redis_client: object,
) -> None:
    import redis.asyncio as aioredis

    assert isinstance(redis_client, aioredis.Redis)
    prefix = f"privacy-test-{uuid.uuid4().hex}"
    try:
        node_a = TicketIssuer(SECRET, RedisUsedTickets(redis_client, prefix))
        node_b = TicketIssuer(SECRET, RedisUsedTickets(redis_client, prefix))
        ticket = node_a.issue_ticket("acme", ttl_s=30)
        assert await node_b.redeem_ticket(ticket) == "acme"
        with pytest.raises(AuthenticationError):
            await node_a.redeem_ticket(ticket)
        (key,) = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
        assert 0 < await redis_client.pttl(key) <= 30_000  # forgotten once the ticket expires
    finally:
        keys = [k async for k in redis_client.scan_iter(f"{prefix}:*")]
        if keys:
            await redis_client.delete(*keys)
