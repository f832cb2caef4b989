"""Configuration of a per-session kNN memory bank."""

from __future__ import annotations

from dataclasses import dataclass

from agent_runtime.errors import ConfigError

EVICTION_POLICIES = ("fifo", "importance")


@dataclass
class MemoryConfig:
    """Limits and policies of each session's memory bank.

    Every field is a CLI flag ``--memory-<field>`` and an env var ``AGENT_RUNTIME_MEMORY_<FIELD>``.
    """

    capacity: int = 1_048_576
    """Maximum entries per bank; at capacity the policy evicts exactly the entries needed."""
    eviction: str = "fifo"
    """Eviction policy at capacity: ``fifo`` (oldest first) or ``importance`` (least decayed retrieval mass)."""
    ttl_s: float = 0.0
    """Entries older than this many seconds are never returned again (0 disables)."""
    staleness_s: float = 0.0
    """Entries not retrieved for this many seconds (and older than ``min_age_s``) are pruned (0 disables)."""
    min_age_s: float = 600.0
    """Staleness pruning never removes entries younger than this."""
    importance_half_life_s: float = 3600.0
    """Half-life of the retrieval mass used by the importance policy."""

    def validate(self) -> None:
        if self.capacity < 1:
            raise ConfigError("memory.capacity", self.capacity, "must be >= 1")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError("memory.eviction", self.eviction, f"must be one of {EVICTION_POLICIES}")
        for name in ("ttl_s", "staleness_s", "min_age_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"memory.{name}", getattr(self, name), "must be >= 0")
        if self.importance_half_life_s <= 0:
            raise ConfigError("memory.importance_half_life_s", self.importance_half_life_s, "must be > 0")
