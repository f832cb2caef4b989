"""The state dict of a :class:`~memory.bank.MemoryBank`: its layout, version and validation.

A state dict is a plain ``dict``: JSON-serialisable fields plus ``"arrays"``, a dict of numpy
arrays (the slot store's columns, its free stack and the serialised key index)::

    state_version  int, STATE_VERSION
    key_dim        int
    value_dim      int
    config         MemoryConfig.to_dict() of the bank that wrote it
    meta           dict, the bank's JSON metadata
    counters       {"next_id", "added_total", "evicted_total", "pruned_total"}: ints >= 0
    last_time      float or None (the bank's clock has not run yet)
    index_kind     "flat" or "ivf"
    arrays         {values, ids, positions, written_at, retrieved_at, mass, alive, free, index}

A snapshot file stores everything but ``arrays`` as its JSON header and the arrays as its
sections (see :mod:`memory.durable`), so this layout is also the on-disk one: changing it
means a new :data:`STATE_VERSION` and keeping a reader for the old one.

This module knows the layout; it never touches a bank. :func:`build_state` is given the
bank's parts, :func:`restore_state` returns them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent_runtime.errors import BankFormatError
from memory.config import MemoryConfig, check_layout
from memory.index import KeyIndex, load_index
from memory.storage import SlotStore

__all__ = ["ARRAYS", "STATE_VERSION", "RestoredState", "build_state", "restore_state"]

STATE_VERSION = 1
ARRAYS = (*SlotStore.ARRAYS, "free", "index")
COUNTERS = ("next_id", "added_total", "evicted_total", "pruned_total")
_FIELDS = ("key_dim", "value_dim", "config", "meta", "counters", "last_time", "index_kind")
_WHAT = "bank state_dict"


@dataclass
class RestoredState:
    """The parts of a bank decoded from a validated state dict (owned: no views into it)."""

    store: SlotStore
    index: KeyIndex
    counters: dict[str, int]
    last_time: float
    """The bank's clock so far; ``-inf`` if it had not run."""
    meta: dict[str, Any]
    config: MemoryConfig
    """The config of the bank that wrote the state (same layout as the loading bank's)."""


def build_state(
    key_dim: int,
    value_dim: int,
    config: MemoryConfig,
    meta: dict[str, Any],
    counters: Mapping[str, int],
    last_time: float,
    store: SlotStore,
    index: KeyIndex,
) -> dict[str, Any]:
    """The state dict of a bank with these parts (``meta`` must already be plain JSON data).

    The per-slot arrays are views of ``store`` (sliced to its used slots), not copies: they
    are valid until the bank is next changed. The index bytes are a fresh array.
    """
    arrays: dict[str, np.ndarray] = dict(store.state())
    arrays["index"] = index.to_bytes()
    return {
        "state_version": STATE_VERSION,
        "key_dim": key_dim,
        "value_dim": value_dim,
        "config": config.to_dict(),
        "meta": meta,
        "counters": {name: int(counters[name]) for name in COUNTERS},
        "last_time": last_time if math.isfinite(last_time) else None,
        "index_kind": index.kind,
        "arrays": arrays,
    }


def restore_state(
    state: Mapping[str, Any], key_dim: int, value_dim: int, config: MemoryConfig
) -> RestoredState:
    """Validate ``state`` for a bank of these dims and config, and decode it.

    Checks, in order, each failure a :class:`BankFormatError` naming it: the state is a
    mapping of version :data:`STATE_VERSION` with every field; its dims and layout fields
    (key, value and index encodings) equal the bank's; counters, clock, meta and index kind
    are well-typed; every array is present with its dtype and one row per slot; the free stack
    and the live slots partition the store; the key index parses, has the encoding of the
    stored config and one row per slot; no entry id reaches the id counter. Unknown extra
    fields are ignored. The arrays may be read-only (e.g. views into a snapshot file).
    """
    if not isinstance(state, Mapping):
        raise BankFormatError(f"{_WHAT} is a {type(state).__name__}, not a mapping")
    version = state.get("state_version")
    if version != STATE_VERSION:
        raise BankFormatError(
            f"{_WHAT} has state version {version!r}; this code reads version {STATE_VERSION}"
        )
    for name in (*_FIELDS, "arrays"):
        if name not in state:
            raise BankFormatError(f"{_WHAT} does not have the key `{name}`")
    stored = check_layout(_WHAT, dict(state), key_dim, value_dim, config)
    counters = _counters(state["counters"])
    last_time = state["last_time"]
    if last_time is not None and not _is_finite_number(last_time):
        raise BankFormatError(f"{_WHAT} field `last_time` has invalid value {last_time!r}")
    meta = state["meta"]
    if not isinstance(meta, dict):
        raise BankFormatError(f"{_WHAT} field `meta` is not an object")
    kind = state["index_kind"]
    if kind not in ("flat", "ivf"):
        raise BankFormatError(f"{_WHAT} field `index_kind` has invalid value {kind!r}")
    arrays = _arrays(state["arrays"])
    value_dtype = np.dtype(np.float16 if config.value_storage == "fp16" else np.float32)
    try:
        store = SlotStore.from_state(value_dim, value_dtype, arrays, reserve=config.capacity)
    except ValueError as exc:
        raise BankFormatError(f"{_WHAT} arrays are inconsistent: {exc}") from exc
    if arrays["index"].dtype != np.uint8 or arrays["index"].ndim != 1:
        raise BankFormatError(f"{_WHAT} array `index` is not a byte string")
    storage = stored.ivf_storage if kind == "ivf" else stored.flat_storage
    index_bytes = np.array(arrays["index"], np.uint8)  # a writable copy for FAISS
    index = load_index(index_bytes, key_dim, storage, config.ivf_nprobe)
    if index.kind != kind:
        raise BankFormatError(f"{_WHAT} key index is {index.kind}, its header says {kind}")
    if index.ntotal != store.hwm:
        raise BankFormatError(f"{_WHAT} key index has {index.ntotal} rows for {store.hwm} slots")
    if store.hwm and int(store.ids[: store.hwm].max()) >= counters["next_id"]:
        raise BankFormatError(f"{_WHAT} has entry ids beyond the id counter")
    return RestoredState(
        store=store,
        index=index,
        counters=counters,
        last_time=-math.inf if last_time is None else float(last_time),
        meta=meta,
        config=stored,
    )


def _is_finite_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _counters(raw: object) -> dict[str, int]:
    if not isinstance(raw, dict):
        raise BankFormatError(f"{_WHAT} field `counters` is not an object")
    out: dict[str, int] = {}
    for name in COUNTERS:
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BankFormatError(f"{_WHAT} counter `{name}` has invalid value {value!r}")
        out[name] = value
    return out


def _arrays(raw: object) -> dict[str, np.ndarray]:
    if not isinstance(raw, Mapping):
        raise BankFormatError(f"{_WHAT} field `arrays` is not a mapping")
    for name in ARRAYS:
        if not isinstance(raw.get(name), np.ndarray):
            raise BankFormatError(f"{_WHAT} lacks the array `{name}`")
    return {name: raw[name] for name in ARRAYS}
