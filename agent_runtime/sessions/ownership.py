"""Session ownership across nodes: Redis leases with fencing tokens, checked where writes land.

With ``--cluster-enabled``, every node shares one Redis deployment (one server, a Sentinel
group or a Redis Cluster: ``store.redis_url``) and one data root. A session is served
by exactly one node, its **owner**, which holds the session's lease::

    P:lease:{<session_id>}   "<node_id> <token> <advertise_url>"  SET NX PX <lease_ttl>
    P:fence:{<session_id>}   the last fencing token handed out (INCR on every acquisition)

(the ``{...}`` hash tag puts both keys of a session in one Redis Cluster slot, so each script
below touches one slot). Acquiring a lease increments the session's **fencing token**; the
owner renews the lease well inside its TTL (one pipelined script per renewal round) and
deletes it, compared by value, when it unloads the session.

TTL leases alone are unsafe under process pauses (a node stopped past its TTL wakes up
believing it still owns the session), so the token is also checked **where the writes land**:
the session directory holds a ``fence`` file with the highest token any owner claimed, written
by a new owner before it loads anything, and every write a node makes to a session (bank log
commits, snapshots, the state file, the seq reservation, the privacy ledger) first reads it and
is refused with :class:`~agent_runtime.errors.FencedError` when it names a newer token. The bank
also carries the token in its ``meta`` (so in its log's META records and its snapshots) and the
state file in its header. What the shared storage must guarantee for this is in
``docs/scaling.md``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from agent_runtime.errors import BankFormatError, FencedError, StorageError, StoreError
from agent_runtime.files import atomic_write
from agent_runtime.layout import FENCE_FILE
from agent_runtime.sessions.store import SessionStore

__all__ = ["Lease", "Leases", "Owner", "check_fence", "claim_fence", "read_fence"]

log = logging.getLogger(__name__)

# KEYS: lease, fence. ARGV: node id, advertise url, ttl ms, floor (the token the storage holds).
# Returns {token, value} when this node now holds the lease, {0, value, pttl} when another does.
_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local node = string.match(cur, '^(%S+) ')
  if node ~= ARGV[1] then return {0, cur, redis.call('PTTL', KEYS[1])} end
end
local t = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[4])
if t <= floor then
  t = floor + 1
  redis.call('SET', KEYS[2], t)
end
local v = ARGV[1] .. ' ' .. t .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], v, 'PX', ARGV[3])
return {t, v}
"""

# KEYS: lease, fence. ARGV: value, ttl ms, token. 1: renewed; 2: re-established (Redis had
# lost it and nobody took the session meanwhile); 0: lost (another node holds it, or a newer
# token was handed out).
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not cur then
  local f = tonumber(redis.call('GET', KEYS[2]) or '0')
  local t = tonumber(ARGV[3])
  if f <= t then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    if f < t then redis.call('SET', KEYS[2], t) end
    return 2
  end
end
return 0
"""

# KEYS: lease. ARGV: value. Deletes the lease only if it is still this one.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class Owner:
    """Who holds a session's lease."""

    node: str
    token: int
    url: str
    expires_in_ms: int = field(default=-1, compare=False)
    """How long the lease still runs unless its owner renews it (-1: not known)."""

    @classmethod
    def parse(cls, value: str, expires_in_ms: int = -1) -> Owner:
        node, token, url = [*value.split(" ", 2), "", ""][:3]
        try:
            return cls(node, int(token), url, expires_in_ms)
        except ValueError:
            raise StoreError(f"malformed lease value in Redis: {value[:80]!r}") from None


@dataclass
class Lease:
    """This node's lease on one session."""

    session_id: str
    token: int
    value: str
    valid_until: float
    """``time.monotonic()`` past which the lease may have expired in Redis (it was sent, not
    received, before this: the local view is never later than Redis')."""

    @property
    def valid(self) -> bool:
        return time.monotonic() < self.valid_until


class Leases:
    """The Redis side of ownership for one node (see the module docstring)."""

    def __init__(self, store: SessionStore, node_id: str, url: str, ttl_s: float) -> None:
        self.store = store
        self.node_id = node_id
        self.url = url
        self.internal_url = ""
        """Where other nodes forward requests to this node (empty: :attr:`url`)."""
        self.ttl_s = ttl_s
        self.internal: dict[str, str] = {}
        """Node id -> the base URL other nodes forward to, as the last :meth:`announce` saw."""
        self._scripts: dict[str, Any] = {}

    def _script(self, name: str, text: str) -> Any:
        script = self._scripts.get(name)
        if script is None:
            script = self._scripts[name] = self.store.redis.register_script(text)
        return script

    def _keys(self, session_id: str) -> list[str]:
        prefix = self.store.config.key_prefix
        return [f"{prefix}:lease:{{{session_id}}}", f"{prefix}:fence:{{{session_id}}}"]

    async def acquire(self, session_id: str, floor: int = 0) -> Lease | Owner:
        """Take the session's lease (free, expired, or an earlier life of this node's): a
        :class:`Lease` with a new fencing token above ``floor``; or the :class:`Owner` that
        holds it. Raises :class:`StoreError` when Redis does not answer."""
        sent = time.monotonic()
        ttl_ms = int(self.ttl_s * 1000)
        try:
            token, value, *pttl = await self._script("acquire", _ACQUIRE)(
                keys=self._keys(session_id), args=[self.node_id, self.url, ttl_ms, floor]
            )
        except RedisError as exc:
            raise StoreError(f"cannot take a session lease: {exc}") from exc
        value = value.decode() if isinstance(value, bytes) else str(value)
        if int(token) == 0:
            return Owner.parse(value, int(pttl[0]) if pttl else -1)
        return Lease(session_id, int(token), value, sent + self.ttl_s)

    async def renew(self, leases: list[Lease]) -> list[int]:
        """Renew many leases in one round trip; per lease 1 (renewed), 2 (re-established after
        Redis lost it), 0 (lost) or -1 (its Redis primary did not answer; on a Redis Cluster
        the leases on the primaries that did answer are still renewed). A renewed lease's
        ``valid_until`` moves on. Raises :class:`StoreError` when Redis does not answer at all
        (the leases keep their deadlines)."""
        if not leases:
            return []
        sent = time.monotonic()
        ttl_ms = int(self.ttl_s * 1000)
        try:
            # EVAL, not EVALSHA: a pipeline of EVALSHA asks SCRIPT EXISTS first (a second round
            # trip), and on a Cluster every node would need the script loaded. Redis caches the
            # compiled script by its digest either way.
            async with self.store.redis.pipeline(transaction=False) as pipe:
                for lease in leases:
                    pipe.eval(_RENEW, 2, *self._keys(lease.session_id),
                              lease.value, ttl_ms, lease.token)  # fmt: skip
                results = [int(r) for r in await pipe.execute()]
        except RedisError as exc:
            if not self.store.clustered or len(leases) == 1:
                raise StoreError(f"cannot renew session leases: {exc}") from exc
            # A Cluster pipeline fails whole when one primary is down (until its replica takes
            # the slots over): renew lease by lease, so only the dead primary's leases age.
            results = await self._renew_each(leases, ttl_ms)
            if all(r < 0 for r in results):
                raise StoreError(f"cannot renew session leases: {exc}") from exc
            log.warning("renewed %d of %d session leases lease by lease: a Redis primary did "
                        "not answer: %s", sum(r >= 0 for r in results), len(leases), str(exc))  # fmt: skip
        for lease, result in zip(leases, results, strict=True):
            if result > 0:
                lease.valid_until = sent + self.ttl_s
        return results

    async def _renew_each(self, leases: list[Lease], ttl_ms: int) -> list[int]:
        """Renew primary by primary (one script for the first lease, then one pipeline for the
        rest), one primary after another: -1 for the leases of a primary that does not answer.
        (Concurrent commands to a dead node make redis-py leak the connections it replaces.)"""
        redis = self.store.redis
        groups: dict[str, list[int]] = {}
        for i, lease in enumerate(leases):
            try:
                name = redis.get_node_from_key(self._keys(lease.session_id)[0]).name  # type: ignore[union-attr]
            except Exception:  # a slot no primary serves right now
                name = ""
            groups.setdefault(name, []).append(i)
        results = [-1] * len(leases)
        for members in groups.values():
            first, rest = leases[members[0]], [leases[i] for i in members[1:]]
            try:
                results[members[0]] = int(await redis.eval(
                    _RENEW, 2, *self._keys(first.session_id), first.value, ttl_ms, first.token
                ))  # fmt: skip
                if rest:
                    async with redis.pipeline(transaction=False) as pipe:
                        for lease in rest:
                            pipe.eval(_RENEW, 2, *self._keys(lease.session_id),
                                      lease.value, ttl_ms, lease.token)  # fmt: skip
                        for i, result in zip(members[1:], await pipe.execute(), strict=True):
                            results[i] = int(result)
            except RedisError:
                continue
        return results

    async def release(self, lease: Lease) -> None:
        """Give the lease up (only if it is still ours): the next node to ask takes it at
        once. A Redis failure is logged: the lease then expires after its TTL."""
        lease.valid_until = 0.0
        try:
            await self._script("release", _RELEASE)(
                keys=self._keys(lease.session_id)[:1], args=[lease.value]
            )
        except RedisError as exc:
            log.warning("session %s: lease not released (expires by itself): %s",
                        lease.session_id, exc)  # fmt: skip

    async def owner(self, session_id: str) -> Owner | None:
        """Who holds the session's lease now (None: nobody)."""
        try:
            value = await self.store.redis.get(self._keys(session_id)[0])
        except RedisError as exc:
            raise StoreError(f"cannot read a session lease: {exc}") from exc
        return None if value is None else Owner.parse(str(value))

    async def announce(self) -> set[str]:
        """Record this node as alive (``P:nodes``: node id -> "<unix time> <url> [<internal
        url>]") and return the base URLs of every node seen alive within three lease TTLs
        (itself included); :attr:`internal` learns where each of them takes forwarded requests."""
        key = f"{self.store.config.key_prefix}:nodes"
        now = time.time()
        mine = f"{now:.3f} {self.url}" + (f" {self.internal_url}" if self.internal_url else "")
        try:
            async with self.store.redis.pipeline(transaction=False) as pipe:
                pipe.hset(key, self.node_id, mine)
                pipe.hgetall(key)
                _, members = await pipe.execute()
        except RedisError as exc:
            raise StoreError(f"cannot announce this node: {exc}") from exc
        alive, internal = set(), {}
        for node, value in members.items():
            seen, url, inner = [*str(value).split(" ", 2), "", ""][:3]
            try:
                if now - float(seen) < 3 * self.ttl_s and url:
                    alive.add(url)
                    internal[str(node)] = inner or url
            except ValueError:
                continue
        self.internal = internal
        return alive

    def forward_url(self, owner: str, location: str) -> str:
        """Where to forward a request for a session ``owner`` holds, advertised at ``location``."""
        return self.internal.get(owner, location)

    async def forget(self, session_id: str) -> None:
        """Delete the session's lease and fencing counter (the session was erased)."""
        try:
            await self.store.redis.delete(*self._keys(session_id))
        except RedisError as exc:
            raise StoreError(f"cannot delete a session lease: {exc}") from exc


# -- the storage side: the fence file ----------------------------------------------------------


def read_fence(directory: Path) -> int:
    """The highest fencing token claimed in a session directory (0: none yet)."""
    try:
        text = (directory / FENCE_FILE).read_text().strip()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StorageError(f"cannot read {FENCE_FILE}: {exc.strerror or exc}", exc.errno) from exc
    try:
        return int(text)
    except ValueError:
        raise BankFormatError(f"{FENCE_FILE}: not a number") from None


def claim_fence(directory: Path, token: int) -> None:
    """Record ``token`` as the session's newest (before the new owner loads anything).
    Raises :class:`FencedError` when the directory already holds a newer one."""
    stored = read_fence(directory)
    if stored > token:
        raise FencedError(f"session storage holds fencing token {stored}, newer than {token}")
    if stored < token:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write(directory / FENCE_FILE, f"{token}\n".encode(), mode=0o600)
        except OSError as exc:
            raise StorageError(
                f"cannot write {FENCE_FILE}: {exc.strerror or exc}", exc.errno
            ) from exc


def check_fence(directory: Path, token: int) -> None:
    """Refuse (:class:`FencedError`) a write under ``token`` once a newer one was claimed."""
    stored = read_fence(directory)
    if stored > token:
        raise FencedError(
            f"write refused: session storage holds fencing token {stored}, this node's is {token}"
        )
