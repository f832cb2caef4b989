"""Restart and resume through real server processes: what was acknowledged survives."""

from __future__ import annotations

import asyncio
import signal
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from agent_runtime.bench.launch import ServerProcess, serve_process
from agent_runtime.models.byte.model import save_checkpoint
from agent_runtime.models.llama.hf import save_hf_dir
from tests.conftest import TIMEOUT, Client, tiny_llama_chat, tiny_model

# the tiny Llama's memory plan, as serve flags
LLAMA_FLAGS = (
    "--engine-memory-window",
    "16",
    "--engine-memory-block",
    "8",
    "--engine-memory-k",
    "4",
    "--engine-memory-span",
    "0",
)


def model_args(tmp_path: Path, family: str) -> list[str]:
    """Serve flags for a tiny model of ``family`` saved under ``tmp_path`` (once)."""
    if family == "byte":
        ckpt = tmp_path / "model.pt"
        if not ckpt.exists():
            save_checkpoint(ckpt, tiny_model(11))
        return ["--engine-checkpoint", str(ckpt)]
    directory = tmp_path / "llama"
    if not directory.exists():
        chat = tiny_llama_chat(11)
        save_hf_dir(directory, chat.model.cfg, chat.model.state_dict())
        chat.tokenizer.save(directory)
    return ["--model", str(directory), *LLAMA_FLAGS]


def serve(data: Path, args: list[str]) -> AbstractContextManager[ServerProcess]:
    return serve_process(data, *args, timeout=TIMEOUT * 3)


async def conversation(
    port: int, session_id: str | None, text: str, last_seq: int = 0
) -> tuple[str, str, int]:
    from websockets.asyncio.client import connect

    async with connect(
        f"ws://127.0.0.1:{port}/v1/realtime", subprotocols=["agent-runtime.v1.json"]
    ) as ws:  # type: ignore[list-item]
        c = Client(ws)
        if session_id is None:
            session_id = await c.create_session()
        else:
            await c.send({"type": "session.resume", "session_id": session_id, "last_seq": last_seq})
            resumed, _ = await c.until("session.resumed")
            # A live session replays nothing (the client saw everything); a restarted one has no buffer.
            assert resumed["replayed"] == 0
            # Seqs continue across restarts and are never reused: after a crash the session
            # resumes above every seq it may have sent (its reservation), so possibly with a gap.
            assert resumed["seq"] >= last_seq, "server event seqs never go back"
        reply, done, _ = await c.turn(text, max_tokens=20)
        assert done["response"]["status"] in ("completed", "incomplete")
        return session_id, reply, c.last_seq


def two_turns_with_restart(
    tmp_path: Path, name: str, stop: signal.Signals | None, family: str = "byte"
) -> tuple[str, str]:
    ckpt = model_args(tmp_path, family)
    data = tmp_path / name
    first = "My locker code is 7QK2ZP. " * 6
    with serve(data, ckpt) as server:
        sid, reply1, seq = asyncio.run(conversation(server.port, None, first))
        if stop is not None:
            server.stop(stop, timeout=TIMEOUT * 3)
            with serve(data, ckpt) as again:
                _, reply2, _ = asyncio.run(
                    conversation(again.port, sid, "What is my locker code?", seq)
                )
        else:
            _, reply2, _ = asyncio.run(
                conversation(server.port, sid, "What is my locker code?", seq)
            )
    return reply1, reply2


@pytest.mark.parametrize("family", ["byte", "llama"])
def test_conversation_resumes_identically_after_graceful_restart_and_after_kill_9(
    tmp_path: Path, family: str
) -> None:
    """Greedy replies after a restart equal those of an uninterrupted server: the bank and the
    rolling window state came back exactly (and a kill -9 loses nothing acknowledged), for
    the byte model and for a pretrained-family model served with ``--model``."""
    baseline = two_turns_with_restart(tmp_path, "uninterrupted", None, family)
    assert all(baseline), "both replies have text (else equality proves little)"
    assert two_turns_with_restart(tmp_path, "sigterm", signal.SIGTERM, family) == baseline
    assert two_turns_with_restart(tmp_path, "sigkill", signal.SIGKILL, family) == baseline


async def _resume_error(port: int, session_id: str) -> dict[str, object]:
    """``session.resume`` on a fresh connection: the error event, then a ping still answered."""
    from websockets.asyncio.client import connect

    async with connect(
        f"ws://127.0.0.1:{port}/v1/realtime", subprotocols=["agent-runtime.v1.json"]
    ) as ws:  # type: ignore[list-item]
        c = Client(ws)
        await c.send({"type": "session.resume", "session_id": session_id, "last_seq": 0})
        error, _ = await c.until("error")
        await c.send({"type": "ping"})
        await c.until("pong")  # the connection stays usable
        return error


def test_a_session_of_another_model_is_refused_by_name_and_kept_for_the_model_that_wrote_it(
    tmp_path: Path,
) -> None:
    """The upgrade path of the default model's change (docs/models.md, "The default"): a session
    the byte model wrote, resumed by a server serving a pretrained decoder, is refused with
    ``session_unreadable`` (the log says which model this server serves, never the content);
    its files are untouched, so serving the byte model again resumes it."""
    byte, llama = model_args(tmp_path, "byte"), model_args(tmp_path, "llama")
    data = tmp_path / "data"
    secret = "My locker code is 7QK2ZP."
    with serve(data, byte) as server:
        sid, _, seq = asyncio.run(conversation(server.port, None, secret))
    with serve(data, llama) as other:
        error = asyncio.run(_resume_error(other.port, sid))
        log = other.log_text()
    assert error["error"]["code"] == "session_unreadable", error  # type: ignore[index]
    assert "this server serves llama" in log and "--engine-memory-layers" in log, log[-2000:]
    assert "7QK2ZP" not in log and "Traceback" not in log
    with serve(data, byte) as again:
        _, reply, _ = asyncio.run(conversation(again.port, sid, "What is my locker code?", seq))
    assert reply, "the byte model resumed its session and answered"
