"""The OpenAI-compatible HTTP API against a real server on loopback: the official ``openai``
client (streaming and not), curl with SSE, sessions continued across calls and resumed over the
websocket, provenance, limits, errors and tenancy."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from agent_runtime.config import RuntimeConfig
from agent_runtime.models.byte import BUNDLED_CHECKPOINT
from agent_runtime.models.byte.model import load_checkpoint
from agent_runtime.training.data import stated_value
from privacy.tenants import TenantRegistry
from tests.agent_runtime.test_recall import _filler_messages, _held_out_fact
from tests.conftest import client, make_config, running_server

MODEL = "agent-runtime-bundled"


def _keys(config: RuntimeConfig, *tenants: str) -> list[str]:
    registry = TenantRegistry(Path(config.store.data_dir))
    return [registry.add(t) for t in tenants]


_clients: list[openai.OpenAI] = []


def _openai(port: int, key: str) -> openai.OpenAI:
    """An ``openai`` client for the server on ``port``, closed when the test ends: an unclosed
    one holds pooled sockets that only the garbage collector finds, later, in another test."""
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
    _clients.append(api)
    return api


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def _post(port: int, body: object, key: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=data,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


async def test_the_openai_client_streams_and_not_with_the_same_greedy_reply(
    config: RuntimeConfig,
) -> None:
    (key,) = _keys(config, "acme")
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    async with running_server(config, model) as server:
        api = _openai(server.port, key)
        messages = [{"role": "user", "content": "Hello! What is my favourite colour?"}]

        def calls() -> tuple[Any, Any, list[Any]]:
            listed = api.models.list()
            whole = api.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=24,
                temperature=0,  # type: ignore[arg-type]
            )
            chunks = list(
                api.chat.completions.create(
                    model=MODEL,
                    messages=messages,  # type: ignore[arg-type]
                    max_tokens=24,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return listed, whole, chunks

        listed, whole, chunks = await asyncio.to_thread(calls)
    assert [m.id for m in listed.data] == [MODEL]
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy: the same reply either way
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    # stateless: no session is named, and none is left behind
    assert whole.model_extra["agent_runtime"]["session_id"] is None
    assert server.sessions.sessions == {}


async def test_a_session_continued_over_http_recalls_and_names_the_message_and_resumes_on_ws(
    config: RuntimeConfig,
) -> None:
    """Three calls on one session: a fact, then ~1K tokens of other talk (far past the 128-token
    window), then the question. The answer states the fact, its provenance names the first
    message, and the same session (its turns and its bank) then resumes over the websocket."""
    (key,) = _keys(config, "acme")
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    fact = _held_out_fact(21)
    rng = random.Random(21)
    statement, question = fact.statement(rng), fact.question(rng)
    filler = _filler_messages(21, 1200)
    async with running_server(config, model) as server:
        api = _openai(server.port, key)

        def calls() -> tuple[str, list[Any]]:
            history: list[dict[str, str]] = [{"role": "user", "content": statement}]
            first = api.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=history,  # type: ignore[arg-type]
                max_tokens=16,
                temperature=0,
                extra_headers={"X-Session-Id": "new"},
            )
            sid = first.headers["x-session-id"]
            replies = [first.parse()]
            history.append({"role": "assistant", "content": replies[0].choices[0].message.content})
            for text in (" ".join(filler), question):
                history.append({"role": "user", "content": text})
                reply = api.chat.completions.create(
                    model=MODEL,
                    messages=history,  # type: ignore[arg-type]
                    max_tokens=48,
                    temperature=0,
                    extra_headers={"X-Session-Id": sid},
                )
                replies.append(reply)
                history.append({"role": "assistant", "content": reply.choices[0].message.content})
            return sid, replies

        sid, replies = await asyncio.to_thread(calls)
        ext = [r.model_extra["agent_runtime"] for r in replies]
        assert ext[0]["session_id"] == sid and len(ext[0]["message_item_ids"]) == 1
        answer = replies[2].choices[0].message.content
        assert stated_value(answer) == fact.value, answer
        top = ext[2]["memory"]["provenance"][0]
        assert top["item_id"] == ext[0]["message_item_ids"][0], ext[2]["memory"]
        begin, end = top["span"]
        assert fact.value in statement[begin:end]
        assert ext[2]["memory"]["entries"] > 1000  # the bank grew across the calls
        async with client(server, api_key=key) as c:  # the same session, over the websocket
            await c.send({"type": "session.resume", "session_id": sid, "last_seq": 0})
            resumed, _ = await c.until("session.resumed")
            assert resumed["session"]["turns"] == 3
            assert resumed["session"]["memory_entries"] == ext[2]["memory"]["entries"]
            replay = [await c.recv() for _ in range(resumed["replayed"])]
            dones = [e["response"] for e in replay if e["type"] == "response.done"]
            assert [d["item_id"] for d in dones] == [x["item_id"] for x in ext]  # the HTTP turns
            _, done, _ = await c.turn("Thanks!", max_tokens=8, temperature=0)
        assert done["response"]["status"] in ("completed", "incomplete")
        assert done["response"]["memory"]["entries"] >= ext[2]["memory"]["entries"]


async def test_curl_streams_server_sent_events_ending_in_done(config: RuntimeConfig) -> None:
    (key,) = _keys(config, "acme")
    async with running_server(config) as server:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 5,
        }
        out = await asyncio.to_thread(
            subprocess.run,
            [
                "curl",
                "-sS",
                "-N",
                "--max-time",
                "60",
                "-H",
                f"Authorization: Bearer {key}",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps(body),
                "-i",
                f"http://127.0.0.1:{server.port}/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    out.stdout = out.stdout.removeprefix("HTTP/1.1 100 Continue\n\n")
    head, _, stream = out.stdout.partition("\n\n")  # (text mode reads CRLF as LF)
    assert head.startswith("HTTP/1.1 200 OK") and "text/event-stream" in head
    assert "transfer-encoding: chunked" in head.lower()
    events = [line for line in stream.split("\n") if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_overload_is_429_with_retry_after(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.server.max_sessions = 1
    (key,) = _keys(config, "acme")
    async with running_server(config) as server, client(server, api_key=key) as c:
        await c.create_session()  # takes the only session slot
        api = _openai(server.port, key)
        with pytest.raises(openai.RateLimitError) as caught:
            await asyncio.to_thread(
                api.chat.completions.create,
                model=MODEL,
                messages=[{"role": "user", "content": "hi"}],
            )
    assert caught.value.status_code == 429
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert caught.value.body["code"] == "overloaded"  # type: ignore[index]


async def test_a_tenant_cannot_continue_another_tenants_session(config: RuntimeConfig) -> None:
    key_a, key_b = _keys(config, "a", "b")
    async with running_server(config) as server:
        port = server.port
        msg = {"model": MODEL, "messages": [{"role": "user", "content": "secret"}], "max_tokens": 2}
        status, headers, _ = await asyncio.to_thread(
            _post, port, msg, key_a, **{"X-Session-Id": "new"}
        )
        assert status == 200
        sid = headers["X-Session-Id"]
        theirs = await asyncio.to_thread(_post, port, msg, key_b, **{"X-Session-Id": sid})
        missing = await asyncio.to_thread(_post, port, msg, key_b, **{"X-Session-Id": "sess_nope"})
        mine = await asyncio.to_thread(_post, port, msg, key_a, **{"X-Session-Id": sid})
    assert theirs[0] == missing[0] == 404
    assert theirs[2] == missing[2]  # the same not-found: nothing tells the session exists
    assert theirs[2]["error"]["code"] == "session_not_found"
    # a's own history check: it sent only the first message again, not the reply it got
    assert mine[0] == 409 and mine[2]["error"]["code"] == "session_history_mismatch"


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"n": 2}, 400, "n"),
        ({"tools": []}, 400, "tools"),
        ({"temperature": 5}, 400, "temperature"),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
        ({"model": "gpt-4"}, 404, "model"),
        ({"logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": "x" * 40_000}]}, 400, "messages[0].content"),
    ],
)
async def test_bad_requests_are_openai_error_objects_naming_the_parameter(
    config: RuntimeConfig, change: dict[str, Any], status: int, param: str
) -> None:
    (key,) = _keys(config, "acme")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **change}
    async with running_server(config) as server:
        got = await asyncio.to_thread(_post, server.port, body, key)
        assert server.sessions.sessions == {}  # nothing was created for a refused request
    assert got[0] == status
    error = got[2]["error"]
    assert error["param"] == param and error["type"] and error["message"]


async def test_malformed_http_gets_clear_errors_and_the_server_keeps_serving(
    config: RuntimeConfig,
) -> None:
    (key,) = _keys(config, "acme")
    async with running_server(config) as server:
        port = server.port
        bad_json = await asyncio.to_thread(_post, port, b"{not json", key)
        no_key = await asyncio.to_thread(_post, port, {"model": MODEL, "messages": []}, "ar_wrong")
        big = await asyncio.to_thread(_post, port, b"[" + b"1," * 3_000_000 + b"1]", key)

        def raw(data: bytes) -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(data)
                return s.recv(65536)

        garbage = await asyncio.to_thread(raw, b"\x16\x03\x01 not http at all\r\n\r\n")
        text_plain = await asyncio.to_thread(
            _post, port, {"model": MODEL}, key, **{"Content-Type": "text/plain"}
        )
        ok = await asyncio.to_thread(
            _post,
            port,
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            key,
        )
    assert bad_json[0] == 400 and bad_json[2]["error"]["code"] == "invalid_json"
    assert no_key[0] == 401 and no_key[2]["error"]["type"] == "authentication_error"
    assert big[0] == 413
    assert garbage.startswith(b"HTTP/1.1 400")
    assert text_plain[0] == 415  # a browser's "simple" cross-site POST never gets in
    assert ok[0] == 200


async def test_a_client_that_leaves_mid_stream_cancels_its_response(config: RuntimeConfig) -> None:
    (key,) = _keys(config, "acme")
    config.generation.max_tokens_limit = 100_000
    async with running_server(config) as server:
        api = _openai(server.port, key)

        def leave_early() -> str:
            raw = api.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "talk for a long time"}],
                max_tokens=50_000,
                stream=True,
                extra_headers={"X-Session-Id": "new"},
            )
            stream = raw.parse()
            next(iter(stream))
            stream.close()
            return raw.headers["x-session-id"]

        sid = await asyncio.to_thread(leave_early)
        (session,) = [s for s in server.sessions.sessions.values() if s.session_id == sid]
        if session.response_task is not None:
            async with asyncio.timeout(30):
                await asyncio.wait({session.response_task})
        assert session.sender is None  # detached
        assert session.meta.turns == 1  # the cancelled turn is recorded, its reply rolled back


async def test_with_authentication_off_any_key_is_the_anonymous_tenant(
    config: RuntimeConfig,
) -> None:
    """OpenAI clients always send a key: on an open (loopback, no tenants) server any key works,
    and the session it makes is the anonymous tenant's, the one a keyless websocket resumes."""
    async with running_server(config) as server:
        msg = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        status, headers, _ = await asyncio.to_thread(
            _post, server.port, msg, "sk-no-key-required", **{"X-Session-Id": "new"}
        )
        assert status == 200
        async with client(server) as c:
            await c.send(
                {"type": "session.resume", "session_id": headers["X-Session-Id"], "last_seq": 0}
            )
            resumed, _ = await c.until("session.resumed")
    assert resumed["session"]["turns"] == 1


def test_the_openapi_document_describes_exactly_the_accepted_parameters() -> None:
    import yaml

    from server.openai_api import ACCEPTED

    doc = yaml.safe_load((Path(__file__).parents[2] / "docs" / "openapi.yaml").read_text())
    assert set(doc["paths"]) == {"/v1/models", "/v1/models/{model}", "/v1/chat/completions"}
    request = doc["components"]["schemas"]["ChatRequest"]
    assert set(request["properties"]) == ACCEPTED
    assert request["additionalProperties"] is False


async def test_a_stateless_request_longer_than_the_window_reads_it_through_memory(
    config: RuntimeConfig,
) -> None:
    """No session named: a fact, ~1K tokens of other talk (8x the window) and the question in
    one message list; the answer has the fact, and nothing of the request is left behind."""
    (key,) = _keys(config, "acme")
    model, _ = load_checkpoint(BUNDLED_CHECKPOINT)
    fact = _held_out_fact(22)
    rng = random.Random(22)
    messages = [
        {"role": "user", "content": fact.statement(rng)},
        {"role": "assistant", "content": "Sure, noted."},
        *({"role": "user", "content": t} for t in _filler_messages(22, 1200)),
        {"role": "user", "content": fact.question(rng)},
    ]
    async with running_server(config, model) as server:
        body = {"model": MODEL, "messages": messages, "max_tokens": 48, "temperature": 0}
        status, headers, reply = await asyncio.to_thread(_post, server.port, body, key)
        assert server.sessions.sessions == {}
    assert status == 200 and "X-Session-Id" not in headers
    assert stated_value(reply["choices"][0]["message"]["content"]) == fact.value, reply
    memory = reply["agent_runtime"]["memory"]
    assert memory["entries"] > 1000 and memory["retrieved"] > 0  # through the bank
    left = await asyncio.to_thread(lambda: list(Path(config.store.data_dir).rglob("state.pt")))
    assert left == [], "the stateless session was erased"


async def test_http_takes_a_session_from_its_websocket_which_resumes_and_replays(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server, client(server) as ws:
        sid = await ws.create_session()
        said, first, _ = await ws.turn("hello", max_tokens=3)
        history = [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": said},  # the reply as the websocket streamed it
            {"role": "user", "content": "and again"},
        ]
        body = {"model": MODEL, "messages": history, "max_tokens": 3}
        status, _, reply = await asyncio.to_thread(
            _post, server.port, body, "any", **{"X-Session-Id": sid}
        )
        assert status == 200, reply
        with pytest.raises(Exception, match="4000"):  # displaced: "resumed on another connection"
            await ws.recv()
        async with client(server) as again:
            await again.send({"type": "session.resume", "session_id": sid, "last_seq": ws.last_seq})
            resumed, _ = await again.until("session.resumed")
            missed = [await again.recv() for _ in range(resumed["replayed"])]
    done = [e for e in missed if e["type"] == "response.done"]
    assert [d["response"]["item_id"] for d in done] == [reply["agent_runtime"]["item_id"]]
    assert first["response"]["item_id"] != reply["agent_runtime"]["item_id"]


async def test_a_websocket_resume_takes_over_a_streaming_http_request(
    config: RuntimeConfig,
) -> None:
    """The HTTP stream ends; the response is not cancelled: the websocket that resumed the
    session gets its response.done."""
    config.generation.max_tokens_limit = 100_000
    async with running_server(config) as server:
        api = _openai(server.port, "any")
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def stream() -> tuple[str, int]:
            raw = api.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": "talk for a while"}],
                max_tokens=400,
                stream=True,
                extra_headers={"X-Session-Id": "new"},
            )
            chunks = 0
            for _ in raw.parse():
                chunks += 1
                if chunks == 2:
                    loop.call_soon_threadsafe(started.set)
            return raw.headers["x-session-id"], chunks

        http = asyncio.ensure_future(asyncio.to_thread(stream))
        async with asyncio.timeout(60):
            await started.wait()
        (session,) = server.sessions.sessions.values()
        async with client(server) as ws:
            await ws.send(
                {"type": "session.resume", "session_id": session.session_id, "last_seq": 0}
            )
            done, _ = await ws.until("response.done")
        sid, chunks = await asyncio.wait_for(http, 60)
    assert sid == session.session_id and chunks >= 2
    assert done["response"]["status"] in ("completed", "incomplete"), done
