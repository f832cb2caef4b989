"""Run ``agent-runtime serve`` as a child process on a free loopback port (tests, benchmarks).

The server prints one ready line on stdout naming its websocket URL; :func:`serve_process`
waits for it, yields a :class:`ServerProcess`, and on exit stops the server gracefully
(SIGTERM, then SIGKILL after a timeout) and closes every pipe and file it opened.

These servers run the bundled byte model (``--model bundled``) unless their arguments or
environment name a model, a checkpoint or a config file: they measure and test the serving,
not a model, and the byte model needs no download.
"""

from __future__ import annotations

import contextlib
import os
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

    def close(self, timeout: float = 30.0) -> None:
        """Stop the server if it still runs (a stopped one is continued first) and close its pipe."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.stop(timeout=timeout)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _model_args(args: Sequence[str], env: dict[str, str] | None, model: str | None) -> list[str]:
    """``--model MODEL`` unless ``args`` or ``env`` choose the model or name a config file
    (which may; a flag would override it: see the module doc)."""
    if model is None or any(a.split("=", 1)[0] in _MODEL_FLAGS for a in args):
        return []
    environ = os.environ if env is None else env
    if any(environ.get(f"AGENT_RUNTIME_{name}") for name in _MODEL_ENV):
        return []
    return ["--model", model]


_MODEL_FLAGS = frozenset({"--model", "--engine-model", "--engine-checkpoint", "--config"})
_MODEL_ENV = ("ENGINE_MODEL", "ENGINE_CHECKPOINT", "CONFIG")


def start_server(
    data_dir: Path,
    *args: str,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    model: str | None = "bundled",
) -> ServerProcess:
    """Start ``python -m agent_runtime serve --port 0 --data-dir DATA_DIR ARGS...`` and wait
    for its ready line; the caller stops it (:meth:`ServerProcess.stop`, :meth:`close`).
    ``model``: the ``--model`` given when ARGS and ``env`` name none (None: serve's default)."""
    log_path = log_path or data_dir.with_name(data_dir.name + ".server.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd: Sequence[str] = [
        sys.executable, "-m", "agent_runtime", "--log-level", "WARNING", "serve",
        "--port", "0", "--data-dir", str(data_dir), *_model_args(args, env, model), *args,
    ]  # fmt: skip
    log: IO[str]
    with open(log_path, "a", encoding="utf-8") as log:
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
    except BaseException:
        ServerProcess(proc, "", 0, log_path).close(timeout)
        raise
    return ServerProcess(proc, match.group(0), int(match.group(2)), log_path)


@contextmanager
def serve_process(
    data_dir: Path,
    *args: str,
    log_path: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    model: str | None = "bundled",
) -> Iterator[ServerProcess]:
    """``python -m agent_runtime serve --port 0 --data-dir DATA_DIR ARGS...``, stopped on exit
    (``model`` as for :func:`start_server`)."""
    server = start_server(
        data_dir, *args, log_path=log_path, cwd=cwd, env=env, timeout=timeout, model=model
    )
    try:
        yield server
    finally:
        server.close(timeout)


MOSQUITTO = "/usr/sbin/mosquitto"


@dataclass
class Broker:
    """A Mosquitto broker started by :func:`mosquitto_process` (see docs/mqtt.md)."""

    port: int
    directory: Path
    bridge_user: str
    bridge_password: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the broker on its port and wait until it accepts connections."""
        import shutil
        import socket
        import time

        binary = shutil.which("mosquitto") or MOSQUITTO
        log = open(self.directory / "mosquitto.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.directory / "mosquitto.conf")],
            stdout=log,
            stderr=log,
        )
        log.close()  # the child holds its own copy
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited ({self.proc.returncode}): "
                    + (self.directory / "mosquitto.log").read_text(errors="replace")[-2000:]
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("mosquitto did not open its port") from None
                time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def mosquitto_process(
    directory: Path,
    tenants: dict[str, str],
    *,
    prefix: str = "agent-runtime/v1",
    port: int = 0,
) -> Iterator[Broker]:
    """A real Mosquitto on a free loopback port with a generated config: no anonymous access,
    a password file (the bridge's identity and each tenant's, whose password is its API key)
    and the ACL of ``agent-runtime tenants mqtt-config``. Stopped on exit."""
    import secrets
    import socket

    from privacy.mqtt import acl_lines, broker_config, password_line

    directory.mkdir(parents=True, exist_ok=True)
    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    bridge_user, bridge_password = "agent-runtime-bridge", secrets.token_urlsafe(16)
    users = {bridge_user: bridge_password, **tenants}
    passwd = directory / "passwd"
    passwd.write_text("".join(password_line(u, pw) + "\n" for u, pw in users.items()))
    acl = directory / "acl"
    acl.write_text("\n".join(acl_lines(bridge_user, prefix)) + "\n")
    passwd.chmod(0o600)
    acl.chmod(0o600)
    conf = broker_config(port, str(passwd), str(acl))
    if os.geteuid() == 0:  # mosquitto would drop to user "mosquitto", who cannot read our files
        conf += "user root\n"
    (directory / "mosquitto.conf").write_text(conf)
    broker = Broker(port, directory, bridge_user, bridge_password)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
