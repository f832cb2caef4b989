"""Serving behaviour through a real server: cancel, one active response, overload, disconnect,
resume, idle unload, graceful shutdown and metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from agent_runtime.config import RuntimeConfig
from tests.conftest import TIMEOUT, client, make_config, running_server


async def test_cancel_stops_generation_and_rolls_the_turn_back(config: RuntimeConfig) -> None:
    config.generation.max_tokens = 2000
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.send(
            {"type": "conversation.item.create", "item": {"role": "user", "content": "q" * 20}}
        )
        await c.send({"type": "response.create"})
        await c.until("response.output_text.delta")
        session = next(iter(server.sessions.sessions.values()))
        await c.send({"type": "response.cancel"})
        done, _ = await c.until("response.done")
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["usage"]["output_tokens"] < 2000
        # Rolled back: the session holds the prompt (role token, text, END, ASSISTANT) plus END.
        assert session.state.position == 1 + 20 + 1 + 1 + 1
        # The session keeps working after a cancel.
        _, done2, _ = await c.turn("again", max_tokens=3)
        assert done2["response"]["status"] in ("completed", "incomplete")


async def test_cancel_with_commit_keeps_the_partial_reply(config: RuntimeConfig) -> None:
    config.generation.max_tokens = 2000
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.send(
            {"type": "conversation.item.create", "item": {"role": "user", "content": "q" * 20}}
        )
        await c.send({"type": "response.create", "response": {"commit_on_cancel": True}})
        await c.until("response.output_text.delta")
        await c.send({"type": "response.cancel"})
        done, _ = await c.until("response.done")
        session = next(iter(server.sessions.sessions.values()))
        out = done["response"]["usage"]["output_tokens"]
        assert done["response"]["status"] == "cancelled"
        assert session.state.position == 1 + 20 + 1 + 1 + out + 1


async def test_only_one_active_response_per_session(config: RuntimeConfig) -> None:
    config.generation.max_tokens = 2000
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.send({"type": "response.create", "event_id": "first"})
        await c.until("response.created")
        await c.send({"type": "response.create", "event_id": "second"})
        err, _ = await c.until("error")
        assert err["error"]["code"] == "response_in_progress"
        assert err["error"]["event_id"] == "second"
        await c.send({"type": "response.cancel"})
        done, _ = await c.until("response.done")
        assert done["response"]["status"] == "cancelled"


async def test_overload_answers_with_retry_after_instead_of_hanging(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.engine.max_batch = 1
    config.engine.max_queue = 1
    config.generation.max_tokens = 2000
    async with (
        running_server(config) as server,
        client(server) as a,
        client(server) as b,
        client(server) as c,
    ):
        for x in (a, b, c):
            await x.create_session()
        await a.send({"type": "response.create"})
        await a.until("response.output_text.delta")  # running, so the queue is empty
        await b.send({"type": "response.create"})  # queued
        await b.until("response.created")
        await c.send({"type": "response.create", "event_id": "third"})
        err, _ = await c.until("error")
        assert err["error"]["code"] == "overloaded"
        assert err["error"]["retry_after_ms"] > 0
        assert err["error"]["event_id"] == "third"
        for x in (a, b):
            await x.send({"type": "response.cancel"})
            done, _ = await x.until("response.done")
            assert done["response"]["status"] == "cancelled"


async def test_session_limit_per_tenant(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_sessions_per_tenant=1)
    async with running_server(config) as server, client(server) as a, client(server) as b:
        await a.create_session()
        await b.send({"type": "session.create", "event_id": "s2"})
        err, _ = await b.until("error")
        assert err["error"]["code"] == "overloaded"
        assert "tenant" in err["error"]["message"]


async def test_disconnect_cancels_after_the_grace_period(tmp_path: Path) -> None:
    config = make_config(tmp_path, disconnect_grace_s=0.2)
    config.generation.max_tokens = 100_000
    async with running_server(config) as server:
        async with client(server) as c:
            await c.create_session()
            await c.send({"type": "response.create"})
            await c.until("response.output_text.delta")
        session = next(iter(server.sessions.sessions.values()))
        assert session.response_task is not None
        async with asyncio.timeout(TIMEOUT):
            await session.response_task  # finishes (cancelled) without any client
        assert session.events[-1]["type"] == "response.done"
        assert session.events[-1]["response"]["status"] == "cancelled"


async def test_resume_after_disconnect_replays_missed_events(config: RuntimeConfig) -> None:
    config.generation.max_tokens = 40
    async with running_server(config) as server:
        async with client(server) as c:
            sid = await c.create_session()
            await c.send(
                {"type": "conversation.item.create", "item": {"role": "user", "content": "hello"}}
            )
            await c.send({"type": "response.create"})
            await c.until("response.output_text.delta")
            seen = c.last_seq
        session = next(iter(server.sessions.sessions.values()))
        assert session.response_task is not None
        await session.response_task  # finishes while nobody listens (within the grace period)
        async with client(server) as c2:
            await c2.send({"type": "session.resume", "session_id": sid, "last_seq": seen})
            resumed = await c2.recv()
            assert resumed["type"] == "session.resumed"
            assert resumed["events_lost"] is False
            replay = [await c2.recv() for _ in range(resumed["replayed"])]
            assert [e["seq"] for e in replay] == list(range(seen + 1, session.seq + 1))
            assert replay[-1]["type"] == "response.done"


async def test_resume_of_unknown_session_is_not_found(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.send({"type": "session.resume", "session_id": "sess_nope", "event_id": "r"})
        err = await c.recv()
        assert err["error"]["code"] == "session_not_found"
        assert err["error"]["event_id"] == "r"


async def test_idle_sessions_are_unloaded_and_resume_from_disk(tmp_path: Path) -> None:
    config = make_config(tmp_path, idle_unload_s=0.05)
    async with running_server(config) as server:
        async with client(server) as c:
            sid = await c.create_session()
            _, done, _ = await c.turn("z" * 100, max_tokens=3)
            entries = done["response"]["memory"]["entries"]
            session = next(iter(server.sessions.sessions.values()))
            position = session.state.position
        async with asyncio.timeout(TIMEOUT):
            await session.no_client.wait()  # the server noticed the disconnect
        await server.sessions.unload_idle(now=float("inf"))
        assert not server.sessions.sessions
        async with client(server) as c2:
            await c2.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            resumed, _ = await c2.until("session.resumed")
            assert resumed["session"]["memory_entries"] == entries
            assert resumed["session"]["position"] == position


async def test_graceful_shutdown_says_going_away_and_closes_with_1001(
    config: RuntimeConfig,
) -> None:
    server_cm = running_server(config)
    server = await server_cm.__aenter__()
    try:
        async with client(server) as c:
            await c.create_session()
            await server.aclose()
            going, _ = await c.until("server.going_away")
            assert going["reason"] == "shutdown"

            async def drain() -> None:
                async with asyncio.timeout(TIMEOUT):
                    while True:
                        await c.ws.recv()

            with pytest.raises(ConnectionClosed) as info:
                await drain()
            assert info.value.rcvd is not None
            assert info.value.rcvd.code == 1001
    finally:
        await server_cm.__aexit__(None, None, None)
    # Every live bank was snapshotted.
    assert list(Path(config.store.data_dir).glob("sessions/*/*/state.pt"))  # noqa: ASYNC240


async def test_metrics_are_prometheus_text_without_session_labels(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        _, done, _ = await c.turn("metrics please", max_tokens=5)
        url = f"http://127.0.0.1:{server.port}/metrics"
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(url, timeout=TIMEOUT).read().decode()
        )
    samples: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
            assert "sess_" not in name
    produced = done["response"]["usage"]["output_tokens"]
    assert samples["agent_runtime_tokens_generated_total"] == produced
    assert samples["agent_runtime_time_to_first_token_seconds_count"] == 1
    assert samples["agent_runtime_inter_token_latency_seconds_count"] == produced - 1
    assert samples["agent_runtime_responses_total"] == 1
    assert samples["agent_runtime_sessions_active"] == 1
    assert samples["agent_runtime_ready"] == 1
    assert 'agent_runtime_queue_time_seconds_bucket{le="+Inf"}' in samples


async def test_msgpack_subprotocol_round_trip(config: RuntimeConfig) -> None:
    import msgpack
    from websockets.asyncio.client import connect

    async with running_server(config) as server:
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        async with connect(url, subprotocols=["agent-runtime.v1.msgpack"]) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "agent-runtime.v1.msgpack"
            await ws.send(msgpack.packb({"type": "session.create"}))
            created = msgpack.unpackb(await ws.recv())
            assert created["type"] == "session.created"
            await ws.send(json.dumps({"type": "ping"}))  # a text frame on a msgpack session
            err = msgpack.unpackb(await ws.recv())
            assert err["type"] == "error" and "binary" in err["error"]["message"]


async def test_min_tokens_suppresses_the_end_of_a_reply(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        _, done, _ = await c.turn("hi", max_tokens=12, min_tokens=12)
        assert done["response"]["usage"]["output_tokens"] == 12
        assert done["response"]["status"] == "incomplete"
        assert done["response"]["status_details"]["reason"] == "length"
