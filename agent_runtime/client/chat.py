"""``agent-runtime chat``: a terminal chat client over :class:`~agent_runtime.client.agent.AgentClient`.

Reads one message per line from stdin (a terminal or a pipe), streams each reply to stdout and
prints status lines (the session id, a reply's status, memory stats) to stderr, so stdout holds
only the assistant's text. Ctrl-C during a reply sends ``response.cancel``; Ctrl-C at the prompt,
``/quit`` or end of input leaves. ``/stats`` shows the session's memory statistics. A dropped
connection is resumed (``session.resume`` with the last seen seq) and the reply continues.

    agent-runtime chat [--url ws://127.0.0.1:8765/v1/realtime] [--session ID] [--msgpack]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import TextIO

from agent_runtime.client.agent import (
    AgentClient,
    ClientError,
    CodecName,
    DisconnectedError,
    EventsLostError,
    RemoteError,
    Response,
)

__all__ = ["main"]

HELP = "commands: /stats (memory statistics), /quit (leave); Ctrl-C stops a reply"
RECONNECT_ATTEMPTS = 5


def default_url() -> str:
    """The server ``agent-runtime serve`` would start here: the same env vars pick it."""
    host = os.environ.get("AGENT_RUNTIME_HOST", "127.0.0.1")
    port = os.environ.get("AGENT_RUNTIME_PORT", "8765")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"  # a wildcard bind is reached on loopback from this machine
    return f"ws://[{host}]:{port}/v1/realtime" if ":" in host else f"ws://{host}:{port}/v1/realtime"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime chat", description="Chat with an agent-runtime server in the terminal."
    )
    default = default_url()
    parser.add_argument(
        "--url",
        default=default,
        help=f"websocket endpoint (default {default}: AGENT_RUNTIME_HOST / AGENT_RUNTIME_PORT)",
    )
    parser.add_argument(
        "--session", metavar="ID", help="resume this session instead of creating one"
    )
    parser.add_argument("--msgpack", action="store_true", help="speak msgpack instead of JSON")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AGENT_RUNTIME_API_KEY"),
        help="tenant API key (env AGENT_RUNTIME_API_KEY), sent as Authorization: Bearer",
    )
    parser.add_argument("--instructions", default="", help="system instructions of a new session")
    parser.add_argument("--max-tokens", type=int, help="most tokens per reply (server default)")
    parser.add_argument("--temperature", type=float, help="sampling temperature (server default)")
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra HTTP header of the handshake, e.g. 'Authorization: Bearer KEY' (repeatable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    headers: dict[str, str] = {}
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            print(f"agent-runtime chat: error: bad --header {h!r} (NAME:VALUE)", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    # Replies of an untrained model may hold anything; never die on an unencodable character.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        return asyncio.run(_Chat(args, headers, sys.stdin, sys.stdout, sys.stderr).run())
    except KeyboardInterrupt:
        return 130


class _Chat:
    def __init__(
        self,
        args: argparse.Namespace,
        headers: dict[str, str],
        stdin: TextIO,
        stdout: TextIO,
        stderr: TextIO,
    ) -> None:
        self.args = args
        self.headers = headers
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.interactive = stdin.isatty()
        self.client: AgentClient | None = None
        self.reply: Response | None = None
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()

    def status(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # stdin is read on a daemon thread: a pipe, a file and a tty all work, and a pending
        # read never keeps the process alive at exit.
        threading.Thread(
            target=_read_lines, args=(self.stdin, loop, self.lines), name="chat-stdin", daemon=True
        ).start()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, self.on_interrupt)
        codec: CodecName = "msgpack" if self.args.msgpack else "json"
        try:
            async with AgentClient(
                self.args.url, codec=codec, headers=self.headers, api_key=self.args.api_key
            ) as client:
                self.client = client
                if self.args.session:
                    info = await client.resume(self.args.session, 0)
                    self.status(
                        f"[resumed session {info.id}: {info.turns} turns, "
                        f"{info.memory_entries} memory entries]"
                    )
                else:
                    sid = await client.create_session(self.args.instructions)
                    self.status(f"[session {sid}; resume it with --session {sid}]")
                if self.interactive:
                    self.status(HELP)
                return await self.loop(client)
        except RemoteError as exc:
            self.status(f"agent-runtime chat: error: {exc}")
            return 1
        except ClientError as exc:
            self.status(f"agent-runtime chat: error: {exc}")
            return 1
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)

    async def loop(self, client: AgentClient) -> int:
        while True:
            if self.interactive:
                print("> ", end="", file=self.stdout, flush=True)
            line = await self.lines.get()
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            if text == "/help":
                self.status(HELP)
            elif text == "/stats":
                stats = await client.memory_stats()
                detail = ", ".join(f"{k}={v}" for k, v in stats.raw.items())
                self.status(
                    f"[memory: {stats.entries} entries, position {stats.position}; {detail}]"
                )
            else:
                try:
                    await self.respond(client, line.rstrip("\n"))
                except RemoteError as exc:
                    self.status(f"[error {exc.code}: {exc.message}]")

    async def respond(self, client: AgentClient, text: str) -> None:
        reply = client.respond(
            text, max_tokens=self.args.max_tokens, temperature=self.args.temperature
        )
        self.reply = reply
        attempts = 0
        try:
            while not reply.finished:
                try:
                    async for delta in reply:
                        self.stdout.write(delta)
                        self.stdout.flush()
                except EventsLostError as exc:
                    self.status(f"\n[{exc}]")
                except DisconnectedError:
                    attempts += 1
                    if attempts > RECONNECT_ATTEMPTS:
                        raise
                    self.status("\n[connection lost; resuming]")
                    await asyncio.sleep(min(0.25 * 2**attempts, 4.0))  # back off between retries
                    with contextlib.suppress(DisconnectedError):
                        await client.reconnect()
        finally:
            self.reply = None
        self.stdout.write("\n")
        self.stdout.flush()
        if reply.status == "cancelled":
            self.status("[stopped]")
        else:
            self.status(
                f"[{reply.status}: {reply.usage.get('output_tokens', 0)} tokens, "
                f"memory {reply.memory.get('entries', 0)} entries]"
            )

    def on_interrupt(self) -> None:
        """Ctrl-C: cancel the streaming reply, or leave when there is none."""
        if self.reply is not None and self.client is not None:
            self.status("\n[stopping]")
            task = asyncio.get_running_loop().create_task(
                self._cancel(self.client), name="chat-cancel"
            )
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        else:
            self.lines.put_nowait(None)

    async def _cancel(self, client: AgentClient) -> None:
        with contextlib.suppress(ClientError):
            await client.cancel()


def _read_lines(
    stdin: TextIO, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[str | None]
) -> None:
    # RuntimeError: the loop closed (the chat ended) while this thread still read.
    with contextlib.suppress(RuntimeError):
        try:
            for line in stdin:
                loop.call_soon_threadsafe(queue.put_nowait, line)
        except (OSError, ValueError):  # stdin closed under us
            pass
        loop.call_soon_threadsafe(queue.put_nowait, None)


if __name__ == "__main__":
    raise SystemExit(main())
