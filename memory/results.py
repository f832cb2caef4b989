"""What a bank returns: search results and statistics (plain data, no behaviour)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

__all__ = ["BankStats", "SearchResult"]


@dataclass
class SearchResult:
    """Top-k results for ``q`` queries; invalid slots have ``mask == False`` and ``ids == -1``.

    :meth:`~memory.bank.MemoryBank.search_parts` returns the same fields with a leading
    ``parts`` axis (values (parts, q, k, value_dim / parts)) plus ``keys`` and ``positions``.

    Valid results come first in each row, best score first; invalid ones have zero values
    and scores.
    """

    values: np.ndarray  # (q, k, value_dim) float32
    scores: np.ndarray  # (q, k) float32, inner products with the stored keys
    ids: np.ndarray  # (q, k) int64 stable entry ids
    mask: np.ndarray  # (q, k) bool
    positions: np.ndarray | None = None
    """Stored positions of the entries (-1 where invalid)."""
    keys: np.ndarray | None = None
    """Stored keys (``search_parts`` only): (parts, q, k, key_dim / parts) float32."""


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
    """Bytes held for the entries: key codes (and index overhead), values, metadata."""
    index: str = "flat"
    """``flat`` (exact) or ``ivf`` (approximate)."""
    slots: int = 0
    """Rows in the store and the index (live + free, reused before the store grows)."""
    generation: int = 0
    """Snapshot generation on disk (0: none yet, or not persistent)."""
    log_bytes: int = 0
    """Size of the append log since the last snapshot."""

    def as_dict(self) -> dict[str, int | str]:
        return dataclasses.asdict(self)
