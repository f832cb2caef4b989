"""A real websocket client against a real server on loopback: the end-to-end thin slice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import redis

from agent_runtime.config import RuntimeConfig
from tests.conftest import TINY, client, external_redis_available, make_config, running_server


async def test_streams_a_reply_as_deltas_then_done(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        _, done, events = await c.turn("Hello there, how are you?", max_tokens=12)
        kinds = [e["type"] for e in events]
        assert kinds[0] == "conversation.item.created"
        assert "response.created" in kinds
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert deltas, "the reply must be streamed as delta events"
        assert done["response"]["status"] in ("completed", "incomplete")
        assert 1 <= done["response"]["usage"]["output_tokens"] <= 12
        assert done["response"]["usage"]["input_tokens"] == len(b"Hello there, how are you?") + 3
        # Server events carry event ids and a strictly increasing per-session seq.
        seqs = [e["seq"] for e in [*events, done]]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert all(e["event_id"].startswith("evt_") for e in [*events, done])


async def test_bank_grows_as_tokens_leave_the_window_and_values_match_keys(
    config: RuntimeConfig,
) -> None:
    W = TINY.window
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        rng = np.random.default_rng(0)
        _, done, _ = await c.turn("".join(rng.choice(list("abcdefgh "), 5 * W)), max_tokens=4)
        await c.send({"type": "memory.stats"})
        stats, _ = await c.until("memory.stats")
        position = stats["position"]
        # Every completed block of W tokens is in the bank; the current block is in the window.
        assert stats["memory"]["entries"] == (position // W) * W >= 5 * W
        assert done["response"]["memory"]["entries"] == stats["memory"]["entries"]
        written_in_prompt = stats["memory"]["entries"]

        _, done2, _ = await c.turn("y" * (2 * W), max_tokens=4)
        assert done2["response"]["memory"]["entries"] > written_in_prompt
        assert done2["response"]["memory"]["retrieved"] > 0

        session = next(iter(server.sessions.sessions.values()))
        bank = session.bank

        def check() -> None:
            keys, _ = bank.get(bank.live_ids())
            res = bank.search(keys, 4)
            assert res.mask.all()
            # Every returned value is the value stored with the returned key's id.
            _, stored = bank.get(res.ids.reshape(-1))
            np.testing.assert_array_equal(res.values.reshape(stored.shape), stored)
            # Memory keys are L2-normalised, so each key's best match scores ~1 (itself or a twin).
            np.testing.assert_allclose(res.scores[:, 0], 1.0, atol=1e-4)

        await server.engine.call(check)


async def test_malformed_and_unknown_frames_get_errors_and_the_session_keeps_working(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.ws.send("{this is not json")
        err = await c.recv()
        assert err["type"] == "error" and err["error"]["code"] == "invalid_frame"
        assert "JSON" in err["error"]["message"]

        await c.send({"type": "bogus.event", "event_id": "e-42"})
        err = await c.recv()
        assert err["error"]["code"] == "unknown_event" and err["error"]["event_id"] == "e-42"
        assert "bogus.event" in err["error"]["message"]

        await c.send(
            {"type": "conversation.item.create", "event_id": "e-43", "item": {"role": "user"}}
        )
        err = await c.recv()
        assert err["error"]["event_id"] == "e-43" and "content" in err["error"]["message"]

        await c.send(
            {"type": "response.create", "event_id": "e-44", "response": {"temperature": "hot"}}
        )
        err = await c.recv()
        assert err["error"]["code"] == "invalid_value" and "temperature" in err["error"]["message"]

        await c.ws.send(json.dumps([1, 2, 3]))
        err = await c.recv()
        assert err["type"] == "error" and "object" in err["error"]["message"]

        _, done, _ = await c.turn("still here?", max_tokens=3)
        assert done["response"]["status"] in ("completed", "incomplete")


async def test_oversize_frame_is_rejected_with_an_error(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_frame_bytes=2000)
    async with running_server(config) as server, client(server) as c:
        await c.create_session()
        await c.send(
            {
                "type": "conversation.item.create",
                "event_id": "big",
                "item": {"role": "user", "content": "z" * 3000},
            }
        )
        err = await c.recv()
        assert err["error"]["code"] == "frame_too_large"
        _, done, _ = await c.turn("small", max_tokens=2)
        assert done["type"] == "response.done"


async def test_events_before_a_session_are_refused(config: RuntimeConfig) -> None:
    async with running_server(config) as server, client(server) as c:
        await c.send({"type": "response.create", "event_id": "early"})
        err = await c.recv()
        assert err["error"]["code"] == "no_session" and err["error"]["event_id"] == "early"


def _read_meta(url_or_socket: str, key: str) -> tuple[dict[str, str], int]:
    if url_or_socket.startswith("unix://"):
        r = redis.Redis(
            unix_socket_path=url_or_socket.removeprefix("unix://"), decode_responses=True
        )
    else:
        r = redis.Redis.from_url(url_or_socket, decode_responses=True)
    try:
        return r.hgetall(key), int(r.ttl(key))
    finally:
        r.close()


@pytest.mark.parametrize("backend", ["embedded", "external"])
async def test_session_metadata_is_written_to_redis(tmp_path: Path, backend: str) -> None:
    if backend == "external" and not external_redis_available():
        pytest.skip("no Redis answers at 127.0.0.1:6379 (the embedded variant still runs)")
    url = "redis://127.0.0.1:6379/0" if backend == "external" else ""
    config = make_config(tmp_path, redis_url=url)
    async with running_server(config) as server, client(server) as c:
        assert server.store.embedded == (backend == "embedded")
        sid = await c.create_session()
        _, done, _ = await c.turn("a" * 40, max_tokens=3)
        meta, ttl = _read_meta(url or server.store.url, server.store.session_key(sid))
        assert meta["tenant"] == "default"
        assert meta["session_id"] == sid
        assert int(meta["turns"]) == 1
        assert int(meta["bank_entries"]) == done["response"]["memory"]["entries"]
        assert float(meta["created_at"]) <= float(meta["last_active"])
        assert 0 < ttl <= config.store.session_ttl_s
        # Metadata never holds conversation content.
        assert not any("a" * 10 in v for v in meta.values())
        await server.store.delete(sid, "default")
