"""The session registry: create, resolve (always from the authenticated tenant), respond,
persist, unload and erase sessions.

Metadata goes to the session store (``store.py``, Redis); banks and generation state go to the
data directory (``state.py``, ``memory/``). Server events are built by ``agent_runtime.protocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import agent_runtime.sessions.state as state_file
from agent_runtime import protocol as p
from agent_runtime.config import ClusterConfig, ServerConfig
from agent_runtime.engine import Engine, OutputCollector, ResponseResult, SamplingParams
from agent_runtime.errors import (
    BankFormatError,
    CheckpointError,
    ConflictError,
    FencedError,
    OverloadedError,
    PrivacyError,
    RequestError,
    SessionElsewhereError,
    SessionNotFoundError,
    StorageError,
    StoreError,
    UnavailableError,
)
from agent_runtime.files import StorageHealth
from agent_runtime.layout import BANK_DIR, session_directory
from agent_runtime.metrics import EngineMetrics
from agent_runtime.models.base import SessionState
from agent_runtime.sessions.items import Ledger, char_ends
from agent_runtime.sessions.ownership import Lease, Leases, Owner, claim_fence, read_fence
from agent_runtime.sessions.session import Session, supersede
from agent_runtime.sessions.store import SessionMeta, SessionStore
from memory import MemoryBank, MemoryConfig
from privacy.audit import AuditLog
from privacy.config import PrivacyConfig
from privacy.crypto import KeyStore, SessionCipher
from privacy.erasure import erase_session
from privacy.ledger import resolve_sigma
from privacy.session import SessionPrivacy

__all__ = ["SessionManager"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class SessionManager:
    """Creates, resolves, persists and deletes sessions."""

    def __init__(
        self,
        engine: Engine,
        store: SessionStore,
        data_dir: Path,
        memory: MemoryConfig,
        limits: ServerConfig | None = None,
        *,
        privacy: PrivacyConfig | None = None,
        keystore: KeyStore | None = None,
        audit: AuditLog | None = None,
        node_id: str = "",
        metrics: EngineMetrics | None = None,
        cluster: ClusterConfig | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.data_dir = data_dir
        self.memory = memory
        self.limits = limits or ServerConfig()
        self.node_id = node_id
        self.metrics = metrics
        self.privacy = privacy or PrivacyConfig()
        resolve_sigma(self.privacy)  # an unreachable target epsilon fails at start, not per session
        self.keystore = keystore
        self.audit = audit
        self.sessions: dict[str, Session] = {}  # key: tenant/session_id
        self.on_loaded: list[Callable[[Session], None]] = []
        """Called with every session this node now serves (created or loaded), whatever the
        transport (the MQTT bridge of a cluster node subscribes to its topics)."""
        self._reserved: Counter[str] = Counter()  # slots taken by creates/loads in progress
        self._loading: dict[str, asyncio.Future[Session]] = {}  # key -> a load in progress
        self._unloading: dict[str, asyncio.Future[None]] = {}  # key -> an unload in progress
        self.storage = StorageHealth(data_dir)
        self.model = engine.model
        self.fingerprint = engine.model.fingerprint
        self.cluster = cluster or ClusterConfig()
        # Ownership through Redis leases when several nodes share the store and the data root.
        self.leases: Leases | None = None
        self.peers: set[str] = set()  # base URLs of the cluster's live nodes (this one included)
        if self.cluster.enabled:
            self.leases = Leases(
                store, node_id, self.cluster.advertise_url, self.cluster.lease_ttl_s
            )

    @contextlib.contextmanager
    def _admitted(self, tenant: str) -> Iterator[None]:
        """Reserve a live-session slot for ``tenant`` (checked and taken atomically: nothing
        awaits between the check and the reservation), released if the body fails."""
        live = len(self.sessions) + sum(self._reserved.values())
        if live >= self.limits.max_sessions:
            raise OverloadedError("too many live sessions on this server", retry_after_ms=5000)
        mine = sum(s.tenant == tenant for s in self.sessions.values()) + self._reserved[tenant]
        if mine >= self.limits.max_sessions_per_tenant:
            raise OverloadedError("too many live sessions for this tenant", retry_after_ms=5000)
        self._reserved[tenant] += 1
        try:
            yield
        finally:
            self._reserved[tenant] -= 1
            if not self._reserved[tenant]:
                del self._reserved[tenant]

    def directory(self, tenant: str, session_id: str) -> Path:
        return session_directory(self.data_dir, tenant, session_id)

    def _audit(
        self, tenant: str, action: str, session_id: str | None, **details: str | float | int | None
    ) -> None:
        if self.audit is not None:
            self.audit.post(tenant, action, session_id, **details)

    def _open(self, tenant: str, session_id: str, *, new: bool, lease: Lease | None) -> _Opened:
        """Open (or create) a session's bank, generation state and privacy state (worker thread).

        Everything on disk is sealed with the session's data key when encryption at rest is on;
        a file of another tenant or session fails authentication before it is parsed. In a
        cluster the new owner's fencing token is claimed in the directory before anything is
        read, so a previous owner's later writes are refused.
        """
        directory = self.directory(tenant, session_id)
        if lease is not None:
            claim_fence(directory, lease.token)
        cipher = None
        if self.keystore is not None:
            cipher = self.keystore.session_cipher(tenant, session_id, create=new)
        # The state file is the commit point: the bank replays exactly up to the position it
        # recorded when the last turn was acknowledged (a commit without it was never acked).
        saved = None if new else state_file.load(self.model, directory, session_id, cipher)
        upto = saved.header.bank_position if saved is not None else None
        key_dim, value_dim = self.model.memory_dims
        bank = MemoryBank.open(
            directory / BANK_DIR,
            key_dim,
            value_dim,
            self.memory,
            cipher=cipher,
            upto=upto,
            parts=self.model.memory_parts,
        )
        try:
            if lease is not None:
                bank.meta["fence"] = lease.token  # logged before this owner's first records
            bank.meta.setdefault("model_fingerprint", self.fingerprint)
            if bank.meta["model_fingerprint"] != self.fingerprint:
                raise BankFormatError(
                    f"bank of session {session_id} was written by model {bank.meta['model_fingerprint']},"
                    f" not {self.fingerprint}"
                )
            privacy = SessionPrivacy.open(
                directory,
                self.privacy,
                unit=self.privacy.unit,
                budget_epsilon=self.privacy.budget_epsilon or None,
            )
            state = self.model.new_state() if saved is None else saved.state
            reserved = 0 if new else state_file.read_reserved_seq(directory)
        except BaseException:
            bank.close(sync=False)
            raise
        if bank.recovered_uncommitted:
            log.info(
                "session %s: dropped %d unacknowledged log records on load",
                session_id,
                bank.recovered_uncommitted,
            )
        header = saved.header if saved is not None else None
        try:
            ledger = Ledger.from_json(header.ledger if header is not None else None)
        except BaseException:
            bank.close(sync=False)
            raise
        return _Opened(state, bank, privacy, cipher, directory, header, reserved, ledger)

    def _register(
        self, opened: _Opened, session_id: str, tenant: str, meta: SessionMeta
    ) -> Session:
        session = Session(
            session_id,
            tenant,
            opened.state,
            opened.bank,
            opened.directory,
            meta,
            buffer_events=self.limits.event_buffer,
        )
        session.privacy = opened.privacy
        session.cipher = opened.cipher
        session.ledger = opened.ledger
        session.on_detach = self.detached
        session.lease = opened.lease
        if opened.privacy.enabled:
            opened.state.protect = session.protect_keys
        self.sessions[session.key] = session
        for hook in self.on_loaded:
            hook(session)
        return session

    async def create(self, tenant: str, session_id: str, instructions: str = "") -> Session:
        self.storage.check()
        with self._admitted(tenant):
            lease = await self._acquire(session_id, 0)
            try:
                opened = await self._call_storage(
                    lambda: self._open(tenant, session_id, new=True, lease=lease)
                )
            except BaseException:
                await self._release(lease)
                raise
            opened.lease = lease
            now = time.time()
            meta = SessionMeta(
                session_id, tenant, created_at=now, last_active=now, owner=self.node_id
            )
            try:
                await self.store.create(meta)
            except BaseException:
                await self.engine.call(lambda: opened.bank.close(sync=False))
                await self._release(lease)
                raise
            session = self._register(opened, session_id, tenant, meta)
        if instructions:
            self._append(session, p.new_id("item"), "system", instructions)
        self._audit(tenant, "create", session_id)
        self._audit(tenant, "privacy_params", session_id, **opened.privacy.audit_details())
        log.info("session %s created for tenant %s", session_id, _tenant_tag(tenant))
        return session

    async def get(self, tenant: str, session_id: str) -> Session:
        """The tenant's live session, loading it from disk if needed; otherwise not found.

        A session of another tenant and a session that does not exist give the same error.
        Concurrent resumes of one session share one load.
        """
        key = f"{tenant}/{session_id}"
        while (unloading := self._unloading.get(key)) is not None:
            await asyncio.shield(unloading)  # a session being unloaded is loaded again after
        session = self.sessions.get(key)
        if session is not None and session.lease is not None and not session.lease.valid:
            await self.drop(session, "its lease expired")  # then load it again, if it is ours
            session = None
        if session is None:
            loading = self._loading.get(key)
            if loading is None:
                loading = asyncio.get_running_loop().create_future()
                self._loading[key] = loading
                try:
                    loading.set_result(await self._load(tenant, session_id))
                except asyncio.CancelledError:
                    loading.set_exception(UnavailableError("the session load was interrupted"))
                    loading.exception()
                    raise
                except Exception as exc:
                    loading.set_exception(exc)
                    loading.exception()  # retrieved here; waiters get it too
                finally:
                    del self._loading[key]
                session = loading.result()
            else:
                try:
                    session = await asyncio.shield(loading)
                except RequestError as exc:  # each waiter gets its own copy (its own event_id)
                    mine = copy.copy(exc)
                    mine.event_id = None
                    raise mine from exc
        self._audit(tenant, "resume", session_id)
        return session

    async def _load(self, tenant: str, session_id: str) -> Session:
        directory = self.directory(tenant, session_id)
        meta = await self.store.get(session_id)
        on_disk = (directory / BANK_DIR).exists() and (
            self.keystore is None or self.keystore.has_session_key(tenant, session_id)
        )
        if (meta is not None and meta.tenant != tenant) or not on_disk:
            self._audit(tenant, "denied", session_id, code="session_not_found")
            raise SessionNotFoundError("no such session")
        with self._admitted(tenant):
            lease = None
            if self.leases is not None:
                floor = await self._call_storage(lambda: read_fence(directory))
                lease = await self._acquire(session_id, floor)
            try:
                opened = await self._call_storage(
                    lambda: self._open(tenant, session_id, new=False, lease=lease)
                )
            except BaseException:
                await self._release(lease)
                raise
            opened.lease = lease
            try:
                if meta is None:  # Redis lost it: the directory is the source of truth
                    meta = self._rebuilt_meta(tenant, session_id, opened)
                    await self.store.create(meta)
                    log.info("session %s: metadata rebuilt from its directory", session_id)
                else:
                    if opened.header is not None:  # the durable state file over the index,
                        # which misses turns acknowledged while Redis was unreachable
                        meta.turns, meta.tokens = opened.header.turns, opened.header.tokens
                        meta.bank_entries = len(opened.bank)
                    if lease is not None:
                        meta.owner = self.node_id
            except BaseException:
                await self.engine.call(lambda: opened.bank.close(sync=False))
                await self._release(lease)
                raise
            session = self._register(opened, session_id, tenant, meta)
        header_seq = opened.header.seq if opened.header is not None else 0
        session.seq = max(meta.last_seq, header_seq, opened.reserved_seq)
        session.seq_reserved = opened.reserved_seq
        session.memory_stop_reported = opened.state.memory_stopped is not None
        log.info("session %s loaded from disk (%d memory entries)", session_id, len(opened.bank))
        return session

    def _rebuilt_meta(self, tenant: str, session_id: str, opened: _Opened) -> SessionMeta:
        h = opened.header
        created = h.created_at if h is not None else state_file.created_at_of(opened.directory)
        return SessionMeta(
            session_id,
            tenant,
            created_at=created,
            last_active=time.time(),
            turns=h.turns if h is not None else 0,
            tokens=h.tokens if h is not None else 0,
            bank_entries=len(opened.bank),
            last_seq=max(h.seq if h is not None else 0, opened.reserved_seq),
            owner=self.node_id,
        )

    # -- ownership (cluster) -----------------------------------------------------------------------

    async def _acquire(self, session_id: str, floor: int) -> Lease | None:
        """Take the session's lease (None outside a cluster); another node's lease is a
        :class:`SessionElsewhereError` naming where the session is served."""
        if self.leases is None:
            return None
        got = await self.leases.acquire(session_id, floor)
        if isinstance(got, Owner):
            raise SessionElsewhereError(
                f"the session is served by node {got.node}; connect there",
                location=got.url,
                owner=got.node,
                retry_after_ms=got.expires_in_ms if got.expires_in_ms >= 0 else None,
            )
        log.info("session %s: lease taken (fencing token %d)", session_id, got.token)
        return got

    async def _release(self, lease: Lease | None) -> None:
        if lease is not None and self.leases is not None:
            await self.leases.release(lease)

    async def drop(self, session: Session, why: str) -> None:
        """Stop serving a session at once, writing nothing: this node lost its lease (another
        node owns it, or it expired while Redis was unreachable). Its client gets an ``error``
        (``session_moved``) and is detached; a resume finds the session where it is now."""
        if session.closed:
            return
        log.warning("session %s: stopped serving it here: %s", session.session_id, why)
        if session.lease is not None:
            session.lease.valid_until = 0.0  # every write from now on is refused
        done = asyncio.get_running_loop().create_future()
        self._unloading[session.key] = done
        try:
            await self._stop_response(session)
            session.closed = True
            self.sessions.pop(session.key, None)
            client = session.client
            moved = UnavailableError(
                "this node no longer owns the session; resume it to reach its owner",
                code="session_moved",
            )
            sender = session.sender
            if sender is not None:
                with contextlib.suppress(Exception):
                    await sender(p.stamp(p.error_event(moved), session.seq))
            session.detach()
            supersede(client)
            await self.engine.call(lambda: session.bank.close(sync=False))
        finally:
            del self._unloading[session.key]
            done.set_result(None)

    async def keep_leases(self) -> None:
        """Renew this node's leases until cancelled (the server runs it): one pipelined round
        every ``cluster.renew_interval_s``. A lost lease drops its session at once; while Redis
        does not answer, sessions are served until their leases may have expired."""
        assert self.leases is not None
        every = self.cluster.renew_every_s
        while True:
            with contextlib.suppress(StoreError):
                self.peers = await self.leases.announce()
            await asyncio.sleep(every)
            owned = [s for s in self.sessions.values() if s.lease is not None and not s.closed]
            try:
                results = await self.leases.renew([s.lease for s in owned if s.lease])
            except StoreError as exc:
                log.warning("cannot renew %d session leases: %s", len(owned), exc)
                results = [-1] * len(owned)
            for session, result in zip(owned, results, strict=True):
                if result == 0:
                    await self.drop(session, "another node took its lease")
                elif result == 2:
                    log.info("session %s: lease re-established in Redis", session.session_id)
                elif result < 0 and session.lease is not None and not session.lease.valid:
                    await self.drop(session, "its lease expired while Redis was unreachable")

    async def _call_storage(self, fn: Callable[[], T]) -> T:
        """Run a storage step on the worker; storage failures become UnavailableError."""
        try:
            return await self.engine.call(fn)
        except FencedError as exc:
            log.warning("write refused by the session's fencing token: %s", exc)
            raise UnavailableError(
                "this node no longer owns the session; resume it to reach its owner",
                code="session_moved",
            ) from exc
        except StorageError as exc:
            self.storage.failed(exc)
            raise UnavailableError(
                "the server cannot write to its storage right now; retry later",
                code="storage_unavailable",
            ) from exc
        except OSError as exc:
            self.storage.failed(StorageError(str(exc), exc.errno))
            raise UnavailableError(
                "the server cannot write to its storage right now; retry later",
                code="storage_unavailable",
            ) from exc
        except (BankFormatError, CheckpointError, PrivacyError) as exc:
            # The usual cause after an upgrade or a flag change: the session was written by
            # another model or memory layout (the default model, its memory layers); serving
            # that one again reads it. Nothing of the conversation is in the message.
            log.error(
                "session files cannot be loaded: %s (this server serves %s; a session written by"
                " another model or memory layout is read by serving that one: --model,"
                " --engine-memory-layers)",
                exc,
                self.model.describe(),
            )
            raise UnavailableError(
                "the session's stored memory cannot be read; it was not changed",
                code="session_unreadable",
            ) from exc

    # -- conversation ---------------------------------------------------------------------------

    async def add_item(self, session: Session, role: str, text: str) -> str:
        """Append a message to the session (fed to the model with the next response)."""
        item_id = p.new_id("item")
        self._append(session, item_id, role, text)
        await session.emit(p.item_created(item_id, role))
        return item_id

    def _append(self, session: Session, item_id: str, role: str, text: str) -> None:
        tokens = self.model.encode_turn(role, text)
        session.pending += tokens
        session.ledger.add(item_id, role, text, char_ends(self.model, tokens, text))

    def _record_reply(self, session: Session, result: ResponseResult) -> str | None:
        """Place the prompt's items at the positions the model gave them and add the reply
        (unless it was rolled back); returns the reply's item id."""
        ledger = session.ledger
        if result.start < 0:  # failed before its prompt was fed: nothing to place
            ledger.items = [it for it in ledger.items if it.start >= 0]
            return None
        reply_start = ledger.place(result.start)
        rolled_back = result.status == "cancelled" and not session.reply_commit_on_cancel
        if rolled_back or (result.reason == "cancelled" and not result.tokens):
            return None
        text = session.reply_prefix_text + result.text
        tokens = [*session.reply_prompt_tokens, *result.tokens]
        item_id = p.new_id("item")
        ends = char_ends(self.model, tokens, text)
        ledger.add(item_id, "assistant", text, ends, start=reply_start)
        return item_id

    async def memory_stats(self, session: Session) -> None:
        """Emit the session bank's statistics."""
        stats = await self.engine.call(session.bank.stats)
        await session.emit(p.memory_stats(stats.as_dict(), session.state.position))

    # -- responses ------------------------------------------------------------------------------

    async def start_response(
        self,
        session: Session,
        response_id: str,
        params: SamplingParams,
        commit_on_cancel: bool = False,
        *,
        prefix: str = "",
    ) -> None:
        """Admit a response for the session's pending items and stream it in a session-owned task.

        ``prefix`` is text the reply starts with (fed after the reply's opening tokens; the
        streamed deltas continue it and do not repeat it).
        """
        if session.responding:
            raise ConflictError(
                "a response is already active on this session", code="response_in_progress"
            )
        opening = [*self.model.reply_prefix, *(self.model.encode_text(prefix) if prefix else [])]
        prompt = [*session.pending, *opening]
        gen = self.engine.generation(
            session.state, session.bank, prompt, params, commit_on_cancel=commit_on_cancel
        )
        self.engine.generate(response_id, session.key, gen)  # may raise Overloaded/Conflict
        session.pending = []
        session.response_id = response_id
        session.reply_prompt_tokens = opening
        session.reply_prefix_text = prefix
        session.reply_commit_on_cancel = commit_on_cancel
        await session.emit(p.response_created(response_id))
        session.response_task = asyncio.create_task(
            self._stream(session, response_id, gen.collector), name=f"response-{response_id}"
        )

    async def _stream(self, session: Session, response_id: str, collector: OutputCollector) -> None:
        try:
            while True:
                text, result = await collector.get()
                if text:
                    await session.emit(p.output_text_delta(response_id, text))
                if result is not None:
                    break
            item_id = self._record_reply(session, result)
            result = await self._commit(session, result)
            provenance = session.ledger.provenance(result.attended)
            done = _response_done(response_id, result, len(session.bank))
            done["response"]["item_id"] = item_id
            done["response"]["memory"]["provenance"] = provenance
            await session.emit(done)
        except asyncio.CancelledError:
            self.engine.abort(response_id)
            raise
        except Exception:  # a bug: the client still gets its response.done
            log.exception("session %s: response %s failed", session.session_id, response_id)
            with contextlib.suppress(Exception):
                await session.emit(p.response_done_failed(response_id))
        finally:
            session.response_id = None

    async def _commit(self, session: Session, result: ResponseResult) -> ResponseResult:
        """Make the turn durable (committed bank log, state file) before acknowledging it, then
        index it in the store. Returns the result to acknowledge: ``failed`` (reason
        ``storage_unavailable``) when the disk refused the turn; nothing of it is then durable.
        """
        header = _state_header(session, turns=session.meta.turns + 1)

        def sync() -> int:
            session.check_fence()
            session.bank.sync()
            header.bank_position = session.bank.durable_position()
            state_file.save(self.model, session.directory, session.state, header, session.cipher)
            return len(session.bank)

        try:
            entries = await self.engine.call(sync)
        except FencedError as exc:
            log.warning(
                "session %s: turn refused by its fencing token: %s", session.session_id, exc
            )
            return dataclasses.replace(result, status="failed", reason="session_moved")
        except StorageError as exc:
            self.storage.failed(exc)
            log.error("session %s: turn not durable: %s", session.session_id, exc)
            return dataclasses.replace(result, status="failed", reason="storage_unavailable")
        self.storage.ok()
        if session.state.memory_stopped is not None and not session.memory_stop_reported:
            # The privacy budget is spent: tell the client once, and the auditor.
            session.memory_stop_reported = True
            self._audit(session.tenant, "budget_exhausted", session.session_id)
            await session.emit(p.memory_write_stopped("privacy_budget_exhausted"))
        if result.memory_written:
            await session.emit(p.memory_committed(result.memory_written, entries))
        session.meta.turns += 1
        session.meta.tokens = session.state.position
        session.meta.bank_entries = entries
        await self._index(session, last_seq=session.seq + 1)  # the response.done that follows
        return result

    async def _index(self, session: Session, **extra: float | int | str) -> None:
        """Record the session's metadata in the store; a store outage is logged, not fatal
        (the directory holds the truth; the next commit or a resume writes it again)."""
        meta = session.meta
        try:
            await self.store.update(
                session.session_id,
                tenant=meta.tenant,
                created_at=meta.created_at,
                turns=meta.turns,
                tokens=meta.tokens,
                bank_entries=meta.bank_entries,
                owner=meta.owner,
                **extra,
            )
        except StoreError as exc:
            log.warning(
                "session %s: metadata not indexed (will retry): %s", session.session_id, exc
            )

    def cancel(self, session: Session) -> bool:
        return session.response_id is not None and self.engine.abort(session.response_id)

    # -- persistence ----------------------------------------------------------------------------

    async def snapshot(self, session: Session) -> None:
        """Write a new bank generation and the generation state (atomically) on the worker thread."""

        header = _state_header(session, turns=session.meta.turns)

        def write() -> int:
            session.check_fence()
            session.bank.snapshot()
            header.bank_position = session.bank.durable_position()
            state_file.save(self.model, session.directory, session.state, header, session.cipher)
            state_file.reserve_seq(session.directory, session.seq)  # exact: nothing in flight
            return len(session.bank)

        started = time.perf_counter()
        entries = await self._call_storage(write)
        if self.metrics is not None:
            self.metrics.snapshot.observe(time.perf_counter() - started)
        session.meta.bank_entries = entries
        await self._index(session, last_seq=session.seq)

    async def _stop_response(self, session: Session) -> None:
        if session.responding:
            assert session.response_task is not None
            self.cancel(session)
            with contextlib.suppress(asyncio.CancelledError):
                await session.response_task

    async def unload(self, session: Session) -> None:
        """Snapshot and drop a session from memory (it can be resumed later). A resume that
        arrives meanwhile waits, then loads the snapshot: it never attaches to a closing one."""
        done = asyncio.get_running_loop().create_future()
        self._unloading[session.key] = done
        try:
            await self._stop_response(session)
            try:
                await self.snapshot(session)
            except UnavailableError as exc:
                if exc.code != "session_moved":
                    raise
                await self.engine.call(lambda: session.bank.close(sync=False))
            else:
                await self.engine.call(session.bank.close)
            session.closed = True
            self.sessions.pop(session.key, None)
            await self._release(session.lease)  # another node may take it at once
        finally:
            del self._unloading[session.key]
            done.set_result(None)

    async def delete(self, session: Session) -> None:
        """Cancel, forget and erase a session everywhere: the in-memory caches, the data key
        (crypto-erasure), every bank generation, log and state file, and its Redis keys. The
        audit log keeps the fact of the erasure, without content."""
        await self._stop_response(session)
        await self._call_storage(session.check_fence)  # a stale owner erases nothing
        session.closed = True
        self.sessions.pop(session.key, None)
        await self.engine.call(lambda: session.bank.close(sync=False))  # erased next: no sync
        session.events.clear()
        sid, tenant = session.session_id, session.tenant

        async def delete_keys(keys: list[str]) -> None:
            await self.store.delete(sid, tenant)

        try:
            await erase_session(
                self.data_dir,
                tenant,
                sid,
                self.keystore,
                delete_keys,
                [self.store.session_key(sid)],
                audit=self.audit,
            )
        except PrivacyError as exc:  # the audit log says which steps took effect
            log.error("session %s: erasure incomplete: %s", sid, exc)
            raise UnavailableError(
                "the erasure could not finish (storage or Redis failed); the session's data key"
                " is destroyed first, so what remains is unreadable",
                code="erasure_incomplete",
            ) from exc
        if self.leases is not None:
            with contextlib.suppress(StoreError):
                await self.leases.forget(sid)
        log.info("session %s erased", sid)

    def detached(self, session: Session) -> None:
        """The session's client went away: cancel its response unless a client resumes within
        the grace period (every response ends, with or without a client)."""
        if session.response_id is None:
            return
        response_id = session.response_id

        def expire() -> None:
            if session.sender is None and session.response_id == response_id:
                log.info(
                    "session %s: no client resumed within the grace period; cancelling",
                    session.session_id,
                )
                self.engine.abort(response_id)

        asyncio.get_running_loop().call_later(self.limits.disconnect_grace_s, expire)

    async def unload_idle(self, now: float | None = None) -> int:
        """Snapshot and unload sessions with no client and no response for ``idle_unload_s``."""
        now = time.monotonic() if now is None else now
        idle = [
            s
            for s in self.sessions.values()
            if s.sender is None
            and s.detached_at is not None
            and now - s.detached_at >= self.limits.idle_unload_s
            and not s.responding
        ]
        for session in idle:
            await self.unload(session)
            log.info("session %s unloaded after idling", session.session_id)
        return len(idle)

    async def aclose(self) -> None:
        """Snapshot every live session (graceful shutdown)."""
        for session in list(self.sessions.values()):
            try:
                await self.unload(session)
            except Exception:
                log.exception("could not snapshot session %s", session.session_id)


@dataclass
class _Opened:
    state: SessionState
    bank: MemoryBank
    privacy: SessionPrivacy
    cipher: SessionCipher | None
    directory: Path
    header: state_file.StateHeader | None = None
    reserved_seq: int = 0
    ledger: Ledger = dataclasses.field(default_factory=Ledger)
    lease: Lease | None = None


def _state_header(session: Session, *, turns: int) -> state_file.StateHeader:
    return state_file.StateHeader(
        session.session_id,
        session.meta.created_at,
        turns=turns,
        tokens=session.state.position,
        seq=session.seq,
        ledger=session.ledger.as_json(),
        fence=session.lease.token if session.lease is not None else 0,
    )


def _response_done(response_id: str, result: ResponseResult, entries: int) -> dict[str, Any]:
    return p.response_done(
        response_id,
        status=result.status,
        reason=result.reason,
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        retrieved=result.memory_retrieved,
        written=result.memory_written,
        entries=entries,
        error=_failure_message(result),
    )


def _failure_message(result: ResponseResult) -> str | None:
    if result.reason == "storage_unavailable":
        return (
            "the server's storage did not take this turn (disk full or failing): it is not"
            " durable; it becomes durable with the next turn that succeeds, and a restart"
            " before then loses it"
        )
    return "internal error" if result.error else None


def _tenant_tag(tenant: str) -> str:
    """A short, stable, non-reversible tag for logs."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:8]
