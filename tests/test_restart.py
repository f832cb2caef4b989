"""Restart and resume through real server processes: what was acknowledged survives."""

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

from agent_runtime.model import save_checkpoint
from tests.conftest import TIMEOUT, Client, tiny_model


@contextmanager
def serve(data: Path, checkpoint: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent_runtime",
            "--log-level",
            "WARNING",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(data),
            "--engine-checkpoint",
            str(checkpoint),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r":(\d+)/v1/realtime", line)
        assert match, line
        yield proc, int(match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


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
            assert resumed["seq"] == last_seq, "server event seqs continue across restarts"
        reply, done, _ = await c.turn(text, max_tokens=20)
        assert done["response"]["status"] in ("completed", "incomplete")
        return session_id, reply, c.last_seq


def two_turns_with_restart(
    tmp_path: Path, name: str, stop: signal.Signals | None
) -> tuple[str, str]:
    ckpt = tmp_path / "model.pt"
    if not ckpt.exists():
        save_checkpoint(ckpt, tiny_model(11))
    data = tmp_path / name
    first = "My locker code is 7QK2ZP. " * 6
    with serve(data, ckpt) as (proc, port):
        sid, reply1, seq = asyncio.run(conversation(port, None, first))
        if stop is not None:
            proc.send_signal(stop)
            proc.wait(timeout=TIMEOUT * 3)
            with serve(data, ckpt) as (_proc2, port2):
                _, reply2, _ = asyncio.run(conversation(port2, sid, "What is my locker code?", seq))
        else:
            _, reply2, _ = asyncio.run(conversation(port, sid, "What is my locker code?", seq))
    return reply1, reply2


def test_conversation_resumes_identically_after_graceful_restart_and_after_kill_9(
    tmp_path: Path,
) -> None:
    """Greedy replies after a restart equal those of an uninterrupted server: the bank and the
    rolling window state came back exactly (and a kill -9 loses nothing acknowledged)."""
    baseline = two_turns_with_restart(tmp_path, "uninterrupted", None)
    assert two_turns_with_restart(tmp_path, "sigterm", signal.SIGTERM) == baseline
    assert two_turns_with_restart(tmp_path, "sigkill", signal.SIGKILL) == baseline
