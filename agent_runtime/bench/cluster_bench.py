"""``agent-runtime bench cluster``: failover time, throughput with 1, 2 and 3 nodes, and the
per-turn costs (Redis commands, lease renewals, shared-storage bytes) the capacity model in
``docs/scaling.md`` is built from.

Everything runs on loopback in one :class:`~agent_runtime.bench.cluster.Cluster`: a private
``redis-server`` and up to three ``python -m agent_runtime serve --cluster-enabled`` nodes
sharing one data root.

**Throughput.** For each node count k in ``--nodes`` (ascending; nodes are started as k grows),
the same offered load: S sessions, created round-robin on the k nodes (so each is owned by the
node it was created on), each doing T turns one after another, all sessions at once. Every turn
is ``bench serve``'s fixed-length turn (``max_tokens = min_tokens``, temperature 0). Reported per
k: ``tokens_per_s`` and ``turns_per_s`` (over the wall time from the first turn sent to the last
``response.done``), TTFT p50/p99, the nodes' CPU seconds, and the ratios against one node.
On a machine with fewer cores than nodes the nodes share the cores: the ratio is then bounded by
the CPU (``cpu_busy`` says how busy the machine's cores were), not by the cluster.

**Redis and storage costs** (measured around the throughput load with the most nodes):
``INFO commandstats`` of the harness's Redis before and after the load gives Redis commands per
turn (every command, those run inside Lua scripts included; the lease renewals that fell inside
the window are counted apart); an idle window with the sessions open gives lease-renewal scripts
per second per session. The session directories' bytes before and after the load over the
tokens the sessions processed (their ``position`` moved by it: prompt and reply tokens) give
shared-storage bytes per token; the nodes' ``write_bytes`` (``/proc/PID/io``) cross-check it.

**Failover.** With three nodes, R rounds: a session is created on node ``r % 3`` and does a few
turns (each acknowledged by its ``response.done``); a long reply is started, and after a few
deltas that node is killed with ``kill -9``. An :class:`~agent_runtime.client.agent.AgentClient`
given the other nodes' URLs resumes the session (following the ``session_elsewhere`` redirect,
retrying while the dead owner's lease runs out) and sends a new turn. Reported: kill → resumed
and kill → first token of the new reply, p50/p99, with the lease TTL used; and per round whether
an acknowledged turn was lost (the resumed session's turn count and memory entries must be at
least what they were before the kill). The killed node is restarted before the next round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect

from agent_runtime.bench.cluster import Cluster
from agent_runtime.bench.mqtt import _cpu_s
from agent_runtime.bench.serve import (
    LONG_REPLY_TOKENS,
    SUBPROTOCOL,
    BenchClient,
    Turn,
    start_turn,
    summarize,
)
from agent_runtime.client.agent import AgentClient

__all__ = ["main"]

START_TIMEOUT_S = 120.0
FAILOVER_TIMEOUT_S = 120.0
DELTAS_BEFORE_KILL = 4  # the reply is really streaming when its node dies
ACKNOWLEDGED = ("completed", "incomplete")  # docs/reliability.md: "What acknowledged means"
KEY_PREFIX = "agent-runtime"  # store.key_prefix's default (the nodes run with it)


# -- Redis INFO over a raw socket (the bench needs one command; redis-py lives in sessions/) ----


def redis_call(port: int, *args: str) -> int | str | None:
    """One command to the Redis on ``127.0.0.1:port``; its integer or bulk-string reply."""
    request = f"*{len(args)}\r\n" + "".join(f"${len(x.encode())}\r\n{x}\r\n" for x in args)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request.encode())
        data = b""
        while b"\r\n" not in data:
            data += s.recv(65536)
        header, _, body = data.partition(b"\r\n")
        kind, value = header[:1], header[1:].decode()
        if kind == b":":
            return int(value)
        if kind == b"$":
            size = int(value)
            if size < 0:
                return None
            while len(body) < size:
                body += s.recv(65536)
            return body[:size].decode()
        raise RuntimeError(f"unexpected Redis reply to {args[0]}: {header!r}")


def redis_info(port: int, section: str = "commandstats") -> dict[str, dict[str, float]]:
    """``INFO <section>`` of the Redis on ``127.0.0.1:port``: ``{"evalsha": {"calls": ...}}``."""
    stats: dict[str, dict[str, float]] = {}
    for line in str(redis_call(port, "INFO", section)).splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line.partition(":")
        values = dict(kv.split("=", 1) for kv in fields.split(","))
        stats[name.removeprefix("cmdstat_")] = {
            k: float(v) for k, v in values.items() if k in ("calls", "usec")
        }
    return stats


# The lease renewal round's commands: per session one EVAL (pipelined, one round trip per
# node) running a GET and a PEXPIRE. Acquisitions and releases are EVALSHAs.
RENEWAL_COMMANDS = ("eval", "pexpire")


def renewal_commands(commands: dict[str, int]) -> int:
    """Commands of the lease renewals among ``commands`` (every EVAL is a renewal; as many
    GETs as EVALs ran inside them)."""
    scripts = commands.get("eval", 0)
    return sum(commands.get(k, 0) for k in RENEWAL_COMMANDS) + min(commands.get("get", 0), scripts)


def command_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, int]:
    """Calls per command between two ``INFO commandstats`` (only commands that ran; INFO itself
    is left out: it is the bench's own)."""
    delta = {
        name: int(v["calls"] - before.get(name, {}).get("calls", 0.0))
        for name, v in after.items()
        if name != "info"
    }
    return {k: v for k, v in sorted(delta.items()) if v > 0}


def command_usec(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, float]:
    """Microseconds Redis spent per command between two ``INFO commandstats``. A script's
    EVALSHA time includes the commands it ran, which are also listed under their own names."""
    delta = {
        name: v.get("usec", 0.0) - before.get(name, {}).get("usec", 0.0)
        for name, v in after.items()
        if name != "info"
    }
    return {k: v for k, v in sorted(delta.items()) if v > 0}


def storage_by_part(sessions_root: Path) -> dict[str, int]:
    """Bytes under every session directory, by part: ``bank`` (snapshots + log), ``state.pt``,
    everything else (seq, fence, privacy ledger)."""
    parts = {"bank": 0, "state": 0, "other": 0}
    if not sessions_root.is_dir():
        return parts
    for tenant in sessions_root.iterdir():
        for session in tenant.iterdir() if tenant.is_dir() else ():
            for entry in session.iterdir():
                key = (
                    "bank"
                    if entry.name == "bank"
                    else "state"
                    if entry.name == "state.pt"
                    else "other"
                )
                parts[key] += tree_bytes(entry) if entry.is_dir() else _size(entry)
    return parts


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def tree_bytes(root: Path) -> int:
    """Bytes of every regular file under ``root`` (0 if it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):  # a temp file renamed away meanwhile
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _write_bytes(pid: int) -> int:
    """Bytes a process caused to be written to storage (``/proc/PID/io``; 0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ms(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values) * 1000.0, q)) if values else None


# -- one raw session (fixed-length turns, memory stats) -----------------------------------------


async def open_session(url: str) -> tuple[BenchClient, str]:
    ws = await connect(
        url, subprotocols=[SUBPROTOCOL], compression=None, max_size=None,
        open_timeout=START_TIMEOUT_S,
    )  # fmt: skip
    client = BenchClient(ws)
    await client.send({"type": "session.create"})
    created = await client.until("session.created")
    return client, str(created["session"]["id"])


async def memory_stats(client: BenchClient) -> tuple[int, int]:
    """(memory entries, position) of the client's session."""
    await client.send({"type": "memory.stats"})
    event = await client.until("memory.stats")
    return int(event["memory"].get("entries", 0)), int(event.get("position", 0))


# -- throughput ---------------------------------------------------------------------------------


async def run_load(
    urls: Sequence[str], sessions: int, turns: int, max_tokens: int, cluster: Cluster,
    idle_s: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """S sessions round-robin over ``urls``, T turns each, all sessions at once; the Redis
    commands and storage bytes around the turns; then (``idle_s``) an idle window."""
    opened = await asyncio.gather(*(open_session(urls[i % len(urls)]) for i in range(sessions)))
    clients = [c for c, _ in opened]
    sessions_root = cluster.data_dir / "sessions"
    pids = [n.proc.pid for n in cluster.nodes if n is not None]
    try:
        start_pos = [p for _, p in await asyncio.gather(*(memory_stats(c) for c in clients))]
        others = [os.getpid(), cluster.redis.proc.pid if cluster.redis.proc else None]
        cpu0 = [_cpu_s(pid) for pid in pids]
        other0 = [_cpu_s(pid) for pid in others]
        io0 = [_write_bytes(pid) for pid in pids]
        bytes0 = tree_bytes(sessions_root)
        parts0 = storage_by_part(sessions_root)
        redis0 = redis_info(cluster.redis.port)
        t0 = time.monotonic()

        async def session_turns(client: BenchClient) -> list[Turn]:
            return [await client.turn(max_tokens) for _ in range(turns)]

        done = await asyncio.gather(*(session_turns(c) for c in clients))
        window_s = time.monotonic() - t0
        redis1 = redis_info(cluster.redis.port)
        cpu1 = [_cpu_s(pid) for pid in pids]
        other1 = [_cpu_s(pid) for pid in others]
        stats = await asyncio.gather(*(memory_stats(c) for c in clients))
        bytes1 = tree_bytes(sessions_root)
        parts1 = storage_by_part(sessions_root)
        io1 = [_write_bytes(pid) for pid in pids]
        idle: dict[str, Any] | None = None
        if idle_s > 0:
            r0, i0 = redis_info(cluster.redis.port), time.monotonic()
            await asyncio.sleep(idle_s)
            r1 = redis_info(cluster.redis.port)
            idle_cmds, idle_usec = command_delta(r0, r1), command_usec(r0, r1)
            idle_s = time.monotonic() - i0
            idle = {
                "seconds": idle_s,
                "sessions": sessions,
                "commands": idle_cmds,
                "renewals_per_s_per_session": idle_cmds.get("eval", 0) / idle_s / sessions,
                "commands_per_s_per_session": sum(idle_cmds.values()) / idle_s / sessions,
                "usec": idle_usec,
                # EVAL's time includes its GET and PEXPIRE.
                "redis_usec_per_renewal": (
                    idle_usec.get("eval", 0.0) / idle_cmds["eval"]
                    if idle_cmds.get("eval")
                    else None
                ),
            }
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    all_turns = [t for ts in done for t in ts]
    row = summarize(all_turns, max_tokens)
    row["turns"] = len(all_turns)
    row["turns_per_s"] = len(all_turns) / row["wall_s"] if row["wall_s"] else 0.0
    row["turns_acknowledged"] = sum(t.status in ACKNOWLEDGED for t in all_turns)
    cpu_s = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
    row["nodes_cpu_s"] = cpu_s
    row["bench_client_cpu_s"] = other1[0] - other0[0]
    row["redis_cpu_s"] = other1[1] - other0[1]
    # Share of the machine's cores busy in the window: the nodes, the bench's clients, Redis.
    row["cpu_busy"] = (
        (cpu_s + row["bench_client_cpu_s"] + row["redis_cpu_s"]) / window_s / (os.cpu_count() or 1)
    )
    row["cpu_ms_per_token"] = 1000 * cpu_s / row["output_tokens"] if row["output_tokens"] else None
    commands = command_delta(redis0, redis1)
    usec = command_usec(redis0, redis1)
    turn_usec = sum(v for k, v in usec.items() if k not in (*RENEWAL_COMMANDS, "get"))
    tokens_in = sum(p for _, p in stats) - sum(start_pos)
    storage = bytes1 - bytes0
    row["costs"] = {
        "window_s": window_s,
        "redis_commands": commands,
        "redis_commands_per_turn": sum(commands.values()) / len(all_turns),
        "renewal_scripts_in_window": commands.get("eval", 0),
        "redis_usec": usec,
        "redis_usec_per_turn_without_renewals": turn_usec / len(all_turns),
        "redis_commands_per_turn_without_renewals": (
            sum(commands.values()) - renewal_commands(commands)
        )
        / len(all_turns),
        "tokens_processed": tokens_in,
        "storage_bytes_added": storage,
        "storage_bytes_per_token": storage / tokens_in if tokens_in else None,
        "storage_bytes_per_token_by_part": {
            k: (parts1[k] - parts0[k]) / tokens_in if tokens_in else None for k in parts1
        },
        "state_file_bytes_per_session": parts1["state"] / sessions,
        "node_write_bytes": sum(b - a for a, b in zip(io0, io1, strict=True)),
        "node_write_bytes_per_token": (
            sum(b - a for a, b in zip(io0, io1, strict=True)) / tokens_in if tokens_in else None
        ),
        "memory_entries_end": sum(e for e, _ in stats),
    }
    if idle is not None:
        row["idle"] = idle
    return row


def set_nodes(cluster: Cluster, k: int) -> list[int]:
    """Run exactly nodes ``0..k-1`` (starting or gracefully stopping others); returns the
    indexes of the nodes started now."""
    started = []
    for i in range(cluster.size):
        node = cluster.nodes[i]
        if i < k and node is None:
            cluster.start(i)
            started.append(i)
        elif i >= k and node is not None:
            node.close()  # SIGTERM: it hands its sessions off
            cluster.nodes[i] = None
    return started


async def warm_up(urls: Sequence[str]) -> None:
    """One short unmeasured turn per node: first-call costs stay out of the figures."""

    async def one(url: str) -> None:
        client, _ = await open_session(url)
        try:
            await client.turn(8)
        finally:
            await client.aclose()

    await asyncio.gather(*(one(u) for u in urls))


# -- failover -----------------------------------------------------------------------------------


async def failover_round(
    cluster: Cluster, victim: int, warm_turns: int, max_tokens: int
) -> dict[str, Any]:
    """One kill -9 of a session's owner mid-reply, then a resume and a new turn elsewhere."""
    client, session_id = await open_session(cluster.node(victim).url)
    acked = 0
    try:
        for _ in range(warm_turns):
            turn = await client.turn(max_tokens)
            acked += turn.status in ACKNOWLEDGED
        entries_before, position_before = await memory_stats(client)
        await start_turn(client, LONG_REPLY_TOKENS)
        deltas = 0
        while deltas < DELTAS_BEFORE_KILL:
            event = await client.recv()
            if event["type"] == "response.output_text.delta":
                deltas += 1
            elif event["type"] in ("response.done", "error"):
                raise RuntimeError(f"the long reply ended before the kill: {event}")
        killed = time.perf_counter()
        cluster.kill(victim)
        # When the dead owner's lease runs out: the floor under any failover time.
        pttl = redis_call(cluster.redis.port, "PTTL", f"{KEY_PREFIX}:lease:{{{session_id}}}")
        lease_left_ms = (time.perf_counter() - killed) * 1000 + max(0, int(pttl or 0))
        others = [n.url for i, n in enumerate(cluster.nodes) if n is not None and i != victim]
        async with asyncio.timeout(FAILOVER_TIMEOUT_S):
            async with AgentClient(others, timeout=FAILOVER_TIMEOUT_S / 2) as agent:
                info = await agent.resume(session_id)
                resumed = time.perf_counter()
                new_owner = agent.url
                reply = agent.respond("And now?", max_tokens=max_tokens, temperature=0.0)
                first: float | None = None
                async for _chunk in reply:
                    if first is None:
                        first = time.perf_counter()
                stats = await agent.memory_stats()
                await agent.delete_session()
    finally:
        client.ws.transport.abort()  # its server is dead: no closing handshake to wait for
    lost = info.turns < acked or info.memory_entries < entries_before
    return {
        "victim": f"node{victim}",
        "new_owner_url": new_owner,
        "kill_to_lease_expiry_ms": lease_left_ms,
        "kill_to_resumed_ms": 1000 * (resumed - killed),
        "kill_to_first_token_ms": 1000 * ((first or resumed) - killed),
        "acknowledged_turns": acked,
        "turns_after": info.turns,
        "memory_entries_before": entries_before,
        "memory_entries_after": info.memory_entries,
        "position_before": position_before,
        "position_after_resume": info.position,
        "memory_entries_after_new_turn": stats.entries,
        "new_turn_status": reply.status,
        "lost_acknowledged_turn": lost,
    }


# -- the command --------------------------------------------------------------------------------


def _nodes(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes must be like 1,2,3, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"--nodes must be positive, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-runtime bench cluster",
        description="Failover time after kill -9, throughput with 1..3 nodes, and Redis and "
        "storage costs per turn, on a loopback cluster.",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="a small run (about a minute): 2 failover rounds, 3 sessions x 2 turns of 16 tokens",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--rounds", type=int, help="failover rounds (default 10)")
    parser.add_argument("--sessions", type=int, help="concurrent sessions of the load (default 12)")
    parser.add_argument("--turns", type=int, help="turns per session in the load (default 8)")
    parser.add_argument("--tokens", type=int, help="max_tokens of every turn (default 64)")
    parser.add_argument(
        "--nodes", type=_nodes, help="node counts for the throughput runs (default 1,2,3)"
    )
    parser.add_argument(
        "--lease-ttl-s", type=float, default=2.0,
        help="cluster.lease_ttl_s of every node (default 2; the server's default is 10)",
    )  # fmt: skip
    parser.add_argument(
        "--idle-s", type=float, help="idle window for the lease renewal rate (default 10)"
    )
    parser.add_argument("--checkpoint", help="model checkpoint (default: bundled)")
    parser.add_argument(
        "--torch-threads", type=int, default=1,
        help="engine.torch_threads of every node (default 1: the nodes share the machine's cores)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds: int = args.rounds or (2 if args.quick else 10)
    sessions: int = args.sessions or (3 if args.quick else 12)
    turns: int = args.turns or (2 if args.quick else 8)
    tokens: int = args.tokens or (16 if args.quick else 64)
    nodes: list[int] = args.nodes or [1, 2, 3]
    idle_s: float = args.idle_s if args.idle_s is not None else (2.0 if args.quick else 10.0)
    size = max(3, max(nodes))
    extra = ["--generation-max-tokens-limit", str(LONG_REPLY_TOKENS)]
    if args.checkpoint:
        extra += ["--engine-checkpoint", args.checkpoint]
    if args.torch_threads:
        extra += ["--engine-torch-threads", str(args.torch_threads)]

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failovers: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="agent-runtime-bench-cluster-") as tmp:
        cluster = Cluster(Path(tmp), size, lease_ttl_s=args.lease_ttl_s, args=tuple(extra))
        try:
            cluster.redis.start()
            for k in nodes:
                new = set_nodes(cluster, k)
                asyncio.run(warm_up([cluster.node(i).url for i in new]))
                urls = [cluster.node(i).url for i in range(k)]
                row = {
                    "nodes": k,
                    "sessions": sessions,
                    "turns_per_session": turns,
                    **asyncio.run(
                        run_load(urls, sessions, turns, tokens, cluster,
                                 idle_s=idle_s if k == nodes[-1] else 0.0)
                    ),
                }  # fmt: skip
                rows.append(row)
                print(
                    f"  nodes={k} {row['tokens_per_s']:8.1f} tok/s {row['turns_per_s']:6.2f} "
                    f"turns/s  cpu busy {row['cpu_busy']:.0%}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
            set_nodes(cluster, 3)
            for r in range(rounds):
                victim = r % 3
                result = asyncio.run(failover_round(cluster, victim, 3 if not args.quick else 2,
                                                    tokens))  # fmt: skip
                result["round"] = r
                failovers.append(result)
                print(
                    f"  failover {r}: {result['victim']} killed, first token after "
                    f"{result['kill_to_first_token_ms']:.0f} ms, lost: "
                    f"{result['lost_acknowledged_turn']}",
                    file=sys.stderr, flush=True,
                )  # fmt: skip
                cluster.start(victim)
        except BaseException:
            print(cluster.log_text()[-4000:], file=sys.stderr)
            raise
        finally:
            cluster.close()
    _derive(rows)
    renew_every = args.lease_ttl_s / 3
    result = {
        "benchmark": "cluster",
        "meta": {
            "model": args.checkpoint or "bundled",
            "lease_ttl_s": args.lease_ttl_s,
            "renew_interval_s": renew_every,
            "max_tokens": tokens,
            "temperature": 0.0,
            "torch_threads": args.torch_threads or "server default",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "machine": platform.platform(),
            "seconds": round(time.perf_counter() - started, 1),
            "quick": bool(args.quick),
        },
        "rows": rows,
        "costs": _costs(rows, renew_every),
        "failover": _failover_summary(failovers, args.lease_ttl_s),
    }
    print(format_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return 0


def _derive(rows: list[dict[str, Any]]) -> None:
    one = next((r for r in rows if r["nodes"] == 1), None)
    for r in rows:
        for key in ("tokens_per_s", "turns_per_s"):
            r[f"{key}_vs_1_node"] = r[key] / one[key] if one and one[key] else None


def _costs(rows: list[dict[str, Any]], renew_every: float) -> dict[str, Any]:
    """The capacity model's inputs, from the run with the most nodes."""
    top = max(rows, key=lambda r: r["nodes"])
    c, idle = top["costs"], top.get("idle", {})
    return {
        "measured_with_nodes": top["nodes"],
        "redis_commands_per_turn": c["redis_commands_per_turn"],
        "redis_commands_per_turn_without_renewals": c["redis_commands_per_turn_without_renewals"],
        "redis_commands_per_turn_by_command": {
            k: v / top["turns"] for k, v in c["redis_commands"].items()
        },
        "redis_usec_per_turn_without_renewals": c["redis_usec_per_turn_without_renewals"],
        "redis_usec_per_renewal": idle.get("redis_usec_per_renewal"),
        "renewals_per_s_per_session": idle.get("renewals_per_s_per_session"),
        "renewals_per_s_per_session_expected": 1 / renew_every,
        "redis_commands_per_s_per_idle_session": idle.get("commands_per_s_per_session"),
        "storage_bytes_per_token": c["storage_bytes_per_token"],
        "storage_bytes_per_token_by_part": c["storage_bytes_per_token_by_part"],
        "state_file_bytes_per_session": c["state_file_bytes_per_session"],
        "node_write_bytes_per_token": c["node_write_bytes_per_token"],
        "tokens_processed": c["tokens_processed"],
    }


def _failover_summary(rounds: list[dict[str, Any]], ttl: float) -> dict[str, Any]:
    first = [r["kill_to_first_token_ms"] / 1000 for r in rounds]
    resumed = [r["kill_to_resumed_ms"] / 1000 for r in rounds]
    expiry = [r["kill_to_lease_expiry_ms"] / 1000 for r in rounds]
    return {
        "rounds": len(rounds),
        "lease_ttl_s": ttl,
        "kill_to_first_token_p50_ms": _ms(first, 50),
        "kill_to_first_token_p99_ms": _ms(first, 99),
        "kill_to_lease_expiry_p50_ms": _ms(expiry, 50),
        "kill_to_lease_expiry_p99_ms": _ms(expiry, 99),
        "kill_to_resumed_p50_ms": _ms(resumed, 50),
        "kill_to_resumed_p99_ms": _ms(resumed, 99),
        "lost_acknowledged_turns": sum(r["lost_acknowledged_turn"] for r in rounds),
        "each": rounds,
    }


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    head = "nodes  sessions×turns  tokens/s  ×1 node  turns/s  ×1 node  TTFT p50/p99 ms  CPU busy"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['nodes']:>5}  {r['sessions']:>8}×{r['turns_per_session']:<5}  "
            f"{r['tokens_per_s']:8.1f}  {_f(r['tokens_per_s_vs_1_node'], '7.2f')}  "
            f"{r['turns_per_s']:7.2f}  {_f(r['turns_per_s_vs_1_node'], '7.2f')}  "
            f"{_f(r['ttft_p50_ms'], '7.1f')}/{_f(r['ttft_p99_ms'], '<7.1f')}  "
            f"{r['cpu_busy']:8.0%}"
        )
    c, f = result["costs"], result["failover"]
    by = ", ".join(f"{k} {v:.2f}" for k, v in c["redis_commands_per_turn_by_command"].items())
    lines += [
        "",
        f"redis: {c['redis_commands_per_turn']:.2f} commands per turn "
        f"({c['redis_commands_per_turn_without_renewals']:.2f} without lease renewals; {by}); "
        f"{_f(c['renewals_per_s_per_session'], '.3f')} lease renewals/s per session "
        f"(expected 1/renew interval = {c['renewals_per_s_per_session_expected']:.3f}); "
        f"Redis CPU {c['redis_usec_per_turn_without_renewals']:.1f} µs per turn, "
        f"{_f(c['redis_usec_per_renewal'], '.1f')} µs per renewal",
        f"storage: {_f(c['storage_bytes_per_token'], '.0f')} bytes per token in the session "
        f"directories (bank {_f(c['storage_bytes_per_token_by_part']['bank'], '.0f')}; "
        f"state.pt {c['state_file_bytes_per_session']:.0f} bytes per session, rewritten each turn)"
        f" ({_f(c['node_write_bytes_per_token'], '.0f')} bytes/token written by the "
        f"nodes, /proc/PID/io) over {c['tokens_processed']} tokens",
        f"failover (kill -9 of the owner mid-reply, lease TTL {f['lease_ttl_s']:g} s, "
        f"{f['rounds']} rounds): first token of a new reply on another node after "
        f"{_f(f['kill_to_first_token_p50_ms'], '.0f')}/{_f(f['kill_to_first_token_p99_ms'], '.0f')}"
        f" ms p50/p99 (resumed after {_f(f['kill_to_resumed_p50_ms'], '.0f')}/"
        f"{_f(f['kill_to_resumed_p99_ms'], '.0f')} ms; the dead owner's lease ran out after "
        f"{_f(f['kill_to_lease_expiry_p50_ms'], '.0f')}/{_f(f['kill_to_lease_expiry_p99_ms'], '.0f')}"
        " ms); acknowledged turns lost: "
        f"{f['lost_acknowledged_turns']}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
