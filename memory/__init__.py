"""Per-session kNN memory banks (FAISS), their pruning and eviction, snapshots and append logs.

Public surface: :class:`MemoryBank` (one per session and memory layer), :func:`search_banks`
(one decoding step's searches across sessions), :class:`MemoryConfig`, the result types and
the :class:`Cipher` protocol for encryption at rest. Errors are those of
:mod:`agent_runtime.errors` (``MemoryBankError``, ``BankFormatError``, ``BankCapacityError``).
"""

from __future__ import annotations

from memory.bank import BankStats, MemoryBank, SearchResult, search_banks
from memory.config import MemoryConfig
from memory.persist import Cipher

__all__ = ["BankStats", "Cipher", "MemoryBank", "MemoryConfig", "SearchResult", "search_banks"]
