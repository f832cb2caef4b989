"""Persistence of a :class:`~memory.bank.MemoryBank`: state dicts, log records, generations.

The log is an operation log (add, touch = retrieval bookkeeping, prune, meta). Replaying it on
the snapshot repeats the same operations in the same order under the config the log was
written with, so the restored bank has the same slots, index rows and metadata as before the
crash and returns bit-identical search results. Evictions are not logged: they follow
deterministically from the adds.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from agent_runtime.errors import BankFormatError, MemoryBankError
from memory.config import LAYOUT_FIELDS, MemoryConfig
from memory.index import load_index
from memory.persist import (
    ADD,
    META,
    PRUNE,
    REMOVE,
    TOUCH,
    Cipher,
    LogRecord,
    LogWriter,
    read_log,
    read_snapshot,
    write_snapshot,
)
from memory.storage import SlotStore

if TYPE_CHECKING:
    from memory.bank import MemoryBank

__all__ = [
    "encode_add",
    "encode_prune",
    "encode_touch",
    "log_meta",
    "open_bank",
    "write_generation",
]

STATE_VERSION = 1
_SNAP = re.compile(r"snapshot-(\d{8})\.bank")
_LOG = re.compile(r"log-(\d{8})\.wal")
_ADD = struct.Struct("<dI")
_TOUCH = struct.Struct("<dI")
_PRUNE = struct.Struct("<d")


def _snap_path(directory: Path, gen: int) -> Path:
    return directory / f"snapshot-{gen:08d}.bank"


def _log_path(directory: Path, gen: int) -> Path:
    return directory / f"log-{gen:08d}.wal"


# -- records -----------------------------------------------------------------------------------


def encode_add(now: float, keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> bytes:
    return b"".join(
        [_ADD.pack(now, keys.shape[0]), positions.tobytes(), keys.tobytes(), values.tobytes()]
    )


def encode_touch(now: float, slots: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> bytes:
    return b"".join(
        [_TOUCH.pack(now, slots.shape[0]), slots.tobytes(), ids.tobytes(), weights.tobytes()]
    )


def encode_prune(now: float) -> bytes:
    return _PRUNE.pack(now)


def _split(body: bytes, offset: int, parts: list[tuple[str, int]]) -> list[np.ndarray]:
    out = []
    for dtype, count in parts:
        size = np.dtype(dtype).itemsize * count
        out.append(np.frombuffer(body, dtype, count, offset))
        offset += size
    if offset != len(body):
        raise ValueError("record length does not match its contents")
    return out


def _replay(bank: MemoryBank, rec: LogRecord) -> None:
    body = rec.payload
    if rec.type == ADD:
        now, n = _ADD.unpack_from(body)
        pos, keys, values = _split(
            body, _ADD.size, [("<i8", n), ("<f4", n * bank.key_dim), ("<f4", n * bank.value_dim)]
        )
        bank._apply_add(now, keys.reshape(n, bank.key_dim), values.reshape(n, bank.value_dim), pos)
    elif rec.type == TOUCH:
        now, m = _TOUCH.unpack_from(body)
        slots, ids, weights = _split(body, _TOUCH.size, [("<i8", m), ("<i8", m), ("<f8", m)])
        st = bank._store
        if np.any((slots < 0) | (slots >= st.hwm)) or np.any(st.ids[slots] != ids):
            raise ValueError("retrieval record names entries that are not in the bank")
        bank._last_time = max(bank._last_time, now)
        bank._apply_touch(now, slots, weights)
    elif rec.type == PRUNE:
        (now,) = _PRUNE.unpack(body)
        bank._last_time = max(bank._last_time, now)
        bank._expire(now)
    elif rec.type == REMOVE:
        (ids,) = _split(body, 0, [("<i8", len(body) // 8)])
        bank._store.release(bank._slots_of(ids))
    elif rec.type == META:
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError("meta record is not an object")
        bank.meta = meta


def log_meta(bank: MemoryBank) -> None:
    """Append a meta record if ``bank.meta`` changed since it was last written."""
    text = _meta_json(bank)
    if text != bank._logged_meta and bank._log is not None:
        bank._log.append(META, text.encode())
        bank._logged_meta = text


def _meta_json(bank: MemoryBank) -> str:
    try:
        return json.dumps(bank.meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MemoryBankError(f"bank.meta is not JSON-serialisable: {exc}") from exc


# -- state dict --------------------------------------------------------------------------------


def state_dict(bank: MemoryBank) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Header (JSON) and arrays that restore ``bank`` exactly."""
    header: dict[str, object] = {
        "state_version": STATE_VERSION,
        "key_dim": bank.key_dim,
        "value_dim": bank.value_dim,
        "config": bank.config.to_dict(),
        "meta": json.loads(_meta_json(bank)),
        "counters": {
            "next_id": bank._next_id,
            "added_total": bank._added_total,
            "evicted_total": bank._evicted_total,
            "pruned_total": bank._pruned_total,
        },
        "last_time": bank._last_time if math.isfinite(bank._last_time) else None,
        "index_kind": bank._index.kind,
    }
    sections = dict(bank._store.state())
    sections["index"] = bank._index.to_bytes()
    return header, sections


def load_state_dict(
    bank: MemoryBank, header: dict[str, object], sections: dict[str, np.ndarray]
) -> None:
    """Restore ``bank`` from :func:`state_dict` output; raises :class:`BankFormatError`."""
    try:
        if header.get("state_version") != STATE_VERSION:
            raise ValueError(f"state version {header.get('state_version')}")
        counters = header["counters"]
        meta = header["meta"]
        if not isinstance(counters, dict) or not isinstance(meta, dict):
            raise ValueError("counters/meta are not objects")
        store = SlotStore.from_state(
            bank.value_dim,
            bank._store.values.dtype,
            {n: sections[n] for n in (*SlotStore.ARRAYS, "free")},
        )
        index_bytes = np.array(sections["index"], np.uint8)  # a writable copy for FAISS
        stored = MemoryConfig.from_dict(dict(header["config"]))  # type: ignore[call-overload]
        index = load_index(
            index_bytes,
            bank.key_dim,
            _storage_of(stored, str(header["index_kind"])),
            bank.config.ivf_nprobe,
        )
        if index.ntotal != store.hwm or index.kind != header["index_kind"]:
            raise ValueError(f"key index has {index.ntotal} rows for {store.hwm} slots")
        next_id = int(counters["next_id"])
        if store.hwm and int(store.ids[: store.hwm].max()) >= next_id:
            raise ValueError("entry ids beyond the id counter")
        last_time = header.get("last_time")
    except BankFormatError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise BankFormatError(f"snapshot state is inconsistent: {exc}") from exc
    bank._store, bank._index = store, index
    bank._next_id = next_id
    bank._added_total = int(counters["added_total"])
    bank._evicted_total = int(counters["evicted_total"])
    bank._pruned_total = int(counters["pruned_total"])
    bank._last_time = float(last_time) if isinstance(last_time, int | float) else -np.inf
    bank.meta = meta
    bank._make_queues()


def _storage_of(config: MemoryConfig, kind: str) -> str:
    return config.ivf_storage if kind == "ivf" else config.flat_storage


# -- generations ---------------------------------------------------------------------------------


def _log_header(bank: MemoryBank) -> dict[str, object]:
    return {"key_dim": bank.key_dim, "value_dim": bank.value_dim, "config": bank.config.to_dict()}


def _check_compatible(
    name: str, raw: object, key_dim: int, value_dim: int, config: MemoryConfig
) -> MemoryConfig:
    if not isinstance(raw, dict):
        raise BankFormatError(f"{name}: header is not an object")
    if raw.get("key_dim") != key_dim or raw.get("value_dim") != value_dim:
        raise BankFormatError(
            f"{name}: bank has dims ({raw.get('key_dim')}, {raw.get('value_dim')}), expected ({key_dim}, {value_dim})"
        )
    try:
        stored = MemoryConfig.from_dict(dict(raw["config"]))
    except Exception as exc:
        raise BankFormatError(f"{name}: stored config is invalid: {exc}") from exc
    for field in LAYOUT_FIELDS:
        if getattr(stored, field) != getattr(config, field):
            raise BankFormatError(
                f"{name}: bank was written with {field}={getattr(stored, field)!r}, config has {getattr(config, field)!r}"
            )
    return stored


def open_bank(
    cls: type[MemoryBank],
    directory: Path,
    key_dim: int,
    value_dim: int,
    config: MemoryConfig | None,
    cipher: Cipher | None,
    clock: Callable[[], float],
) -> MemoryBank:
    config = (config or MemoryConfig()).validate()
    directory.mkdir(parents=True, exist_ok=True)
    for tmp in directory.glob("*.tmp"):
        tmp.unlink()  # an unfinished generation: never renamed, so never part of the state
    snaps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SNAP.fullmatch(p.name)))
    logs = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _LOG.fullmatch(p.name)))
    gen = snaps[-1] if snaps else 0
    if any(g > gen for g in logs):
        raise BankFormatError(f"{directory}: log of generation {logs[-1]} has no snapshot")
    bank = cls(key_dim, value_dim, config, clock=clock)
    replay_config = config
    if snaps:
        path = _snap_path(directory, gen)
        file_gen, header, sections = read_snapshot(path, cipher)
        if file_gen != gen:
            raise BankFormatError(f"{path.name}: holds generation {file_gen}")
        replay_config = _check_compatible(path.name, header, key_dim, value_dim, config)
        load_state_dict(bank, header, sections)
    log_path = _log_path(directory, gen)
    writer: LogWriter | None = None
    if log_path.exists():
        log_gen, log_header, records, valid_end = read_log(log_path, cipher)
        if log_gen != gen:
            raise BankFormatError(f"{log_path.name}: holds generation {log_gen}")
        replay_config = _check_compatible(log_path.name, log_header, key_dim, value_dim, config)
        bank.config = replay_config
        bank._make_queues()
        for rec in records:
            try:
                _replay(bank, rec)
            except (ValueError, struct.error, json.JSONDecodeError, MemoryBankError) as exc:
                raise BankFormatError(
                    f"{log_path.name}: record {rec.seq} does not replay: {exc}"
                ) from exc
        writer = LogWriter.reopen(log_path, gen, len(records), valid_end, cipher)
    bank.config = config
    bank._make_queues()
    bank._dir, bank._cipher, bank._generation = directory, cipher, gen
    bank._logged_meta = _meta_json(bank)
    if writer is None:
        writer = LogWriter.create(log_path, gen, _log_header(bank), cipher)
    bank._log = writer
    _drop_older(directory, gen)
    if replay_config.to_dict() != config.to_dict():
        write_generation(bank)  # later records must replay under the new config
    return bank


def write_generation(bank: MemoryBank) -> None:
    """Snapshot ``bank`` as generation g+1, start its log, then delete generation g."""
    if bank._dir is None or bank._log is None:
        raise MemoryBankError("bank has no directory")
    directory, gen = bank._dir, bank._generation + 1
    header, sections = state_dict(bank)
    write_snapshot(_snap_path(directory, gen), gen, header, sections, bank._cipher)
    new_log = LogWriter.create(_log_path(directory, gen), gen, _log_header(bank), bank._cipher)
    old = bank._log
    bank._log, bank._generation = new_log, gen
    bank._logged_meta = _meta_json(bank)
    old.close()
    _drop_older(directory, gen)


def _drop_older(directory: Path, gen: int) -> None:
    removed = False
    for p in directory.iterdir():
        m = _SNAP.fullmatch(p.name) or _LOG.fullmatch(p.name)
        if m and int(m.group(1)) < gen:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed = True
    if removed:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
