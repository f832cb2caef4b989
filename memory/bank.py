"""A per-session kNN memory bank: keys, values and per-entry metadata behind a FAISS index.

Invariant: row ``i`` of the FAISS index, of ``_keys``, of ``_values`` and of every metadata
array describe the same entry, so a returned value always belongs to its returned key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from agent_runtime.errors import BankCapacityError, MemoryBankError
from memory.config import MemoryConfig

__all__ = ["BankStats", "MemoryBank", "SearchResult", "search_banks"]


@dataclass
class SearchResult:
    """Top-k results for ``q`` queries; invalid slots have ``mask == False`` and ``ids == -1``."""

    values: np.ndarray  # (q, k, value_dim) float32
    scores: np.ndarray  # (q, k) float32, inner products
    ids: np.ndarray  # (q, k) int64 stable entry ids
    mask: np.ndarray  # (q, k) bool


@dataclass
class BankStats:
    entries: int
    capacity: int
    added_total: int
    evicted_total: int
    pruned_total: int
    key_dim: int
    value_dim: int
    bytes: int


class MemoryBank:
    """One session's memory for one memory layer."""

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        config: MemoryConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key_dim = key_dim
        self.value_dim = value_dim
        self.config = config or MemoryConfig()
        self.config.validate()
        self._clock = clock
        self._index = faiss.IndexFlatIP(key_dim)
        self._keys = np.empty((0, key_dim), np.float32)
        self._values = np.empty((0, value_dim), np.float32)
        self._ids = np.empty((0,), np.int64)
        self._positions = np.empty((0,), np.int64)
        self._written_at = np.empty((0,), np.float64)
        self._next_id = 0
        self._added_total = 0
        self._evicted_total = 0
        self._pruned_total = 0

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def add(self, keys: np.ndarray, values: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        """Append entries (evicting the oldest at capacity); returns their stable ids."""
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if keys.ndim != 2 or keys.shape[1] != self.key_dim:
            raise MemoryBankError(f"keys must have shape (n, {self.key_dim}), got {keys.shape}")
        if values.shape != (keys.shape[0], self.value_dim):
            raise MemoryBankError(f"values must have shape ({keys.shape[0]}, {self.value_dim}), got {values.shape}")
        n = keys.shape[0]
        if n > self.config.capacity:
            raise BankCapacityError(f"cannot add {n} entries to a bank of capacity {self.config.capacity}")
        overflow = len(self) + n - self.config.capacity
        if overflow > 0:
            self._evict_oldest(overflow)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        if positions is None:
            positions = ids
        self._index.add(keys)
        self._keys = np.concatenate([self._keys, keys])
        self._values = np.concatenate([self._values, values])
        self._ids = np.concatenate([self._ids, ids])
        self._positions = np.concatenate([self._positions, np.asarray(positions, np.int64)])
        self._written_at = np.concatenate([self._written_at, np.full(n, self._clock())])
        self._added_total += n
        return ids

    def _evict_oldest(self, m: int) -> None:
        self._index.remove_ids(np.arange(m, dtype=np.int64))
        self._keys = self._keys[m:]
        self._values = self._values[m:]
        self._ids = self._ids[m:]
        self._positions = self._positions[m:]
        self._written_at = self._written_at[m:]
        self._evicted_total += m

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-``k`` entries by inner product for each query row."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.key_dim:
            raise MemoryBankError(f"queries must have shape (q, {self.key_dim}), got {queries.shape}")
        q = queries.shape[0]
        if len(self) == 0 or q == 0:
            return SearchResult(
                values=np.zeros((q, k, self.value_dim), np.float32),
                scores=np.zeros((q, k), np.float32),
                ids=np.full((q, k), -1, np.int64),
                mask=np.zeros((q, k), bool),
            )
        scores, rows = self._index.search(queries, k)
        mask = rows >= 0
        safe = np.where(mask, rows, 0)
        values = self._values[safe]
        values[~mask] = 0.0
        ids = np.where(mask, self._ids[safe], -1)
        scores = np.where(mask, scores, 0.0).astype(np.float32)
        return SearchResult(values=values, scores=scores, ids=ids, mask=mask)

    def stats(self) -> BankStats:
        return BankStats(
            entries=len(self),
            capacity=self.config.capacity,
            added_total=self._added_total,
            evicted_total=self._evicted_total,
            pruned_total=self._pruned_total,
            key_dim=self.key_dim,
            value_dim=self.value_dim,
            bytes=int(self._keys.nbytes + self._values.nbytes + self._ids.nbytes * 3),
        )

    def get(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of live entries by id (for tests and export)."""
        rows = np.searchsorted(self._ids, ids)
        if np.any(rows >= len(self)) or np.any(self._ids[np.minimum(rows, len(self) - 1)] != ids):
            raise MemoryBankError("unknown or evicted entry id")
        return self._keys[rows], self._values[rows]


def search_banks(banks: Sequence[MemoryBank], queries: Sequence[np.ndarray], k: int) -> list[SearchResult]:
    """Search many sessions' banks in one step (one result per bank)."""
    if len(banks) != len(queries):
        raise MemoryBankError("one query block per bank")
    return [bank.search(q, k) for bank, q in zip(banks, queries, strict=True)]
