"""Per-session kNN memory banks (FAISS), their pruning and eviction, snapshots and append logs."""

from __future__ import annotations

from memory.bank import BankStats, MemoryBank, SearchResult, search_banks
from memory.config import MemoryConfig

__all__ = ["BankStats", "MemoryBank", "MemoryConfig", "SearchResult", "search_banks"]
