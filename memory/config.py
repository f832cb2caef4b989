"""Configuration of a per-session kNN memory bank."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from agent_runtime.errors import BankFormatError, ConfigError

EVICTION_POLICIES = ("fifo", "importance")
INDEX_KINDS = ("auto", "flat", "ivf")
IVF_BUILDS = ("background", "inline")
FLAT_STORAGE = ("fp32", "fp16")
IVF_STORAGE = ("fp32", "fp16", "int8")
VALUE_STORAGE = ("fp32", "fp16")

# Fields that fix the on-disk layout of a bank: reopening a bank with other values is refused
# (BankFormatError) rather than silently mixing encodings.
LAYOUT_FIELDS = ("flat_storage", "ivf_storage", "value_storage", "ivf_nlist")


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
    importance_initial_mass: float = 1.0
    """Retrieval mass a new entry starts with, so fresh entries are not evicted before they can be retrieved."""
    index: str = "auto"
    """Key index: ``flat`` (exact), ``ivf`` (approximate once past ``ann_threshold``) or ``auto`` (= ivf)."""
    ann_threshold: int = 262_144
    """Live entries at which a bank switches from exact flat search to IVF (never switches back)."""
    part_ann_threshold: int = 16_384
    """The same for a bank with parts (a pretrained decoder's: one part per memory layer and KV head, each searched on every token): live entries at which every part moves to its own IVF index."""
    flat_storage: str = "fp32"
    """Key encoding while the bank is exact: ``fp32`` or ``fp16`` (half the bytes scanned per search)."""
    ivf_storage: str = "int8"
    """Key encoding in the IVF index: ``fp32``, ``fp16`` or ``int8`` (scalar quantiser trained on stored keys)."""
    value_storage: str = "fp32"
    """Value encoding: ``fp32`` (exact) or ``fp16`` (values come back rounded to half precision)."""
    ivf_nlist: int = 0
    """IVF inverted lists; 0 picks 2·sqrt(ann_threshold) rounded down to a power of two."""
    ivf_nprobe: int = 16
    """IVF lists scanned per query (recall/speed trade-off; see docs/memory.md)."""
    ivf_build: str = "background"
    """How the move to IVF is built: ``background`` (on a worker thread while the flat index keeps answering; the next add brings it in) or ``inline`` (inside the add that crosses the threshold, which then takes seconds)."""
    threads: int = 1
    """CPU threads one search call may use (FAISS OpenMP for batched queries, the search_banks pool)."""

    def validate(self) -> MemoryConfig:
        """Raise :class:`ConfigError` naming the first invalid field; returns ``self``."""
        if self.capacity < 1:
            raise ConfigError("memory.capacity", self.capacity, "must be >= 1")
        if self.eviction not in EVICTION_POLICIES:
            raise ConfigError(
                "memory.eviction", self.eviction, f"must be one of {EVICTION_POLICIES}"
            )
        for name in ("ttl_s", "staleness_s", "min_age_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"memory.{name}", getattr(self, name), "must be >= 0")
        for name in ("importance_half_life_s", "importance_initial_mass"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"memory.{name}", getattr(self, name), "must be > 0")
        choices = {
            "index": INDEX_KINDS,
            "flat_storage": FLAT_STORAGE,
            "ivf_storage": IVF_STORAGE,
            "value_storage": VALUE_STORAGE,
            "ivf_build": IVF_BUILDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"memory.{name}", getattr(self, name), f"must be one of {allowed}"
                )
        if self.ann_threshold < 1024:
            raise ConfigError("memory.ann_threshold", self.ann_threshold, "must be >= 1024")
        if self.part_ann_threshold < 1024:
            raise ConfigError(
                "memory.part_ann_threshold", self.part_ann_threshold, "must be >= 1024"
            )
        if self.ivf_nlist < 0 or (self.ivf_nlist and self.ivf_nlist * 32 > self.ann_threshold):
            raise ConfigError(
                "memory.ivf_nlist", self.ivf_nlist, "must be 0 (auto) or <= ann_threshold / 32"
            )
        if self.ivf_nprobe < 1:
            raise ConfigError("memory.ivf_nprobe", self.ivf_nprobe, "must be >= 1")
        if self.threads < 1:
            raise ConfigError("memory.threads", self.threads, "must be >= 1")
        return self

    def nlist(self) -> int:
        """The IVF list count in effect (``ivf_nlist`` or its automatic value)."""
        if self.ivf_nlist:
            return self.ivf_nlist
        target = 2 * int(self.ann_threshold**0.5)
        return 1 << max(4, target.bit_length() - 1)

    def part_nlist(self) -> int:
        """IVF lists of each part of a bank with parts: sqrt(part_ann_threshold) rounded down
        to a power of two (128 at 16K), and at most one list per 40 entries (k-means wants 39
        training points per centroid), so that training every part on one thread stays a
        pause of about a second, not minutes."""
        target = min(int(self.part_ann_threshold**0.5), self.part_ann_threshold // 40)
        return 1 << max(4, target.bit_length() - 1)

    def to_dict(self) -> dict[str, object]:
        """All fields as a JSON-serialisable dict (stored in snapshots and log headers)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> MemoryConfig:
        """Inverse of :meth:`to_dict`; unknown keys (from newer versions) are ignored."""
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        known.setdefault("ivf_build", "inline")  # written before the background build existed
        return cls(**known).validate()  # type: ignore[arg-type]


def check_layout(
    what: str, raw: object, key_dim: int, value_dim: int, config: MemoryConfig
) -> MemoryConfig:
    """The config stored in ``raw`` (a snapshot or log header, or a bank state dict), after
    checking that it describes a bank of these dims and of ``config``'s layout.

    ``raw`` must be a mapping with ``key_dim``, ``value_dim`` and ``config``; anything else, other
    dims, an invalid stored config or another value of a :data:`LAYOUT_FIELDS` field raises
    :class:`BankFormatError` prefixed with ``what`` and naming the mismatch.
    """
    if not isinstance(raw, dict):
        raise BankFormatError(f"{what}: header is not an object")
    if raw.get("key_dim") != key_dim or raw.get("value_dim") != value_dim:
        raise BankFormatError(
            f"{what}: bank has dims ({raw.get('key_dim')}, {raw.get('value_dim')}), "
            f"expected ({key_dim}, {value_dim})"
        )
    try:
        stored = MemoryConfig.from_dict(dict(raw["config"]))
    except Exception as exc:
        raise BankFormatError(f"{what}: stored config is invalid: {exc}") from exc
    for field in LAYOUT_FIELDS:
        if getattr(stored, field) != getattr(config, field):
            raise BankFormatError(
                f"{what}: bank was written with {field}={getattr(stored, field)!r}, "
                f"config has {getattr(config, field)!r}"
            )
    return stored
