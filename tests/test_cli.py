"""The README's path, for real: ``agent-runtime serve`` in a subprocess, the quickstart client, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parent.parent


def test_serve_answers_the_quickstart_client_and_shuts_down_gracefully(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "AGENT_RUNTIME_MAX_SESSIONS": "8"}
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
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"ws://127\.0\.0\.1:(\d+)/v1/realtime", line)
        assert match, (
            f"no ready line; got {line!r}; stderr: {proc.stderr.read() if proc.poll() is not None else ''}"
        )
        port = int(match.group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=TIMEOUT) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=TIMEOUT) as resp:
            assert "text/html" in resp.headers["Content-Type"] and b"/v1/realtime" in resp.read()
        out = subprocess.run(
            [
                sys.executable,
                str(ROOT / "examples" / "quickstart.py"),
                "Hi! " * 60,
                f"ws://127.0.0.1:{port}/v1/realtime",
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 6,
            check=True,
        )
        assert "[session sess_" in out.stderr
        assert re.search(r"\[(completed|incomplete): \{'input_tokens': 243", out.stderr), out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=TIMEOUT * 3)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    stderr = proc.stderr.read() if proc.stderr else ""
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    assert code == 0, stderr
    # Graceful shutdown snapshotted the session's bank to the data directory.
    assert list(data.glob("sessions/*/sess_*/bank/*")), sorted(str(p) for p in data.rglob("*"))
    assert (data / "sessions.rdb").exists() or list(data.glob("*.rdb")), (
        "embedded Redis lives in the data dir"
    )
