"""The Python client library and the terminal chat against real servers on loopback."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from agent_runtime.bench.launch import serve_process
from agent_runtime.client.agent import (
    AgentClient,
    ClientStateError,
    CodecName,
    DisconnectedError,
    RejectedError,
    RemoteError,
    Response,
)
from agent_runtime.config import RuntimeConfig
from agent_runtime.errors import RequestError
from server.app import Server
from tests.conftest import TIMEOUT, make_config, running_server

ROOT = Path(__file__).resolve().parents[2]
CHAT = [sys.executable, "-m", "agent_runtime", "chat"]  # = ``agent-runtime chat``


def url(server: Server) -> str:
    return f"ws://127.0.0.1:{server.port}/v1/realtime"


async def collect(reply: Response, into: list[str]) -> None:
    async for delta in reply:
        into.append(delta)


@pytest.mark.parametrize("codec", ["json", "msgpack"])
async def test_round_trip_streams_a_reply_and_reports_usage_and_memory(
    config: RuntimeConfig, codec: CodecName
) -> None:
    async with running_server(config) as server, AgentClient(url(server), codec=codec) as c:
        sid = await c.create_session(instructions="You are terse.")
        assert sid.startswith("sess_") and c.session_id == sid
        reply = c.respond("Remember this: my locker code is 7QK2ZP.", max_tokens=12, seed=3)
        deltas = [d async for d in reply]
        assert deltas and "".join(deltas) == reply.text
        assert reply.finished and reply.status in ("completed", "incomplete")
        assert reply.id is not None and reply.id.startswith("resp_")
        assert 1 <= reply.usage["output_tokens"] <= 12
        assert (
            reply.usage["total_tokens"]
            == reply.usage["input_tokens"] + reply.usage["output_tokens"]
        )
        assert set(reply.memory) >= {"retrieved", "written", "entries"}

        stats = await c.memory_stats()
        assert stats.entries == reply.memory["entries"] and stats.capacity > 0
        assert stats.position > reply.usage["input_tokens"]
        assert await c.ping({"n": 1, "text": "héllo"}) == {"n": 1, "text": "héllo"}
        # Every server event seen so far advanced the client's seq (it resumes from there).
        assert c.last_seq >= 5

        second = await c.respond("And again.", max_tokens=4).wait()
        assert second.status in ("completed", "incomplete") and second.id != reply.id

        await c.delete_session()
        assert c.session_id is None
        with pytest.raises(ClientStateError):
            await c.memory_stats()
    async with running_server(config) as server, AgentClient(url(server), codec=codec) as c:
        with pytest.raises(RemoteError) as info:
            await c.resume(sid)
        assert info.value.code == "session_not_found" and info.value.type == "not_found_error"


async def test_cancel_mid_response_ends_it_cancelled(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.generation.max_tokens = 400  # greedy decoding of the tiny model runs to the limit
    async with running_server(config) as server, AgentClient(url(server)) as c:
        await c.create_session()
        reply = c.respond("Tell me a long story.")
        async for _ in reply:
            assert await c.cancel()
        assert reply.status == "cancelled" and reply.reason == "cancelled"
        assert reply.usage["output_tokens"] < 400
        # Nothing left to cancel; the session takes the next turn.
        assert not await c.cancel()
        after = await c.respond("Short one.", max_tokens=3).wait()
        assert after.status in ("completed", "incomplete")


async def test_error_events_raise_a_typed_error_with_code_and_event_id(tmp_path: Path) -> None:
    config = make_config(tmp_path, max_sessions=1)
    async with running_server(config) as server, AgentClient(url(server)) as c:
        await c.create_session()
        with pytest.raises(RemoteError) as info:
            await c.respond("hi", temperature=99.0).wait()
        err = info.value
        assert isinstance(err, RequestError)
        assert (err.type, err.code) == ("invalid_request_error", "invalid_value")
        assert "temperature" in err.message
        assert err.event_id is not None and err.event_id.startswith("evt_cli_")
        assert err.retry_after_ms is None

        with pytest.raises(RemoteError) as info:
            await c.add_item("x" * (config.server.max_message_chars + 1))
        assert info.value.code == "invalid_value" and "content" in info.value.message

        # The session survived both errors.
        assert (await c.respond("still here?", max_tokens=2).wait()).status in (
            "completed",
            "incomplete",
        )

        async with AgentClient(url(server)) as other:
            with pytest.raises(RemoteError) as info:
                await other.create_session()
            assert info.value.code == "overloaded" and info.value.type == "overloaded_error"
            assert info.value.retry_after_ms is not None and info.value.retry_after_ms > 0

            with pytest.raises(RemoteError) as info:
                await other.resume("sess_does_not_exist")
            assert info.value.code == "session_not_found"

        # Handshake failures are client-side errors with the HTTP status.
        with pytest.raises(RejectedError) as rejected:
            await AgentClient(f"ws://127.0.0.1:{server.port}/v2/nowhere").connect()
        assert rejected.value.status_code == 404
        gone = url(server)
    with pytest.raises(DisconnectedError):  # nothing listens there any more
        await AgentClient(gone).connect()


async def test_resume_after_a_dropped_connection_replays_the_missed_events(
    tmp_path: Path,
) -> None:
    config = make_config(tmp_path)
    prompt, params = "Count with me: one two three", {"max_tokens": 300, "seed": 7}
    async with running_server(config) as server:
        async with AgentClient(url(server)) as clean:
            await clean.create_session()
            expected = await clean.respond(prompt, **params).wait()  # type: ignore[arg-type]
        assert expected.usage["output_tokens"] > 10, "the reference reply must be long"

        async with AgentClient(url(server), codec="msgpack") as c:
            sid = await c.create_session()
            reply = c.respond(prompt, **params)  # type: ignore[arg-type]
            first = await anext(reply)
            assert c._ws is not None
            await c._ws.close()  # the connection drops mid-response
            received = [first]
            with pytest.raises(DisconnectedError):  # after what arrived before the drop
                await collect(reply, received)
            assert not reply.finished, "the drop must happen before response.done"
            seq_at_drop = c.last_seq

            info = await c.reconnect()
            assert info is not None and info.id == sid and not info.events_lost
            assert all(e["seq"] > seq_at_drop for e in info.events)
            await collect(reply, received)

        assert reply.status == expected.status
        assert "".join(received) == reply.text == expected.text
        assert reply.usage == expected.usage


async def test_reconnect_without_a_response_resumes_the_session(config: RuntimeConfig) -> None:
    async with running_server(config) as server, AgentClient(url(server)) as c:
        sid = await c.create_session()
        first = await c.respond("Remember: the door code is 4512.", max_tokens=4).wait()
        assert c._ws is not None
        await c._ws.close()
        info = await c.reconnect()
        assert info is not None and info.id == sid and info.turns == 1 and info.replayed == 0
        stats = await c.memory_stats()
        assert stats.entries == first.memory["entries"]


async def test_a_session_resumes_after_a_server_restart_and_keeps_streaming(
    config: RuntimeConfig,
) -> None:
    async with running_server(config) as server:
        c = AgentClient(url(server))
        await c.connect()
        sid = await c.create_session()
        first = await c.respond("Remember: the door code is 4512.", max_tokens=6).wait()
        assert c.last_seq > 3
    # The server shut down (snapshotting the session); a new one serves the same data directory.
    try:
        async with running_server(config) as server:
            c.url = url(server)
            info = await c.reconnect()
            assert info is not None and info.id == sid and info.turns == 1
            assert info.memory_entries == first.memory["entries"]
            # The reloaded session numbers its events afresh; the client follows, so nothing new
            # is mistaken for a replayed duplicate.
            second = c.respond("What is the door code?", max_tokens=6)
            async with asyncio.timeout(TIMEOUT * 3):
                deltas = [d async for d in second]
            assert deltas and second.status in ("completed", "incomplete")
    finally:
        await c.aclose()


# -- the terminal chat ---------------------------------------------------------------------------


@contextmanager
def serve(tmp_path: Path) -> Iterator[str]:
    """``agent-runtime serve`` in a child process on port 0; yields its websocket URL."""
    with serve_process(tmp_path / "data", cwd=tmp_path, timeout=TIMEOUT * 3) as server:
        yield server.url


def chat(args: list[str], stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHAT, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
        cwd=ROOT,
    )


def test_chat_streams_replies_shows_stats_and_resumes_by_session_id(tmp_path: Path) -> None:
    with serve(tmp_path) as ws_url:
        out = chat(
            ["--url", ws_url, "--max-tokens", "8"],
            "Remember this: my locker code is 7QK2ZP.\n\n/stats\nWhat is my locker code?\n/quit\nnever sent\n",
        )
        assert out.returncode == 0, out.stderr
        match = re.search(r"\[session (sess_\w+); resume it with --session \1\]", out.stderr)
        assert match, out.stderr
        sid = match.group(1)
        assert len(re.findall(r"\[(completed|incomplete): \d+ tokens, memory \d+ entries\]", out.stderr)) == 2  # fmt: skip
        assert re.search(r"\[memory: \d+ entries, position \d+;", out.stderr), out.stderr
        assert out.stdout.count("\n") >= 2  # each reply ends with a newline

        # End of input (no /quit) leaves too; the session resumes with its turns, over msgpack.
        again = chat(
            ["--url", ws_url, "--session", sid, "--msgpack", "--max-tokens", "4"], "/stats\n"
        )
        assert again.returncode == 0, again.stderr
        assert f"[resumed session {sid}: 2 turns," in again.stderr

        missing = chat(["--url", ws_url, "--session", "sess_nope"], "")
        assert missing.returncode == 1 and "session_not_found" in missing.stderr


async def test_chat_ctrl_c_during_a_reply_cancels_it(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with running_server(config) as server:
        proc = await asyncio.create_subprocess_exec(
            *CHAT,
            "--url",
            url(server),
            "--max-tokens",
            "5000",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"Tell me a very long story.\n")
            await proc.stdin.drain()
            async with asyncio.timeout(TIMEOUT * 3):
                assert await proc.stdout.read(1), "the reply must start streaming"
            proc.send_signal(signal.SIGINT)
            proc.stdin.write(b"/quit\n")
            await proc.stdin.drain()
            async with asyncio.timeout(TIMEOUT * 3):
                _, stderr_bytes = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = stderr_bytes.decode()
        assert proc.returncode == 0, stderr
        assert "[stopped]" in stderr, stderr


@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("chat_client.py", ["--max-tokens", "6"]),
        ("msgpack_client.py", ["Hello over msgpack!"]),
        ("openai_client.py", ["--max-tokens", "6"]),
    ],
)
async def test_examples_run_against_a_real_server(
    config: RuntimeConfig, script: str, args: list[str]
) -> None:
    async with running_server(config) as server:
        ws_url = url(server)
        argv = [*args, ws_url] if script == "msgpack_client.py" else [ws_url, *args]
        if script == "openai_client.py":
            argv = [f"http://127.0.0.1:{server.port}/v1", *args]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(ROOT / "examples" / script),
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        try:
            async with asyncio.timeout(TIMEOUT * 3):
                _, err = await proc.communicate()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        stderr = err.decode()
        assert proc.returncode == 0, stderr
        assert re.search(r"\[session sess_\w+\]", stderr), stderr
        assert re.search(r"\[(completed|incomplete|stop|length)", stderr), stderr
