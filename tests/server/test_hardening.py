"""Defects found by an attacker and an unlucky operator, each pinned by a test: hostile input
gets an error (never a dropped connection), limits hold under concurrency, every response ends,
and authentication never fails open."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from agent_runtime.config import RuntimeConfig
from agent_runtime.errors import PrivacyError
from agent_runtime.sessions import Session
from privacy.audit import AuditLog, verify
from privacy.tenants import TenantRegistry
from server.app import Server
from tests.conftest import TIMEOUT, Client, client, make_config, running_server


async def idle_session_after_a_turn(server: Server, text: str) -> tuple[str, Session, int]:
    """Create a session, take one turn, disconnect, and wait until the server noticed:
    (session id, the live session, its memory entries at the acknowledgement)."""
    async with client(server) as c:
        sid = await c.create_session()
        _, done, _ = await c.turn(text, max_tokens=2)
    session = server.sessions.sessions[f"default/{sid}"]
    async with asyncio.timeout(TIMEOUT):
        await session.no_client.wait()
    return sid, session, int(done["response"]["memory"]["entries"])


HOSTILE = [
    "[" * 1200 + "]" * 1200,  # nesting far past the limit
    '{"type":"ping","data":' + "7" * 5000 + "}",  # an integer of 5,000 digits
    '{"type":"ping","data":"\\ud800"}',  # a lone surrogate in ping data
    '{"type":"session.create","session":{"instructions":"hi \\udfff"}}',  # ... in instructions
    '{"type":"session.resume","session_id":"../../etc","last_seq":0}',  # an id no file may have
    '{"type":"session.resume","session_id":"\\ud800","last_seq":0}',
    '{"type":"ping","event_id":"\\ud83d"}',
    '{"type":"ping","data":NaN}',
]


async def test_hostile_frames_get_invalid_value_errors_and_the_connection_stays(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server, client(server) as c:
        for frame in HOSTILE:
            await c.ws.send(frame)
            event = await c.recv()
            assert event["type"] == "error", frame[:60]
            assert event["error"]["code"] == "invalid_value", (frame[:60], event)
        await c.send({"type": "ping", "data": "still open"})
        pong, _ = await c.until("pong")
        assert pong["data"] == "still open"
        # No session was made by the instructions with a lone surrogate.
        assert server.sessions.sessions == {}


async def test_a_corrupt_bank_on_resume_is_an_error_event_not_a_close(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server:
        sid, _, _ = await idle_session_after_a_turn(server, "x" * 200)
        assert await server.sessions.unload_idle(now=float("inf")) == 1
        bank = server.sessions.directory("default", sid) / "bank"
        for f in bank.iterdir():
            f.write_bytes(b"garbage" * 10)
        async with client(server) as c:
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            error, _ = await c.until("error")
            assert error["error"]["code"] == "session_unreadable"
            await c.send({"type": "ping"})
            await c.until("pong")  # the connection stays usable


async def test_concurrent_creates_cannot_pass_the_limits(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_sessions=20, max_sessions_per_tenant=10)

    async def create(server: object) -> str:
        async with client(server) as c:  # type: ignore[arg-type]
            await c.send({"type": "session.create"})
            while True:
                event = await c.recv()
                if event["type"] in ("session.created", "error"):
                    code = (
                        "created" if event["type"] == "session.created" else event["error"]["code"]
                    )
                    await asyncio.sleep(0.5)  # stay connected while the others race
                    return str(code)

    async with running_server(config) as server:
        codes = await asyncio.gather(*(create(server) for _ in range(60)))
        assert codes.count("created") == 10  # the per-tenant limit, not 60
        assert set(codes) == {"created", "overloaded"}
        assert len(server.sessions.sessions) <= 10


async def test_sessions_left_by_their_clients_always_unload(config: RuntimeConfig) -> None:
    async with running_server(config) as server:
        async with client(server) as c:
            sid = await c.create_session()
        async with client(server) as c:
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            await c.until("session.resumed")
        session = next(iter(server.sessions.sessions.values()))
        async with asyncio.timeout(TIMEOUT):
            await session.no_client.wait()
        assert await server.sessions.unload_idle(now=float("inf")) == 1
        assert server.sessions.sessions == {}


async def test_every_response_of_dropped_clients_ends_after_the_grace_period(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path, disconnect_grace_s=0.3)
    config.generation.max_tokens = 100_000

    async def start_and_vanish(server: object) -> None:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"  # type: ignore[attr-defined]
        ws = await connect(url, subprotocols=["agent-runtime.v1.json"])  # type: ignore[list-item]
        c = Client(ws)
        await c.create_session()
        await c.send({"type": "response.create"})
        await c.until("response.output_text.delta")
        ws.transport.abort()  # a client that stops reading and is dropped, no close handshake

    async with running_server(config) as server:
        await asyncio.gather(*(start_and_vanish(server) for _ in range(8)))
        sessions = list(server.sessions.sessions.values())
        assert len(sessions) == 8
        async with asyncio.timeout(TIMEOUT * 2):
            await asyncio.gather(*(s.response_task for s in sessions if s.response_task))
        assert all(s.events[-1]["response"]["status"] == "cancelled" for s in sessions)
        running, waiting = server.engine.load()
        assert (running, waiting) == (0, 0)


async def test_max_tokens_above_the_ceiling_is_refused(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.send({"type": "response.create", "response": {"max_tokens": 1_000_000}})
        error, _ = await c.until("error")
        assert error["error"]["code"] == "invalid_value"
        assert "8192" in error["error"]["message"]


async def test_revoking_every_key_never_turns_authentication_off(config: RuntimeConfig) -> None:
    registry = TenantRegistry(Path(config.store.data_dir))
    async with running_server(config) as server:
        async with client(server) as c:  # no tenant yet: anonymous
            anonymous_sid = await c.create_session()
        registry.add("acme")
        registry.revoke("acme")
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        with pytest.raises(InvalidStatus) as info:
            async with connect(url, subprotocols=["agent-runtime.v1.json"]):  # type: ignore[list-item]
                pass
        assert info.value.response.status_code == 401
        assert anonymous_sid  # made before auth: unreachable from now on
    with pytest.raises(PrivacyError, match="reserved"):
        registry.add("default")  # nobody inherits the anonymous sessions


async def test_dns_rebinding_origin_is_refused(config: RuntimeConfig) -> None:
    async with running_server(config) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        evil = f"http://attacker.example:{server.port}"
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                url,
                subprotocols=["agent-runtime.v1.json"],  # type: ignore[list-item]
                origin=evil,  # type: ignore[arg-type]
                additional_headers={"Host": f"attacker.example:{server.port}"},
            ):
                pass
        assert info.value.response.status_code == 403
        async with connect(
            url,
            subprotocols=["agent-runtime.v1.json"],  # type: ignore[list-item]
            origin=f"http://localhost:{server.port}",  # type: ignore[arg-type]
        ):
            pass  # the server's own loopback origins are allowed


def test_audit_records_posted_from_the_loop_are_batched_and_durable(tmp_path: Path) -> None:
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    log = AuditLog(tmp_path / "audit.log")
    os.fsync = counting_fsync  # a spy: every fsync still happens
    try:
        for i in range(3000):
            log.post("acme", "denied", f"sess_{i}", code="session_not_found")
        log.flush()
    finally:
        os.fsync = real_fsync
        log.close()
    lines = (tmp_path / "audit.log").read_text().splitlines()
    assert len(lines) == 3000
    assert verify(tmp_path / "audit.log") == (True, None)
    assert json.loads(lines[-1])["session"] == "sess_2999"
    assert fsyncs < 3000 / 10  # batched: far fewer fsyncs than records


async def test_a_bank_cut_back_past_an_acknowledged_turn_is_refused(
    config: RuntimeConfig,
) -> None:
    """The state file remembers how much of the log was acknowledged: a log that lost committed
    records (damaged storage, an old copy restored) is reported, not silently served short."""
    async with running_server(config) as server:
        async with client(server) as c:
            sid = await c.create_session()
            await c.turn("first " + "a" * 100, max_tokens=2)
            session = server.sessions.sessions[f"default/{sid}"]
            first_end = (await server.engine.call(session.bank.stats)).log_bytes
            await c.turn("second " + "b" * 100, max_tokens=2)
        async with asyncio.timeout(TIMEOUT):
            await session.no_client.wait()
        # Drop the live session without a snapshot, as a crash would, then cut the log back.
        server.sessions.sessions.pop(session.key)
        await server.engine.call(session.bank.close)
        log = next((session.directory / "bank").glob("log-*.wal"))
        log.write_bytes(log.read_bytes()[:first_end])
        async with client(server) as c:
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            error, _ = await c.until("error")
            assert error["error"]["code"] == "session_unreadable"


async def test_a_turn_whose_state_file_was_not_written_is_not_resumed(
    config: RuntimeConfig,
) -> None:
    """The state file is the commit point: a bank commit whose state write failed (the turn was
    reported failed) is dropped when the session is loaded after a crash."""
    async with running_server(config) as server:
        async with client(server) as c:
            sid = await c.create_session()
            _, done, _ = await c.turn("first " + "a" * 120, max_tokens=2)
            acked_entries = done["response"]["memory"]["entries"]
            session = server.sessions.sessions[f"default/{sid}"]
            state = session.directory / "state.pt"
            old_state = state.read_bytes()
            state.unlink()
            state.mkdir()  # the next state write fails
            _, failed, _ = await c.turn("second " + "b" * 300, max_tokens=2)
            assert failed["response"]["status"] == "failed"
        async with asyncio.timeout(TIMEOUT):
            await session.no_client.wait()
        # A crash now: the session is gone from memory, its files are what they are.
        server.sessions.sessions.pop(session.key)
        await server.engine.call(lambda: session.bank.close(sync=False))
        state.rmdir()
        state.write_bytes(old_state)
        async with client(server) as c:
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            resumed, _ = await c.until("session.resumed")
            assert resumed["session"]["memory_entries"] == acked_entries
            assert resumed["session"]["turns"] == 1


async def test_a_resume_during_an_unload_waits_and_gets_a_live_session(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server:
        sid, session, _ = await idle_session_after_a_turn(server, "x" * 100)
        unload = asyncio.create_task(server.sessions.unload(session))
        await asyncio.sleep(0)  # the unload has begun
        async with client(server) as c:
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            await c.until("session.resumed")
            await unload
            _, done, _ = await c.turn("after the unload", max_tokens=2)
            assert done["response"]["status"] in ("completed", "incomplete")
            live = server.sessions.sessions[f"default/{sid}"]
            assert live is not session and not live.closed
