"""The README's path, for real: ``agent-runtime serve`` in a subprocess, the quickstart client, SIGTERM."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from agent_runtime.bench.launch import serve_process
from tests.conftest import TIMEOUT

ROOT = Path(__file__).resolve().parents[2]


def test_serve_answers_the_quickstart_client_and_shuts_down_gracefully(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "AGENT_RUNTIME_MAX_SESSIONS": "8"}
    with serve_process(data, cwd=tmp_path, env=env, timeout=TIMEOUT * 3) as server:
        with urllib.request.urlopen(f"{server.http}/readyz", timeout=TIMEOUT) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{server.http}/", timeout=TIMEOUT) as resp:
            assert "text/html" in resp.headers["Content-Type"]
            assert b"/v1/realtime" in resp.read()
        out = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "quickstart.py"), "Hi! " * 60, server.url],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 6,
            check=True,
        )
        assert "[session sess_" in out.stderr
        assert re.search(r"\[(completed|incomplete): \{'input_tokens': 243", out.stderr), out.stderr
        code = server.stop(timeout=TIMEOUT * 3)  # SIGTERM: graceful shutdown
        assert code == 0, server.log_text()
    # Graceful shutdown snapshotted the session's bank to the data directory.
    assert list(data.glob("sessions/*/sess_*/bank/*")), sorted(str(p) for p in data.rglob("*"))
    assert (data / "sessions.rdb").exists() or list(data.glob("*.rdb")), (
        "embedded Redis lives in the data dir"
    )
