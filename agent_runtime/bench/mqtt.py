"""``agent-runtime bench mqtt``: streaming over MQTT vs the websocket, on the same server, in one run.

The benchmark starts a real Mosquitto on a free loopback port (generated config: password file,
ACL) and a real ``python -m agent_runtime serve --mqtt-url ...`` child process, waits until
``/readyz`` says the bridge is connected, then for each N in ``--sessions`` and each of
``--rounds`` rounds runs N sessions over the websocket and N sessions over MQTT (alternating which
goes first). Every session sends one user message and a ``response.create`` with fixed
``max_tokens`` (= ``min_tokens``), temperature 0; every MQTT session is its own device-style
client (its own broker connection, a create request with Response Topic and Correlation Data,
then its ``/in`` and ``/out`` topics).

Reported per (sessions, transport), as ``bench serve`` reports them: ``tokens_per_s``, ``ttft``
p50/p99 and ``itl`` (gaps between consecutive deltas) p50/p99, and per N the ratios MQTT over
websocket (``itl_p50_ratio``: the issue's target is under 1.10 at 8 sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent_runtime.bench.launch import mosquitto_process, serve_process
from agent_runtime.bench.serve import (
    BenchClient,
    Turn,
    finish_turn,
    start_turn,
    summarize,
)
from server.mqtt import MqttPeer

__all__ = ["main"]

START_TIMEOUT_S = 120.0
PREFIX = "agent-runtime/v1"
TENANT = "default"  # the server runs without tenants: the anonymous tenant's topics


class MqttBenchClient:
    """One device: its own broker connection and session."""

    def __init__(self, peer: MqttPeer) -> None:
        self.peer = peer
        self.session_id = ""
        self.n = 0

    async def create(self) -> None:
        reply = f"{PREFIX}/{TENANT}/replies/{uuid.uuid4().hex[:12]}"
        await self.peer.subscribe(reply)
        await self.peer.publish(
            f"{PREFIX}/{TENANT}/sessions/create",
            json.dumps({"type": "session.create"}),
            response_topic=reply,
            correlation=b"bench",
        )
        while True:
            message = await self.peer.receive()
            event = json.loads(message.payload)
            if message.topic == reply and event["type"] == "session.created":
                self.session_id = event["session"]["id"]
                break
            if event["type"] == "error":
                raise RuntimeError(f"server error: {event['error']}")
        await self.peer.subscribe(f"{PREFIX}/{TENANT}/sessions/{self.session_id}/out")

    async def send(self, event: dict[str, Any]) -> None:
        self.n += 1
        event.setdefault("event_id", f"bench_{self.n}")
        topic = f"{PREFIX}/{TENANT}/sessions/{self.session_id}/in"
        await self.peer.publish(topic, json.dumps(event))

    async def recv(self) -> dict[str, Any]:
        message = await self.peer.receive()
        event: dict[str, Any] = json.loads(message.payload)
        return event

    async def turn(self, max_tokens: int) -> Turn:
        return await finish_turn(self, await start_turn(self, max_tokens))

    async def delete(self) -> None:
        await self.send({"type": "session.delete"})


async def run_mqtt(port: int, password: str, sessions: int, max_tokens: int) -> list[Turn]:
    async def one(start: asyncio.Event, ready: asyncio.Queue[None]) -> Turn:
        async with MqttPeer.connect("127.0.0.1", port, TENANT, password) as peer:
            client = MqttBenchClient(peer)
            await client.create()
            await ready.put(None)
            await start.wait()
            turn = await client.turn(max_tokens)
            await client.delete()
            return turn

    start, ready = asyncio.Event(), asyncio.Queue[None]()
    tasks = [asyncio.create_task(one(start, ready)) for _ in range(sessions)]
    async with asyncio.timeout(START_TIMEOUT_S):
        for _ in range(sessions):
            await ready.get()
    start.set()  # every turn starts together, as in bench serve
    async with asyncio.timeout(START_TIMEOUT_S * 4):
        return list(await asyncio.gather(*tasks))


async def run_ws(url: str, sessions: int, max_tokens: int) -> list[Turn]:
    conns = await asyncio.gather(*(BenchClient.open(url) for _ in range(sessions)))
    try:
        return list(await asyncio.gather(*(c.turn(max_tokens) for c in conns)))
    finally:
        await asyncio.gather(*(c.aclose() for c in conns))


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) a process has used so far (0 where /proc is unavailable)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(http: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"{http}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            exc.close()  # not ready yet; closed now, not left to the garbage collector
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the server's MQTT bridge never became ready")
        time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime bench mqtt",
        description="Tokens/s and inter-token latency over MQTT vs the websocket, same server.",
    )
    parser.add_argument("--quick", action="store_true", help="a small run: sessions 1,2, 16 tokens")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--sessions", help="comma-separated concurrent sessions per load (default 1,8)"
    )
    parser.add_argument("--tokens", type=int, help="max_tokens of every response (default 64)")
    parser.add_argument("--rounds", type=int, help="rounds per load and transport (default 3)")
    parser.add_argument("--checkpoint", help="model checkpoint (default: bundled)")
    parser.add_argument("--torch-threads", type=int, help="engine.torch_threads of the server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sessions = [int(x) for x in (args.sessions or ("1,2" if args.quick else "1,8")).split(",")]
    except ValueError:
        print("agent-runtime bench mqtt: --sessions must be integers like 1,8", file=sys.stderr)
        return 2
    if not sessions or min(sessions) < 1:
        print("agent-runtime bench mqtt: --sessions must be positive", file=sys.stderr)
        return 2
    tokens: int = args.tokens or (16 if args.quick else 64)
    rounds: int = args.rounds or (1 if args.quick else 3)
    threads = args.torch_threads or (1 if args.quick else 0)
    extra: list[str] = []
    if args.checkpoint:
        extra += ["--engine-checkpoint", args.checkpoint]
    if threads:
        extra += ["--engine-torch-threads", str(threads)]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    password = secrets.token_urlsafe(16)
    with (
        tempfile.TemporaryDirectory(prefix="agent-runtime-bench-mqtt-") as tmp,
        mosquitto_process(Path(tmp) / "broker", {TENANT: password}) as broker,
    ):
        env = dict(os.environ, AGENT_RUNTIME_MQTT_PASSWORD=broker.bridge_password)
        with serve_process(
            Path(tmp) / "data",
            "--mqtt-url",
            broker.url,
            "--mqtt-username",
            broker.bridge_user,
            *extra,
            env=env,
            timeout=START_TIMEOUT_S,
        ) as server:
            _wait_ready(server.http)
            # Unmeasured warm-up of both paths.
            asyncio.run(run_ws(server.url, 2, 8))
            asyncio.run(run_mqtt(broker.port, password, 2, 8))
            for n in sessions:
                turns: dict[str, list[list[Turn]]] = {"websocket": [], "mqtt": []}
                cpu = {t: [0.0, 0.0] for t in turns}  # server, broker CPU seconds
                for r in range(rounds):
                    order = ["websocket", "mqtt"] if r % 2 == 0 else ["mqtt", "websocket"]
                    for transport in order:
                        pids = (server.proc.pid, broker.proc.pid if broker.proc else None)
                        before = [_cpu_s(pid) for pid in pids]
                        if transport == "websocket":
                            done = asyncio.run(run_ws(server.url, n, tokens))
                        else:
                            done = asyncio.run(run_mqtt(broker.port, password, n, tokens))
                        turns[transport].append(done)
                        for i, pid in enumerate(pids):
                            cpu[transport][i] += _cpu_s(pid) - before[i]
                for transport in ("websocket", "mqtt"):
                    row = {
                        "sessions": n,
                        "transport": transport,
                        **summarize_rounds(turns[transport], tokens),
                    }
                    produced = sum(t.tokens for r in turns[transport] for t in r) or 1
                    row["server_cpu_ms_per_token"] = 1000 * cpu[transport][0] / produced
                    row["broker_cpu_ms_per_token"] = 1000 * cpu[transport][1] / produced
                    rows.append(row)
                    print(
                        f"  sessions={n:<3} {transport:<9} {row['tokens_per_s']:8.1f} tok/s"
                        f"  ITL p50 {row['itl_p50_ms'] or 0:.2f} ms",
                        file=sys.stderr,
                        flush=True,
                    )
    _derive(rows)
    result = {
        "benchmark": "mqtt",
        "meta": {
            "max_tokens": tokens,
            "rounds": rounds,
            "temperature": 0.0,
            "torch_threads": threads or "server default",
            "model": args.checkpoint or "bundled",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.platform(),
            "seconds": round(time.perf_counter() - started, 1),
            "quick": bool(args.quick),
        },
        "rows": rows,
    }
    print(format_table(rows))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


def summarize_rounds(rounds: list[list[Turn]], max_tokens: int) -> dict[str, Any]:
    """``bench serve``'s summary of every round's turns pooled (percentiles over all of them);
    tokens/s and wall time are the mean of the rounds'."""
    row = summarize([t for turns in rounds for t in turns], max_tokens)
    each = [summarize(turns, max_tokens) for turns in rounds]
    row["tokens_per_s"] = sum(r["tokens_per_s"] for r in each) / len(each)
    row["wall_s"] = sum(r["wall_s"] for r in each) / len(each)
    row["rounds"] = len(rounds)
    return row


def _derive(rows: list[dict[str, Any]]) -> None:
    by = {(r["sessions"], r["transport"]): r for r in rows}
    for r in rows:
        if r["transport"] != "mqtt":
            continue
        ws = by[(r["sessions"], "websocket")]
        for key in ("itl_p50_ms", "itl_p99_ms", "ttft_p50_ms", "tokens_per_s"):
            a, b = r.get(key), ws.get(key)
            r[key.replace("_ms", "") + "_ratio"] = a / b if a is not None and b else None


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = (
        "sessions  transport  tokens/s  TTFT p50/p99 ms  ITL p50/p99 ms  ×ws ITL p50  ×ws tok/s"
        "  CPU ms/token server+broker"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['sessions']:>8}  {r['transport']:<9}  {r['tokens_per_s']:8.1f}  "
            f"{_f(r['ttft_p50_ms'], '7.1f')}/{_f(r['ttft_p99_ms'], '<7.1f')}  "
            f"{_f(r['itl_p50_ms'], '6.2f')}/{_f(r['itl_p99_ms'], '<7.2f')}  "
            f"{_f(r.get('itl_p50_ratio'), '11.3f') if r['transport'] == 'mqtt' else ' ' * 11}  "
            f"{_f(r.get('tokens_per_s_ratio'), '9.3f') if r['transport'] == 'mqtt' else ' ' * 9}  "
            f"{r['server_cpu_ms_per_token']:.3f}+{r['broker_cpu_ms_per_token']:.3f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
