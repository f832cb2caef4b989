"""Tenancy and privacy through a real server: authentication, isolation, tickets, origins,
erasure, DP noising with its ledger, and the privacy budget."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent_runtime.config import RuntimeConfig
from privacy.audit import verify
from privacy.tenants import TenantRegistry
from tests.conftest import TIMEOUT, Client, make_config, running_server


def url(server: object) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime"  # type: ignore[attr-defined]


def connect_as(server: object, key: str | None = None, query: str = "", **kw: object):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return connect(
        url(server) + query,
        subprotocols=["agent-runtime.v1.json"],
        additional_headers=headers,  # type: ignore[list-item]
        open_timeout=TIMEOUT,
        **kw,
    )  # type: ignore[arg-type]


@pytest.fixture
def tenants(config: RuntimeConfig) -> dict[str, str]:
    registry = TenantRegistry(Path(config.store.data_dir))
    return {"acme": registry.add("acme"), "globex": registry.add("globex")}


async def test_authentication_is_required_once_tenants_exist(
    config: RuntimeConfig, tenants: dict[str, str]
) -> None:
    async with running_server(config) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect_as(server):
                pass
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus):
            async with connect_as(server, "ar_bogus_key"):
                pass
        async with connect_as(server, tenants["acme"]) as ws:
            c = Client(ws)
            await c.create_session()
    ok, _ = verify(Path(config.store.data_dir) / "audit.log")
    assert ok
    log = (Path(config.store.data_dir) / "audit.log").read_text()
    assert '"denied"' in log and '"create"' in log


async def test_a_tenant_cannot_reach_another_tenants_session(
    config: RuntimeConfig, tenants: dict[str, str]
) -> None:
    async with running_server(config) as server:
        async with connect_as(server, tenants["acme"]) as ws:
            a = Client(ws)
            sid = await a.create_session()
            await a.turn("acme secret " * 20, max_tokens=3)
        async with connect_as(server, tenants["globex"]) as ws:
            b = Client(ws)
            await b.send({"type": "session.resume", "session_id": sid, "event_id": "steal"})
            stolen = await b.recv()
            await b.send(
                {"type": "session.resume", "session_id": "sess_doesnotexist", "event_id": "missing"}
            )
            missing = await b.recv()
        # The same answer whether the session exists for someone else or not at all.
        for err in (stolen, missing):
            assert err["type"] == "error"
            assert err["error"]["code"] == "session_not_found"
            assert err["error"]["message"] == "no such session"
        async with connect_as(server, tenants["acme"]) as ws:  # the owner still can
            a2 = Client(ws)
            await a2.send({"type": "session.resume", "session_id": sid, "last_seq": 10**9})
            resumed, _ = await a2.until("session.resumed")
            assert resumed["session"]["memory_entries"] > 0


async def test_browser_tickets_are_single_use_and_need_a_key(
    config: RuntimeConfig, tenants: dict[str, str]
) -> None:
    async with running_server(config) as server:
        base = f"http://127.0.0.1:{server.port}/v1/tickets"

        def get(key: str | None) -> tuple[int, str]:
            req = urllib.request.Request(
                base, headers={"Authorization": f"Bearer {key}"} if key else {}
            )
            try:
                with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                exc.close()
                return exc.code, ""

        assert (await asyncio.to_thread(get, None))[0] == 401
        assert (await asyncio.to_thread(get, "ar_nope"))[0] == 401
        status, body = await asyncio.to_thread(get, tenants["acme"])
        assert status == 200
        ticket = json.loads(body)["ticket"]
        async with connect_as(server, query=f"?ticket={ticket}") as ws:
            await Client(ws).create_session()
        with pytest.raises(InvalidStatus) as info:
            async with connect_as(server, query=f"?ticket={ticket}"):
                pass
        assert info.value.response.status_code == 401


async def test_foreign_browser_origins_are_refused(config: RuntimeConfig) -> None:
    async with running_server(config) as server:
        with pytest.raises(InvalidStatus) as info:
            async with connect_as(server, origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        assert info.value.response.status_code == 403
        async with connect_as(server, origin=f"http://127.0.0.1:{server.port}") as ws:  # type: ignore[arg-type]
            await Client(ws).create_session()


def scan(directory: Path, needle: bytes) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


async def test_erasure_removes_the_session_everywhere_and_leaves_others_alone(
    config: RuntimeConfig,
) -> None:
    sentinel = "SENTINEL-" + secrets.token_hex(8)
    data = Path(config.store.data_dir)
    async with running_server(config) as server:
        async with connect_as(server) as ws:
            other = Client(ws)
            other_id = await other.create_session()
            await other.turn("unrelated " * 10, max_tokens=2)
        async with connect_as(server) as ws:
            c = Client(ws)
            sid = await c.create_session()
            await c.turn(f"{sentinel} " * 12, max_tokens=3)
            session = server.sessions.sessions[f"default/{sid}"]
            directory = session.directory
            assert directory.exists()
            assert not scan(data, sentinel.encode()), (
                "conversation text is never stored in plaintext"
            )
            r = redis.Redis(unix_socket_path=server.store.url.removeprefix("unix://"))
            try:
                assert r.exists(server.store.session_key(sid))
                await c.send({"type": "session.delete"})
                deleted, _ = await c.until("session.deleted")
                assert deleted["session_id"] == sid
                assert not r.exists(server.store.session_key(sid))
                assert r.exists(server.store.session_key(other_id))
                assert not any(sentinel.encode() in r.dump(k) or b"" for k in r.keys("*"))
            finally:
                r.close()
        assert not directory.exists()
        assert server.keystore is not None and not server.keystore.has_session_key("default", sid)
        assert server.sessions.directory("default", other_id).exists()
        assert f"default/{sid}" not in server.sessions.sessions
    log = (data / "audit.log").read_text()
    assert '"erase"' in log and sentinel not in log
    assert not scan(data, sentinel.encode())


async def test_noised_keys_are_charged_to_the_ledger_and_reported(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.privacy.noise_sigma = 0.5
    config.privacy.clip_norm = 1.0
    async with running_server(config) as server, connect_as(server) as ws:
        c = Client(ws)
        sid = await c.create_session()
        _, done, _ = await c.turn("n" * 100, max_tokens=3)
        session = server.sessions.sessions[f"default/{sid}"]
        assert session.privacy is not None
        report = session.privacy.report()
        entries = done["response"]["memory"]["entries"]
        assert entries > 0
        assert report["releases"] == entries
        keys, _ = await server.engine.call(lambda: session.bank.get(session.bank.live_ids()))
        # Stored keys are noised: clean memory keys have unit norm, noised ones do not.
        norms = (keys**2).sum(1) ** 0.5
        assert abs(float(norms.mean()) - 1.0) > 0.5
    out = subprocess.run(  # noqa: ASYNC221 - the server is closed; nothing else runs
        [sys.executable, "-m", "agent_runtime", "audit", "--data-dir", config.store.data_dir],
        capture_output=True,
        text=True,
        check=True,
        timeout=TIMEOUT * 3,
    ).stdout
    assert sid in out
    assert "0.5" in out  # sigma


async def test_spent_privacy_budget_stops_memory_writes_and_tells_the_client(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    config.privacy.noise_sigma = 1.0
    config.privacy.unit = "message"
    config.privacy.budget_epsilon = 3.0
    config.validate()
    async with running_server(config) as server, connect_as(server) as ws:
        c = Client(ws)
        await c.create_session()
        await c.send(
            {"type": "conversation.item.create", "item": {"role": "user", "content": "b" * 400}}
        )
        await c.send({"type": "response.create", "response": {"max_tokens": 3}})
        stopped, _ = await c.until("memory.write_stopped")
        assert stopped["reason"] == "privacy_budget_exhausted"
        done, _ = await c.until("response.done")
        entries = done["response"]["memory"]["entries"]
        assert entries < 400
        _, done2, _ = await c.turn("c" * 200, max_tokens=3)
        assert done2["response"]["memory"]["entries"] == entries  # nothing more is written
    assert '"budget_exhausted"' in (Path(config.store.data_dir) / "audit.log").read_text()


async def test_randomized_multi_tenant_workload_sees_exactly_its_own_sessions(
    config: RuntimeConfig, tenants: dict[str, str]
) -> None:
    """A seeded random mix of creates, turns and resumes by two tenants: every resume of one's own
    session succeeds with its own memory, every resume of the other's is not found."""
    import random

    rng = random.Random(20261126)
    owned: dict[str, list[str]] = {name: [] for name in tenants}
    tokens_fed: dict[str, int] = {}
    async with running_server(config) as server:
        for _ in range(24):
            name = rng.choice(list(tenants))
            other = next(t for t in tenants if t != name)
            async with connect_as(server, tenants[name]) as ws:
                c = Client(ws)
                action = rng.choice(["create", "own", "other"]) if owned[name] else "create"
                if action == "create":
                    sid = await c.create_session()
                    owned[name].append(sid)
                elif action == "own":
                    sid = rng.choice(owned[name])
                    await c.send({"type": "session.resume", "session_id": sid, "last_seq": 10**9})
                    resumed, _ = await c.until("session.resumed")
                    assert resumed["session"]["position"] == tokens_fed[sid]
                else:
                    if not owned[other]:
                        continue
                    sid = rng.choice(owned[other])
                    await c.send({"type": "session.resume", "session_id": sid, "event_id": "x"})
                    err = await c.recv()
                    assert err["error"]["code"] == "session_not_found"
                    continue
                await c.turn(f"{name} says {rng.random()}" * 3, max_tokens=2)
                await c.send({"type": "memory.stats"})
                stats, _ = await c.until("memory.stats")
                tokens_fed[sid] = stats["position"]
                # The bank holds exactly this session's completed blocks, nothing from elsewhere.
                assert stats["memory"]["entries"] == stats["position"] // 16 * 16
        for name in tenants:
            for sid in owned[name]:
                session = server.sessions.sessions[f"{name}/{sid}"]
                assert session.tenant == name
                assert server.sessions.directory(name, sid) == session.directory
        dirs = {s.directory for s in server.sessions.sessions.values()}
        assert len(dirs) == sum(len(v) for v in owned.values())  # no two sessions share storage
