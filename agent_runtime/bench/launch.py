"""Run ``agent-runtime serve`` as a child process on a free loopback port (tests, benchmarks).

The server prints one ready line on stdout naming its websocket URL; :func:`serve_process`
waits for it, yields a :class:`ServerProcess`, and on exit stops the server gracefully
(SIGTERM, then SIGKILL after a timeout) and closes every pipe and file it opened.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["ServerProcess", "serve_process"]

_READY = re.compile(r"ws://([\w.]+):(\d+)/v1/realtime")


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    url: str  # ws://127.0.0.1:PORT/v1/realtime
    port: int
    log_path: Path  # the server's stderr

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (if still running) and wait; SIGKILL after ``timeout``. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextmanager
def serve_process(
    data_dir: Path,
    *args: str,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Iterator[ServerProcess]:
    """``python -m agent_runtime serve --port 0 --data-dir DATA_DIR ARGS...``, stopped on exit."""
    log_path = log_path or data_dir.with_name(data_dir.name + ".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd: Sequence[str] = [
        sys.executable, "-m", "agent_runtime", "--log-level", "WARNING", "serve",
        "--port", "0", "--data-dir", str(data_dir), *args,
    ]  # fmt: skip
    log: IO[str]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd, env=env
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = _READY.search(line)
            if match is None:
                code = proc.wait(timeout=timeout)
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
                raise RuntimeError(f"server did not start (exit {code}): {tail}")
            server = ServerProcess(proc, match.group(0), int(match.group(2)), log_path)
            yield server
        finally:
            if proc.poll() is None:
                ServerProcess(proc, "", 0, log_path).stop(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
