"""``agent-runtime bench serve``: serving throughput and latency, batched vs unbatched.

For each engine mode (continuous batching on, then off) the benchmark starts a real
``python -m agent_runtime serve`` on a loopback port, so the clients' event loop never competes
with the server's for the GIL, and drives it with N concurrent websocket clients for each N in
``--clients``. Every client creates a session, then (all at once) sends one user message and a
``response.create`` with fixed ``max_tokens``, temperature 0 and no stop sequences. Per client it
records the time of every ``response.output_text.delta`` and the ``usage`` of ``response.done``.

Reported per (clients, batching):

* ``tokens_per_s`` — every client's ``output_tokens`` over the wall time from the first
  ``response.create`` to the last ``response.done``. A model that ends early (END) produces
  fewer tokens; only tokens actually produced count.
* ``ttft`` — ``response.create`` sent → first delta received, p50/p99 over clients.
* ``itl`` — gaps between consecutive deltas of one response, p50/p99 over every gap. A client
  that falls behind gets coalesced deltas (several tokens in one), so ``tpot`` also reports
  (last delta − first delta) / (tokens − 1) per response, p50/p99 over clients.

The *slow reader* scenario runs ``--slow-others`` clients alone, then again next to one client
that stops reading (a tiny socket receive buffer, so backpressure reaches the server quickly) and
compares the others' p99 inter-token latency: a slow client must never stall the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from agent_runtime.bench.launch import serve_process

__all__ = ["main"]

SUBPROTOCOL = Subprotocol("agent-runtime.v1.json")
PROMPT = "Tell me everything you know about the sea, the ships and the lighthouses."
START_TIMEOUT_S = 120.0
LONG_REPLY_TOKENS = 1_000_000  # a reply that outlasts every measurement (it is cancelled)


@dataclass
class Turn:
    """One client's measurements of one response."""

    sent: float = 0.0
    deltas: list[float] = field(default_factory=list)  # arrival time of each delta
    done: float = 0.0
    tokens: int = 0
    status: str = ""

    @property
    def ttft(self) -> float | None:
        return self.deltas[0] - self.sent if self.deltas else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.deltas, self.deltas[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        if self.tokens < 2 or len(self.deltas) < 2:
            return None
        return (self.deltas[-1] - self.deltas[0]) / (self.tokens - 1)


class EventPeer(Protocol):
    """What a benchmark turn needs of a client: send and receive protocol events."""

    async def send(self, event: dict[str, Any]) -> None: ...

    async def recv(self) -> dict[str, Any]: ...


async def start_turn(client: EventPeer, max_tokens: int) -> Turn:
    """Send one fixed-length turn (a user message and a response.create) on ``client``."""
    await client.send(
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": PROMPT},
        }
    )
    turn = Turn(sent=time.perf_counter())
    await client.send(
        {
            "type": "response.create",
            # min_tokens: fixed-length replies whatever the model (it may not end early).
            "response": {
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "temperature": 0.0,
                "stop": [],
            },
        }
    )
    return turn


async def finish_turn(client: EventPeer, turn: Turn) -> Turn:
    """Receive the turn's deltas and its response.done, timing each."""
    while True:
        event = await client.recv()
        kind = event["type"]
        if kind == "response.output_text.delta":
            turn.deltas.append(time.perf_counter())
        elif kind == "response.done":
            turn.done = time.perf_counter()
            turn.tokens = int(event["response"]["usage"]["output_tokens"])
            turn.status = str(event["response"]["status"])
            return turn
        elif kind == "error" and event["error"]["code"] != "no_active_response":
            raise RuntimeError(f"server error: {event['error']}")


class BenchClient:
    """A raw protocol client with arrival timestamps (the library client would add its own hops)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.n = 0

    @classmethod
    async def open(cls, url: str, *, slow: bool = False) -> BenchClient:
        sock: socket.socket | None = None
        if slow:
            # A small receive buffer and a one-frame queue: once this client stops reading, the
            # server's writes block after a few kilobytes instead of filling megabytes of buffers.
            host, port = _host_port(url)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
        ws = await connect(
            url,
            subprotocols=[SUBPROTOCOL],
            compression=None,
            max_size=None,
            open_timeout=START_TIMEOUT_S,
            max_queue=1 if slow else 16,
            sock=sock,
        )
        client = cls(ws)
        await client.send({"type": "session.create"})
        await client.until("session.created")
        return client

    async def send(self, event: dict[str, Any]) -> None:
        self.n += 1
        event.setdefault("event_id", f"bench_{self.n}")
        await self.ws.send(json.dumps(event))

    async def recv(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await self.ws.recv())
        return event

    async def until(self, kind: str) -> dict[str, Any]:
        while True:
            event = await self.recv()
            if event["type"] == kind:
                return event
            if event["type"] == "error" and kind != "response.done":
                raise RuntimeError(f"server error: {event['error']}")

    async def start_turn(self, max_tokens: int) -> Turn:
        return await start_turn(self, max_tokens)

    async def finish_turn(self, turn: Turn) -> Turn:
        return await finish_turn(self, turn)

    async def turn(self, max_tokens: int) -> Turn:
        return await self.finish_turn(await self.start_turn(max_tokens))

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.send({"type": "session.delete"})
            async with asyncio.timeout(30):
                await self.until("session.deleted")
        await self.ws.close()


def _host_port(url: str) -> tuple[str, int]:
    match = re.match(r"wss?://([^:/]+):(\d+)", url)
    if not match:
        raise ValueError(f"cannot parse host and port from {url!r}")
    return match.group(1), int(match.group(2))


def _ms(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile in milliseconds; None without samples (e.g. one-token replies)."""
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summarize(turns: Sequence[Turn], max_tokens: int) -> dict[str, Any]:
    started = min(t.sent for t in turns)
    ended = max(t.done for t in turns)
    tokens = sum(t.tokens for t in turns)
    ttfts = [x for x in (t.ttft for t in turns) if x is not None]
    gaps = [g for t in turns for g in t.gaps]
    tpots = [x for x in (t.tpot for t in turns) if x is not None]
    deltas = sum(len(t.deltas) for t in turns)
    return {
        "tokens_per_s": tokens / (ended - started) if ended > started else 0.0,
        "ttft_p50_ms": _ms(ttfts, 50),
        "ttft_p99_ms": _ms(ttfts, 99),
        "itl_p50_ms": _ms(gaps, 50),
        "itl_p99_ms": _ms(gaps, 99),
        "tpot_p50_ms": _ms(tpots, 50),
        "tpot_p99_ms": _ms(tpots, 99),
        "output_tokens": tokens,
        "max_tokens": max_tokens,
        "ended_early": sum(t.tokens < max_tokens for t in turns),
        "deltas_per_token": deltas / tokens if tokens else 0.0,
        "wall_s": ended - started,
    }


async def run_load(url: str, clients: int, max_tokens: int) -> dict[str, Any]:
    """N clients, one session and one turn each, all turns started together."""
    conns = await asyncio.gather(*(BenchClient.open(url) for _ in range(clients)))
    try:
        turns = await asyncio.gather(*(c.turn(max_tokens) for c in conns))
    finally:
        await asyncio.gather(*(c.aclose() for c in conns))
    return summarize(turns, max_tokens)


async def run_slow_reader(url: str, others: int, max_tokens: int, fill: int) -> dict[str, Any]:
    """The others' latency beside a long reply that is read, then beside one that is not.

    Both long replies are in the batch the whole time, so the comparison isolates what a client
    that stops reading costs the others (their latency alone is reported too).
    """
    alone = await run_load(url, others, max_tokens)
    reading, _ = await _beside_long_reply(url, others, max_tokens, fill, slow=False)
    beside, slow_turn = await _beside_long_reply(url, others, max_tokens, fill, slow=True)
    return {
        "others": others,
        "max_tokens": max_tokens,
        "fill_tokens": fill,
        "itl_p50_ms_alone": alone["itl_p50_ms"],
        "itl_p99_ms_alone": alone["itl_p99_ms"],
        "itl_p50_ms_beside_reader": reading["itl_p50_ms"],
        "itl_p99_ms_beside_reader": reading["itl_p99_ms"],
        "itl_p50_ms_with_slow_reader": beside["itl_p50_ms"],
        "itl_p99_ms_with_slow_reader": beside["itl_p99_ms"],
        "tokens_per_s_alone": alone["tokens_per_s"],
        "tokens_per_s_beside_reader": reading["tokens_per_s"],
        "tokens_per_s_with_slow_reader": beside["tokens_per_s"],
        "slow_reader_tokens": slow_turn.tokens,
        "slow_reader_deltas": len(slow_turn.deltas),
        "slow_reader_status": slow_turn.status,
    }


async def _beside_long_reply(
    url: str, others: int, max_tokens: int, fill: int, *, slow: bool
) -> tuple[dict[str, Any], Turn]:
    """Run ``others`` clients next to one client streaming a very long reply.

    The long reply first generates ``fill`` tokens (watched on /metrics) so that, when its client
    does not read (``slow``), the socket buffers are full and the server is really blocked
    writing to it while the others are measured.
    """
    long = await BenchClient.open(url, slow=slow)
    conns = await asyncio.gather(*(BenchClient.open(url) for _ in range(others)))
    reader: asyncio.Task[Turn] | None = None
    try:
        base = await _tokens_generated(url)
        long_turn = await long.start_turn(LONG_REPLY_TOKENS)
        if not slow:
            reader = asyncio.create_task(long.finish_turn(long_turn), name="bench-long-reader")
        if base is not None:
            await _wait_for_tokens(url, base + fill)
        turns = await asyncio.gather(*(c.turn(max_tokens) for c in conns))
        await long.send({"type": "response.cancel"})
        async with asyncio.timeout(START_TIMEOUT_S):
            await (reader if reader is not None else long.finish_turn(long_turn))
    finally:
        if reader is not None and not reader.done():
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        await asyncio.gather(*(c.aclose() for c in [*conns, long]))
    return summarize(turns, max_tokens), long_turn


async def _wait_for_tokens(url: str, target: float) -> None:
    """Poll the server's token counter (an HTTP metric: there is no event to await)."""
    async with asyncio.timeout(START_TIMEOUT_S):
        for _ in itertools.count():
            n = await _tokens_generated(url)
            if n is None or n >= target:
                return
            await asyncio.sleep(0.05)


async def _tokens_generated(url: str) -> float | None:
    """The server's ``agent_runtime_tokens_generated_total`` (None if it does not export it)."""
    host, port = _host_port(url)

    def get() -> str:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as resp:
            return str(resp.read().decode("utf-8"))

    match = re.search(
        r"^agent_runtime_tokens_generated_total (\S+)$", await asyncio.to_thread(get), re.M
    )
    return float(match.group(1)) if match else None


@contextmanager
def serve(data_dir: Path, *, batching: bool, extra: Sequence[str]) -> Iterator[str]:
    """``agent-runtime serve`` in a child process on a free loopback port; yields its websocket URL."""
    flag = "true" if batching else "false"
    # The slow-reader scenario asks for a reply longer than the default max_tokens ceiling.
    limit = ["--generation-max-tokens-limit", str(LONG_REPLY_TOKENS)]
    with serve_process(
        data_dir, "--engine-batching", flag, *limit, *extra, timeout=START_TIMEOUT_S
    ) as server:
        yield server.url


def _clients(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--clients must be integers like 1,8,32, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--clients must be positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime bench serve",
        description="Serving throughput and latency with concurrent websocket clients, batched vs unbatched.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small run (< 30 s): clients 1,4, 16 tokens"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--clients", type=_clients, help="concurrent clients per load (default 1,8,32,128)"
    )
    parser.add_argument("--tokens", type=int, help="max_tokens of every response (default 64)")
    parser.add_argument(
        "--slow-others", type=int, help="clients beside the slow reader (default 31; 0 skips)"
    )
    parser.add_argument(
        "--max-batch", type=int, help="engine.max_batch of the server (default: its default)"
    )
    parser.add_argument("--checkpoint", help="model checkpoint (default: bundled, else untrained)")
    parser.add_argument("--device", help="torch device of the server (default: its default)")
    parser.add_argument(
        "--torch-threads",
        type=int,
        help="engine.torch_threads of the server (default: its default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    clients: list[int] = args.clients or ([1, 4] if args.quick else [1, 8, 32, 128])
    tokens: int = args.tokens or (16 if args.quick else 64)
    others: int = args.slow_others if args.slow_others is not None else (3 if args.quick else 31)
    extra: list[str] = []
    if args.max_batch:
        extra += ["--engine-max-batch", str(args.max_batch)]
    if args.checkpoint:
        extra += ["--engine-checkpoint", args.checkpoint]
    if args.device:
        extra += ["--engine-device", args.device]
    # One intra-op thread in --quick: on a small shared CI machine torch's default thread pool
    # oversubscribes the cores and a token takes 20x longer.
    threads = args.torch_threads or (1 if args.quick else 0)
    if threads:
        extra += ["--engine-torch-threads", str(threads)]
    live = max(max(clients), others + 1)  # sessions are deleted after each load
    if live > 256:  # the server's default per-tenant limit
        extra += ["--max-sessions-per-tenant", str(live), "--max-sessions", str(max(1024, live))]

    rows: list[dict[str, Any]] = []
    slow_reader: dict[str, Any] | None = None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="agent-runtime-bench-") as tmp:
        for batching in (True, False):
            with serve(Path(tmp) / f"data-{int(batching)}", batching=batching, extra=extra) as url:
                # Unmeasured warm-up: first-call costs (allocator, kernels, FAISS) stay out.
                asyncio.run(run_load(url, min(4, max(clients)), 8))
                for n in clients:
                    row = {
                        "clients": n,
                        "batching": batching,
                        **asyncio.run(run_load(url, n, tokens)),
                    }
                    rows.append(row)
                    print(
                        f"  clients={n:<4} batching={batching!s:<5} {row['tokens_per_s']:8.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
                if batching and others > 0:
                    fill = 256 if args.quick else 2048
                    slow_reader = asyncio.run(run_slow_reader(url, others, tokens, fill))
    _derive(rows)
    result = {
        "benchmark": "serve",
        "meta": _meta(args, tokens, time.perf_counter() - started),
        "rows": rows,
        "slow_reader": slow_reader,
    }
    print(format_table(rows, slow_reader))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


def _derive(rows: list[dict[str, Any]]) -> None:
    """Batched/unbatched throughput ratio and scaling against one client, per mode."""
    by = {(r["clients"], r["batching"]): r for r in rows}
    for r in rows:
        one = by.get((1, r["batching"]))
        r["scaling_vs_1_client"] = (
            r["tokens_per_s"] / one["tokens_per_s"] if one and one["tokens_per_s"] else None
        )
        other = by.get((r["clients"], not r["batching"]))
        if r["batching"] and other and other["tokens_per_s"]:
            r["batched_over_unbatched"] = r["tokens_per_s"] / other["tokens_per_s"]


def _meta(args: argparse.Namespace, tokens: int, seconds: float) -> dict[str, Any]:
    from agent_runtime.models.byte import BUNDLED_CHECKPOINT

    model = args.checkpoint or (
        str(BUNDLED_CHECKPOINT.name) if BUNDLED_CHECKPOINT.is_file() else "untrained default"
    )
    return {
        "model": model,
        "device": args.device or "cpu (server default)",
        "max_tokens": tokens,
        "temperature": 0.0,
        "max_batch": args.max_batch or "server default",
        "torch_threads": args.torch_threads or (1 if args.quick else "server default"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.platform(),
        "seconds": round(seconds, 1),
        "quick": bool(args.quick),
    }


def format_table(rows: Sequence[dict[str, Any]], slow: dict[str, Any] | None) -> str:
    head = "clients  batching  tokens/s  ×unbatched  ×1 client  TTFT p50/p99 ms  ITL p50/p99 ms  TPOT p50/p99 ms  tokens (early END)"
    lines = [head, "-" * len(head)]
    for r in sorted(rows, key=lambda r: (r["clients"], not r["batching"])):
        ratio = r.get("batched_over_unbatched")
        scale = r.get("scaling_vs_1_client")
        lines.append(
            f"{r['clients']:>7}  {'on' if r['batching'] else 'off':>8}  {r['tokens_per_s']:8.1f}  "
            f"{f'{ratio:.2f}' if ratio else '':>10}  {f'{scale:.2f}' if scale else '':>9}  "
            f"{_f(r['ttft_p50_ms'], '7.1f')}/{_f(r['ttft_p99_ms'], '<7.1f')}  "
            f"{_f(r['itl_p50_ms'], '6.1f')}/{_f(r['itl_p99_ms'], '<7.1f')}  "
            f"{_f(r['tpot_p50_ms'], '7.1f')}/{_f(r['tpot_p99_ms'], '<7.1f')}  "
            f"{r['output_tokens']} ({r['ended_early']})"
        )
    if slow is not None:
        lines.append("")
        lines.append(
            f"slow reader: {slow['others']} clients' ITL p50/p99 "
            f"{_f(slow['itl_p50_ms_alone'], '.1f')}/{_f(slow['itl_p99_ms_alone'], '.1f')} ms alone, "
            f"{_f(slow['itl_p50_ms_beside_reader'], '.1f')}/{_f(slow['itl_p99_ms_beside_reader'], '.1f')} ms "
            "beside a long reply that is read, "
            f"{_f(slow['itl_p50_ms_with_slow_reader'], '.1f')}/{_f(slow['itl_p99_ms_with_slow_reader'], '.1f')} ms "
            "beside one whose client stopped reading ("
            f"the slow reader got {slow['slow_reader_tokens']} tokens in {slow['slow_reader_deltas']} "
            "deltas: fewer deltas than tokens means its output was coalesced while it lagged)"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
