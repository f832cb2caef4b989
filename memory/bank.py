"""A per-session kNN memory bank: keys, values and per-entry metadata behind a FAISS index.

Layout (see docs/memory.md): a :class:`~memory.storage.SlotStore` holds values and metadata
by slot, a :class:`~memory.index.KeyIndex` holds keys with row ``s`` = slot ``s``. Evicted and
pruned entries are marked dead in a bitmap that every search applies, and their slots are
reused by the next adds, so no operation moves or re-indexes live entries and a returned value
always belongs to its returned key. :class:`~memory.policy.MinQueue` finds the entries to
evict or expire without scanning the bank.

The bank owns its persistence: ``state_dict`` / ``load_state_dict`` capture and restore it,
``open`` rebuilds it from a directory's snapshot state and log operations, and every operation
is reported to its :class:`~memory.durable.Journal` (which only writes files, never sees a bank).

A bank is not thread-safe: use it from one thread at a time (different banks may be searched
concurrently, as :func:`search_banks` does).
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent_runtime.errors import BankCapacityError, BankFormatError, MemoryBankError
from memory.config import MemoryConfig
from memory.durable import (
    Add,
    Journal,
    Meta,
    Operation,
    Prune,
    Remove,
    Switch,
    Touch,
    meta_json,
    recover,
    replay_error,
)
from memory.index import FlatKeys, KeyIndex, PartitionedKeys, build_ivf
from memory.persist import Cipher
from memory.policy import MinQueue, expiry_keys, fifo_keys, importance_keys
from memory.results import BankStats, SearchResult
from memory.state import build_state, restore_state
from memory.storage import SlotStore

__all__ = ["BankStats", "MemoryBank", "SearchResult", "search_banks"]

_WHAT_STATE = "bank state_dict"


class MemoryBank:
    """One session's memory: one entry per token, for one memory layer or (``parts`` > 1) for
    several heads side by side, each searched on its own (:meth:`search_parts`)."""

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        config: MemoryConfig | None = None,
        *,
        parts: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if key_dim < 1 or value_dim < 1:
            raise MemoryBankError(f"dims must be >= 1, got key_dim={key_dim} value_dim={value_dim}")
        if parts < 1 or key_dim % parts or value_dim % parts:
            raise MemoryBankError(
                f"parts must divide the dims, got parts={parts} for ({key_dim}, {value_dim})"
            )
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.parts = parts
        self.config = (config or MemoryConfig()).validate()
        self.meta: dict[str, object] = {}
        self.recovered_uncommitted = 0  # log records after the last commit, dropped by open()
        self._clock = clock
        self._last_time = -math.inf
        self._next_id = 0
        self._added_total = 0
        self._evicted_total = 0
        self._pruned_total = 0
        value_dtype = np.dtype(np.float16 if self.config.value_storage == "fp16" else np.float32)
        self._store = SlotStore(value_dim, value_dtype, reserve=self.config.capacity)
        self._index: KeyIndex = self._new_index()
        self._make_queues()
        self._journal: Journal | None = None  # set by open(): the bank's directory
        self._closed = False
        # Retrievals since the last change, applied (and logged) as one touch before the next
        # operation that could read them: a step that searches many layers logs one record.
        self._pending_hits: list[tuple[float, np.ndarray]] = []
        self._id_slots: np.ndarray | None = None  # id -> slot, for neighbours (search_parts)
        self._id_slots_version: tuple[int, ...] = ()
        self._removed_since = False
        self._ivf_build: _IVFBuild | None = None  # an IVF index training off the engine thread

    # -- construction helpers -------------------------------------------------------------------

    def _new_index(self) -> KeyIndex:
        if self.parts > 1:
            return PartitionedKeys(self.key_dim, self.config.flat_storage, self.parts)
        return FlatKeys(self.key_dim, self.config.flat_storage)

    def _make_queues(self) -> None:
        c = self.config
        key_fn = fifo_keys if c.eviction == "fifo" else importance_keys(c.importance_half_life_s)
        self._evict_q = MinQueue(self._store, key_fn)
        self._expire_q: MinQueue | None = None
        if c.ttl_s > 0 or c.staleness_s > 0:
            self._expire_q = MinQueue(self._store, expiry_keys(c.ttl_s, c.staleness_s, c.min_age_s))

    def _set_config(self, config: MemoryConfig) -> None:
        self.config = config
        self._make_queues()

    @classmethod
    def open(
        cls,
        directory: Path,
        key_dim: int,
        value_dim: int,
        config: MemoryConfig | None = None,
        *,
        cipher: Cipher | None = None,
        clock: Callable[[], float] = time.time,
        upto: tuple[int, int] | None = None,
        parts: int = 1,
    ) -> MemoryBank:
        """Create or restore the bank stored in ``directory`` (snapshot + log replay).

        ``upto``, a :meth:`durable_position` the caller recorded when it acknowledged, bounds
        the replay: commits after it are dropped, and a directory holding less raises
        :class:`BankFormatError` before anything is written.

        The restored bank holds exactly the state of the last :meth:`sync` (the last commit:
        operations after it were never acknowledged and are dropped, see
        :attr:`recovered_uncommitted`) and answers searches bit-identically. Raises
        :class:`BankFormatError` for torn, tampered or incompatible files (other dims, other
        key/value encodings, a missing cipher). Every operation is then logged. If the
        policies in ``config`` differ from the stored ones, a new generation is written, so
        later records replay under the new config.
        """
        bank = cls(key_dim, value_dim, config, parts=parts, clock=clock)
        config = bank.config
        found = recover(Path(directory), key_dim, value_dim, config, cipher)
        if upto is not None:
            found.limit(upto)
        if found.state is not None:
            bank.load_state_dict(found.state)
        if found.records is not None:
            bank._set_config(found.replay_config)  # records replay under their own config
            for op in found.operations():
                try:
                    bank._replay(op)
                except (ValueError, MemoryBankError) as exc:
                    raise replay_error(found.log_name, op.seq, exc) from exc
        bank._set_config(config)
        bank.recovered_uncommitted = found.uncommitted
        bank._journal = found.journal(config, bank.meta)
        if found.replay_config.to_dict() != config.to_dict():
            bank.snapshot()  # later records must replay under the new config
        return bank

    # -- public operations ------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._store.live

    def add(
        self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """Store entries; returns their stable ids (consecutive, never reused).

        At capacity the eviction policy first removes exactly the entries needed (expired
        entries go first). With a directory, the entries are appended to the log; they are
        durable after :meth:`sync`.
        """
        self._check_open()
        self._flush_touches()
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.key_dim:
            raise MemoryBankError(f"keys must have shape (n, {self.key_dim}), got {keys.shape}")
        n = keys.shape[0]
        if values.shape != (n, self.value_dim):
            raise MemoryBankError(
                f"values must have shape ({n}, {self.value_dim}), got {values.shape}"
            )
        if n > self.config.capacity:
            raise BankCapacityError(
                f"cannot add {n} entries to a bank of capacity {self.config.capacity}"
            )
        if positions is None:
            positions = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        if positions.shape != (n,):
            raise MemoryBankError(f"positions must have shape ({n},), got {positions.shape}")
        if not (np.isfinite(keys).all() and np.isfinite(values).all()):
            raise MemoryBankError("keys and values must be finite")
        if n == 0:
            return np.zeros(0, np.int64)
        if self._ivf_build is not None and self._ivf_build.future.done():
            self._finish_ivf()  # logged: replay brings its own build in at this very point
        now = self._now()
        if self._journal is not None:
            self._journal.add(now, keys, values, positions)
        return self._apply_add(now, keys, values, positions)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` live entries by inner product for each query row.

        Expired entries are pruned first, so they are never returned. Returned entries have
        their retrieval time and mass updated (importance and staleness policies).
        """
        self._check_open()
        if self.parts > 1:
            raise MemoryBankError("a bank with parts is searched with search_parts")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise MemoryBankError(
                f"queries must have shape (q, {self.key_dim}), got {queries.shape}"
            )
        if k < 0:
            raise MemoryBankError(f"k must be >= 0, got {k}")
        now = self._now()
        self._expire(now)
        st = self._store
        if st.live == 0 or k == 0 or queries.shape[0] == 0:
            q = queries.shape[0]
            return SearchResult(
                values=np.zeros((q, k, self.value_dim), np.float32),
                scores=np.zeros((q, k), np.float32),
                ids=np.full((q, k), -1, np.int64),
                mask=np.zeros((q, k), np.bool_),
                positions=np.full((q, k), -1, np.int64),
            )
        holes = st.live < self._index.ntotal
        scores, rows = self._index.search(
            queries,
            k,
            st.bitmap if holes else None,
            self.config.threads,
        )
        mask = rows >= 0
        safe = np.where(mask, rows, 0)
        # the selector already excludes dead rows; this makes it an invariant
        mask &= st.alive[safe]
        values = st.values[safe].astype(np.float32, copy=False)
        values[~mask] = 0.0
        ids = np.where(mask, st.ids[safe], -1)
        scores = np.where(mask, scores, 0.0).astype(np.float32)
        self._touch(now, rows[mask])
        positions = np.where(mask, st.positions[safe], -1)
        return SearchResult(values=values, scores=scores, ids=ids, mask=mask, positions=positions)

    def search_parts(
        self, queries: np.ndarray, k: int, first: int = 0, span: int = 0
    ) -> SearchResult:
        """Top-``k`` live entries of each part ``first + p`` for the query rows ``queries[p]``
        ((P, q, key_dim / parts)); results have a leading P axis and carry the entries' keys and
        positions (what a pretrained decoder needs to attend to them at chosen positions).

        ``span`` > 0 also returns, for every hit, the live entries whose ids are within
        ``span`` of it (its neighbours in the conversation: a fact comes back with the words
        around it, as InfLLM retrieves blocks), each entry once per row; rows then hold
        ``k * (2 * span + 1)`` slots, not sorted by score (a neighbour carries its hit's score).

        One call per memory layer and step: expiry runs once, and the retrievals of all parts
        are recorded as one touch (a token's weight is how many of its parts' rows were hit).
        """
        self._check_open()
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        d, dv = self.key_dim // self.parts, self.value_dim // self.parts
        if queries.ndim != 3 or queries.shape[2] != d or first < 0:
            raise MemoryBankError(f"queries must have shape (P, q, {d}), got {queries.shape}")
        P, q = queries.shape[:2]
        if first + P > self.parts:
            raise MemoryBankError(f"parts {first}..{first + P - 1} exceed the bank's {self.parts}")
        if k < 0 or span < 0:
            raise MemoryBankError(f"k and span must be >= 0, got k={k} span={span}")
        now = self._now()
        self._expire(now)
        st = self._store
        width = k * (2 * span + 1)
        if st.live == 0 or k == 0 or q == 0:
            return SearchResult(
                values=np.zeros((P, q, width, dv), np.float32),
                scores=np.zeros((P, q, width), np.float32),
                ids=np.full((P, q, width), -1, np.int64),
                mask=np.zeros((P, q, width), np.bool_),
                positions=np.full((P, q, width), -1, np.int64),
                keys=np.zeros((P, q, width, d), np.float32),
            )
        index = self._index
        bitmap = st.bitmap if st.live < index.ntotal else None
        threads = self.config.threads
        # the keys come back with the search (an IVF part decodes the codes it scanned);
        # neighbours (span) are other rows, read afterwards
        found: list[tuple[np.ndarray, ...]] = [
            index.search_part_with_keys(first + p, queries[p], k, bitmap, threads)
            if not span
            else index.search_part(first + p, queries[p], k, bitmap, threads)
            for p in range(P)
        ]
        scores = np.stack([f[0] for f in found])
        rows = np.stack([f[1] for f in found])
        mask = rows >= 0
        safe = np.where(mask, rows, 0)
        mask &= st.alive[safe]
        self._touch(now, rows[mask])
        if span:
            rows, mask, scores = self._with_neighbours(rows, mask, scores, span)
            safe = np.where(mask, rows, 0)
            keys = np.stack([index.part_keys(first + p, safe[p]) for p in range(P)])
        else:
            keys = np.stack([f[2] for f in found])
        # one flat take (row slot * parts + part): numpy's two-array fancy index is ~10x slower
        flat = (safe * self.parts + (first + np.arange(P))[:, None, None]).ravel()
        values = st.values.reshape(-1, dv).take(flat, axis=0).reshape(*safe.shape, dv)
        values = values.astype(np.float32, copy=False)
        values[~mask] = 0.0
        keys[~mask] = 0.0
        return SearchResult(
            values=values,
            scores=np.where(mask, scores, 0.0).astype(np.float32),
            ids=np.where(mask, st.ids[safe], -1),
            mask=mask,
            positions=np.where(mask, st.positions[safe], -1),
            keys=keys,
        )

    def _with_neighbours(
        self, rows: np.ndarray, mask: np.ndarray, scores: np.ndarray, span: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each hit (P, q, k) and the live entries with ids within ``span`` of it, each entry
        once per row: (rows, mask, scores) of shape (P, q, k * (2 * span + 1))."""
        st = self._store
        ids = np.where(mask, st.ids[np.where(mask, rows, 0)], -1)
        offsets = np.arange(-span, span + 1)
        near = (ids[..., None] + offsets).reshape(*ids.shape[:2], -1)
        near_ok = np.repeat(mask, offsets.shape[0], axis=-1) & (near >= 0) & (near < self._next_id)
        table = self._slot_of_id()
        slots = np.where(near_ok, table[np.clip(near, 0, max(self._next_id - 1, 0))], -1)
        ok = slots >= 0
        # the same entry reached from two hits is kept once (sorted by id, later copies dropped)
        key = np.where(ok, near, -1 - np.arange(near.shape[-1]))  # invalid keys never collide
        order = np.argsort(key, axis=-1, kind="stable")
        ranked = np.take_along_axis(key, order, axis=-1)
        dup = np.zeros_like(ok)
        dup_sorted = np.zeros_like(ok)
        dup_sorted[..., 1:] = ranked[..., 1:] == ranked[..., :-1]
        np.put_along_axis(dup, order, dup_sorted, axis=-1)
        ok &= ~dup
        return (
            np.where(ok, slots, -1),
            ok,
            np.repeat(scores, offsets.shape[0], axis=-1),
        )

    def _slot_of_id(self) -> np.ndarray:
        """slot of every id < next_id (-1: evicted, pruned or removed), rebuilt after changes."""
        st = self._store
        version = (self._next_id, st.live, self._evicted_total, self._pruned_total, st.hwm)
        if self._id_slots is None or self._id_slots_version != version or self._removed_since:
            table = np.full(self._next_id, -1, np.int64)
            live = st.live_slots()
            table[st.ids[live]] = live
            self._id_slots, self._id_slots_version, self._removed_since = table, version, False
        return self._id_slots

    def _touch(self, now: float, hit_rows: np.ndarray) -> None:
        """Record retrievals (each hit row adds weight 1 to its entry's mass), coalesced until
        :meth:`_flush_touches`."""
        if hit_rows.shape[0]:
            self._pending_hits.append((now, hit_rows))

    def _flush_touches(self) -> None:
        """Apply and log the coalesced retrievals as one touch record.

        Each entry is touched at the time of its own latest hit, and an earlier hit at ``t``
        enters with weight ``2^-((t_latest - t) / half_life)``: exactly what applying every
        hit at its own time gives, for importance and for staleness alike (searches that find
        nothing due leave their hits pending across many steps, see :meth:`_expire`; an entry
        hit once long ago must not look as fresh as the last hit of another). Called before
        anything that reads mass or frees slots (add: eviction; remove; an expiry with
        something due; state dicts, syncs, snapshots), so live and replayed banks apply the
        same touches at the same times: a step that searches thirty memory layers logs one
        record per block instead of thirty per token.
        """
        if not self._pending_hits:
            return
        pending, self._pending_hits = self._pending_hits, []
        rows = np.concatenate([hits for _, hits in pending])
        times = np.concatenate([np.full(h.shape[0], t, np.float64) for t, h in pending])
        touched, inverse = np.unique(rows, return_inverse=True)
        latest = np.full(touched.shape[0], -np.inf)
        np.maximum.at(latest, inverse, times)
        decay = np.exp2(-(latest[inverse] - times) / self.config.importance_half_life_s)
        weights = np.zeros(touched.shape[0], np.float64)
        np.add.at(weights, inverse, decay)
        # hits of one time (one step's searches) keep the compact TOUCH record; hits pending
        # across steps (the usual case between two adds) cost 8 more bytes per entry
        when: float | np.ndarray = float(latest[0]) if latest.min() == latest.max() else latest
        if self._journal is not None:
            self._journal.touch(when, touched, self._store.ids[touched], weights)
        self._apply_touch(when, touched, weights)

    def prune(self, now: float | None = None) -> int:
        """Remove entries past their TTL or stale; returns how many were removed.

        Search prunes on its own, so calling this only reclaims storage earlier.
        """
        self._check_open()
        return self._expire(self._now() if now is None else float(now))

    def remove(self, ids: np.ndarray) -> int:
        """Remove live entries by id (e.g. the memories of a cancelled reply); returns how many.

        Unknown or already removed ids raise :class:`MemoryBankError` and remove nothing. With a
        directory the removal is logged, so a replay never resurrects the entries.
        """
        self._check_open()
        self._flush_touches()
        ids = np.unique(np.asarray(ids, np.int64).reshape(-1))
        if ids.shape[0] == 0:
            return 0
        slots = self._slots_of(ids)
        if self._journal is not None:
            self._journal.remove(ids)
        self._store.release(slots)
        self._removed_since = True
        return int(slots.shape[0])

    def stats(self) -> BankStats:
        st = self._store
        return BankStats(
            entries=len(self),
            capacity=self.config.capacity,
            added_total=self._added_total,
            evicted_total=self._evicted_total,
            pruned_total=self._pruned_total,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            bytes=st.nbytes() + self._index.nbytes(),
            index=self._index.kind,
            slots=st.hwm,
            generation=self._journal.generation if self._journal is not None else 0,
            log_bytes=self._journal.size() if self._journal is not None else 0,
        )

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stored keys (decoded to float32) and values of live entries by id (tests, export)."""
        slots = self._slots_of(np.asarray(ids, np.int64).reshape(-1))
        return self._index.reconstruct(slots), self._store.values[slots].astype(np.float32)

    @property
    def index_building(self) -> bool:
        """Whether an IVF index is being built in the background (the flat one answers)."""
        return self._ivf_build is not None

    def build_index(self) -> None:
        """Bring in now an IVF index being built in the background (``memory.ivf_build``),
        waiting for it; a no-op otherwise. For benchmarks and tests that need the bank's
        final index at once; serving lets the next add do it."""
        self._check_open()
        self._finish_ivf()

    def live_ids(self) -> np.ndarray:
        """Ids of all live entries, ascending."""
        return np.sort(self._store.ids[self._store.live_slots()])

    # -- state dicts ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that restores this bank exactly: entries, keys, metadata, counters, clock.

        A plain dict, versioned (layout: :mod:`memory.state`): JSON data (``meta`` is a copy)
        plus ``"arrays"``, numpy arrays that are views of the bank's storage, valid until the
        bank next changes (copy them to keep a state). Raises :class:`MemoryBankError` if
        ``meta`` is not JSON-serialisable.
        """
        self._flush_touches()
        self._finish_ivf()  # a pending IVF build comes in here: a snapshot never holds one
        counters = dict(
            next_id=self._next_id,
            added_total=self._added_total,
            evicted_total=self._evicted_total,
            pruned_total=self._pruned_total,
        )
        meta = json.loads(meta_json(self.meta))
        parts = (self.config, meta, counters, self._last_time, self._store, self._index)
        return build_state(self.key_dim, self.value_dim, *parts)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this bank's contents with ``state`` (a :meth:`state_dict` of a bank with the
        same dims and layout fields); afterwards it answers exactly as that bank did.

        ``state`` is validated before anything changes: :class:`BankFormatError` names what is
        wrong (version, dims, encodings, a missing field, array sizes, the key index). The
        bank keeps its own config (its policies apply from the next operation). A bank with
        a directory refuses (:class:`MemoryBankError`): its log would no longer replay.
        """
        self._check_open()
        if self._journal is not None:
            raise MemoryBankError("cannot load a state dict into a bank that has a directory")
        restored = restore_state(state, self.key_dim, self.value_dim, self.config)
        parts = restored.index.parts if isinstance(restored.index, PartitionedKeys) else 1
        if parts != self.parts:
            raise BankFormatError(f"{_WHAT_STATE} has {parts} key parts, this bank {self.parts}")
        self._store, self._index = restored.store, restored.index
        self._drop_ivf_build()
        self._pending_hits = []
        self._id_slots = None
        self._next_id = restored.counters["next_id"]
        self._added_total = restored.counters["added_total"]
        self._evicted_total = restored.counters["evicted_total"]
        self._pruned_total = restored.counters["pruned_total"]
        self._last_time = restored.last_time
        self.meta = restored.meta
        self._make_queues()

    # -- durability (no-ops without a directory) --------------------------------------------------

    def sync(self) -> None:
        """Make every add (and ``meta``) so far durable: it survives a crash or kill -9."""
        self._check_open()
        self._flush_touches()
        if self._journal is not None:
            self._journal.sync(self.meta)

    def durable_position(self) -> tuple[int, int] | None:
        """(generation, log records) that the last :meth:`sync` or :meth:`snapshot` made durable;
        a caller that records it beside its own files can later tell whether a reopened bank
        holds at least that much (None without a directory)."""
        return self._journal.position if self._journal is not None else None

    def snapshot(self) -> None:
        """Write a new generation atomically, then start an empty log and drop the old one."""
        self._check_open()
        if self._journal is not None:
            self._journal.snapshot(self.state_dict())

    def close(self, *, sync: bool = True) -> None:
        """Sync (unless ``sync`` is false: for a bank about to be erased) and release files.
        Idempotent; the bank is unusable afterwards."""
        if self._closed:
            return
        try:
            if self._journal is not None and sync:
                self.sync()
        finally:
            self._closed = True
            self._drop_ivf_build()  # a build still running is cancelled with the bank
            if self._journal is not None:
                self._journal.close()
                self._journal = None

    def __enter__(self) -> MemoryBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise MemoryBankError("bank is closed")

    def _now(self) -> float:
        # A bank's clock never goes backwards, so TTL expiry follows insertion order.
        self._last_time = max(self._last_time, float(self._clock()))
        return self._last_time

    def _apply_add(
        self, now: float, keys: np.ndarray, values: np.ndarray, positions: np.ndarray
    ) -> np.ndarray:
        n = keys.shape[0]
        self._last_time = max(self._last_time, now)
        st = self._store
        overflow = st.live + n - self.config.capacity
        if overflow > 0:
            overflow -= self._expire(now, log=False)  # replaying this add repeats it
        if overflow > 0:
            self._evicted_total += self._evict_q.pop_smallest(overflow, st.release)
        slots, n_new = st.allocate(n)
        reuse = n - n_new
        if reuse:
            self._index.overwrite(slots[:reuse], keys[:reuse])
        if n_new:
            if self._index.ntotal != int(slots[reuse]):
                raise MemoryBankError("key index and slot store are out of step")
            self._index.append(keys[reuse:])
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        self._added_total += n
        st.occupy(slots, values, ids, positions, now, self.config.importance_initial_mass)
        self._evict_q.note(slots)
        if self._expire_q is not None:
            self._expire_q.note(slots)
        if self._ivf_build is not None:
            if reuse:  # these rows' keys changed after the build copied them
                self._ivf_build.reused.append(slots[:reuse])
        elif self._wants_ivf():
            self._switch_to_ivf()
        return ids

    def _apply_touch(self, now: float | np.ndarray, slots: np.ndarray, weights: np.ndarray) -> None:
        st = self._store
        decay = np.exp2(-(now - st.retrieved_at[slots]) / self.config.importance_half_life_s)
        st.mass[slots] = st.mass[slots] * decay + weights
        st.retrieved_at[slots] = now
        if self.config.eviction == "importance":
            self._evict_q.note(slots)
        if self._expire_q is not None and self.config.staleness_s > 0:
            self._expire_q.note(slots)

    def _expire(self, now: float, *, log: bool = True) -> int:
        if self._expire_q is None or self._store.live == 0:
            return 0
        if self._expire_q.next_key() >= now:
            # nothing is due: retrievals not yet applied can only delay an expiry, so they
            # stay coalesced (a decode step's thirty searches log one touch, not thirty)
            return 0
        self._flush_touches()
        n = self._expire_q.pop_below(now, self._store.release)
        if n:
            self._pruned_total += n
            if log and self._journal is not None:
                self._journal.prune(now)
        return n

    def _replay(self, op: Operation) -> None:
        """Apply one logged operation as it was applied when logged (in :meth:`open`)."""
        match op:
            case Add():
                self._apply_add(op.now, op.keys, op.values, op.positions)
            case Touch():
                slots, st = op.slots, self._store
                if np.any((slots < 0) | (slots >= st.hwm)) or np.any(st.ids[slots] != op.ids):
                    raise ValueError("retrieval record names entries that are not in the bank")
                self._last_time = max(self._last_time, op.now)
                self._apply_touch(op.now if op.times is None else op.times, op.slots, op.weights)
            case Prune():
                self._last_time = max(self._last_time, op.now)
                self._expire(op.now)
            case Remove():
                self._store.release(self._slots_of(op.ids))
                self._removed_since = True
            case Meta():
                self.meta = op.meta
            case Switch():
                if self._ivf_build is None:
                    raise ValueError("index switch record without an IVF build in progress")
                self._finish_ivf(log=False)

    def _wants_ivf(self) -> bool:
        c = self.config
        threshold = c.ann_threshold if self.parts == 1 else c.part_ann_threshold
        return (
            c.index in ("auto", "ivf")
            and self._index.kind == "flat"
            and self._ivf_build is None
            and self._store.live >= threshold
        )

    def _switch_to_ivf(self) -> None:
        """Move every row into a new IVF index (one per part) trained on a sample of the live
        stored keys.

        With ``ivf_build = "background"`` the k-means and the filling of the new index run on
        a worker thread (FAISS releases the GIL) from a copy of the keys taken here, so the add
        that crossed the threshold returns at once and the flat index keeps answering,
        exactly. The first add after the build has finished brings it in (with the rows
        written since) and logs a ``SWITCH`` record there, so a replay brings its own build
        (the same keys, the same sample, the same index) in at the same point: the switch
        never depends on timing once written. A snapshot brings a pending build in first,
        waiting for it.
        """
        c = self.config
        keys = self._index.copy_parts()  # on this thread: later adds may grow the flat index
        live = self._store.live_slots()
        if c.ivf_build == "inline":
            self._index = build_ivf(c, self.key_dim, keys, live)
            return
        global _ivf_pool
        if _ivf_pool is None:  # one worker: builds queue rather than take cores from serving
            _ivf_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memory-ivf")
        cancel = threading.Event()
        future = _ivf_pool.submit(build_ivf, c, self.key_dim, keys, live, cancel)
        self._ivf_build = _IVFBuild(future, (c, self.key_dim, keys, live), cancel)

    def _finish_ivf(self, *, log: bool = True) -> None:
        """Bring a pending background build in (waiting for it): rows written since it started
        are appended and slots reused since rewritten, from the flat index, then it replaces
        the flat index (logged as ``SWITCH`` when ``log``). A build that failed on the worker
        is redone here from the same copy of the keys, so the result does not depend on it."""
        build = self._ivf_build
        if build is None:
            return
        try:
            ivf = build.future.result()
        except Exception:  # a worker failure: the same build, inline (raises if it fails too)
            ivf = build_ivf(*build.inputs)
        self._ivf_build = None
        hwm = self._store.hwm
        flat = self._index
        if hwm > build.rows:
            ivf.append(flat.reconstruct(np.arange(build.rows, hwm, dtype=np.int64)))
        if build.reused:
            rows = np.unique(np.concatenate(build.reused))
            rows = rows[rows < build.rows]
            if rows.shape[0]:
                ivf.overwrite(rows, flat.reconstruct(rows))
        if log and self._journal is not None:
            self._journal.switch()
        self._index = ivf

    def _drop_ivf_build(self) -> None:
        """Cancel a pending build (it stops at its next part) and forget it."""
        if self._ivf_build is not None:
            self._ivf_build.cancel.set()
            self._ivf_build.future.cancel()
            self._ivf_build = None

    def _slots_of(self, ids: np.ndarray) -> np.ndarray:
        live = self._store.live_slots()
        live_ids = self._store.ids[live]
        order = np.argsort(live_ids)
        pos = np.searchsorted(live_ids, ids, sorter=order)
        pos = np.minimum(pos, max(live.shape[0] - 1, 0))
        if live.shape[0] == 0 or np.any(live_ids[order[pos]] != ids):
            raise MemoryBankError("unknown or evicted entry id")
        return live[order[pos]]


@dataclass
class _IVFBuild:
    """An IVF index being built on the worker thread from a copy of the bank's keys
    (``inputs``: what :func:`build_ivf` was given, kept for a retry on this thread)."""

    future: Future[KeyIndex]
    inputs: tuple[MemoryConfig, int, list[np.ndarray], np.ndarray]
    cancel: threading.Event
    reused: list[np.ndarray] = field(default_factory=list)
    """Slots rewritten since the build started (below ``rows``: their keys changed)."""

    @property
    def rows(self) -> int:
        """Rows the build holds: those of the key copy it started from."""
        return int(self.inputs[2][0].shape[0])


_ivf_pool: ThreadPoolExecutor | None = None
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _search_group(
    banks: Sequence[MemoryBank], queries: Sequence[np.ndarray], k: int
) -> list[SearchResult]:
    return [bank.search(q, k) for bank, q in zip(banks, queries, strict=True)]


def search_banks(
    banks: Sequence[MemoryBank], queries: Sequence[np.ndarray], k: int
) -> list[SearchResult]:
    """Search many sessions' banks in one step (one result per bank, in order).

    With ``config.threads`` > 1 (of the first bank) the banks are split into that many
    contiguous groups searched in parallel: FAISS releases the GIL while scanning, and each
    scan runs single-threaded, so the threads never oversubscribe the cores.
    """
    global _pool, _pool_size
    if len(banks) != len(queries):
        raise MemoryBankError("one query block per bank")
    threads = min(banks[0].config.threads, len(banks)) if banks else 1
    if threads <= 1:
        return _search_group(banks, queries, k)
    if _pool is None or _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memory-search")
        _pool_size = threads
    bounds = np.linspace(0, len(banks), threads + 1).astype(int)
    futures = [
        _pool.submit(_search_group, banks[a:b], queries[a:b], k)
        for a, b in itertools.pairwise(bounds)
    ]
    return [res for f in futures for res in f.result()]
