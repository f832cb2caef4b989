"""Files of a bank directory: log records, snapshots of state dicts, generations.

This module knows files, never banks. A bank writes through a :class:`Journal` (one call per
operation it performs, :meth:`Journal.snapshot` with its state dict), and restores itself from
a :class:`Recovery` (:func:`recover`): the snapshot's state dict, then the log's operations
(:class:`Add`, :class:`Touch`, :class:`Prune`, :class:`Remove`, :class:`Meta`) in order.

The log is an operation log. Replaying it on the snapshot repeats the same operations in the
same order under the config the log was written with, so the restored bank has the same
slots, index rows and metadata as before the crash and returns bit-identical search results.
Evictions are not logged: they follow deterministically from the adds. The byte formats are
those of :mod:`memory.persist`; the state dict layout is :mod:`memory.state`'s.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent_runtime.errors import BankFormatError, MemoryBankError, StorageError
from agent_runtime.files import fsync_dir
from memory.config import MemoryConfig, check_layout
from memory.persist import (
    ADD,
    COMMIT,
    META,
    PRUNE,
    REMOVE,
    SWITCH,
    TOUCH,
    TOUCH_AT,
    Cipher,
    LogRecord,
    LogScan,
    LogWriter,
    read_log,
    read_snapshot,
    write_snapshot,
)

__all__ = [
    "Add",
    "Journal",
    "Meta",
    "Operation",
    "Prune",
    "Recovery",
    "Remove",
    "Switch",
    "Touch",
    "meta_json",
    "read_state",
    "recover",
    "replay_error",
    "write_state",
]

_SNAP = re.compile(r"snapshot-(\d{8})\.bank")
_LOG = re.compile(r"log-(\d{8})\.wal")
_ADD = struct.Struct("<dI")
_TOUCH = struct.Struct("<dI")
_TOUCH_AT = struct.Struct("<I")
_PRUNE = struct.Struct("<d")


def _snap_path(directory: Path, gen: int) -> Path:
    return directory / f"snapshot-{gen:08d}.bank"


def _log_path(directory: Path, gen: int) -> Path:
    return directory / f"log-{gen:08d}.wal"


def meta_json(meta: object) -> str:
    """The canonical JSON text of a bank's ``meta`` (how it is logged and compared).

    Raises :class:`MemoryBankError` if ``meta`` is not JSON-serialisable (or holds NaN/inf).
    """
    try:
        return json.dumps(meta, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MemoryBankError(f"bank.meta is not JSON-serialisable: {exc}") from exc


# -- snapshots of state dicts ----------------------------------------------------------------


def write_state(
    path: Path, generation: int, state: Mapping[str, Any], cipher: Cipher | None
) -> int:
    """Atomically write a bank state dict as a snapshot file; returns its size in bytes.

    ``state["arrays"]`` become the file's sections, every other field its JSON header.
    """
    header = {name: value for name, value in state.items() if name != "arrays"}
    return write_snapshot(path, generation, header, dict(state["arrays"]), cipher)


def read_state(path: Path, cipher: Cipher | None) -> tuple[int, dict[str, Any]]:
    """Verify a snapshot file and return ``(generation, state dict)``.

    The state's arrays are read-only views into the file's bytes. Raises
    :class:`BankFormatError` for a torn, corrupted or tampered file; the state itself is
    validated by the bank that loads it.
    """
    generation, header, sections = read_snapshot(path, cipher)
    return generation, {**header, "arrays": sections}


# -- log operations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    """Entries added at ``now`` (float32 rows; read-only arrays)."""

    seq: int
    now: float
    keys: np.ndarray
    values: np.ndarray
    positions: np.ndarray


@dataclass(frozen=True)
class Touch:
    """Entries retrieved: their slots, their ids (to check) and retrieval weights, at ``now``
    or, when ``times`` is given, each at its own time (``now`` is then the latest)."""

    seq: int
    now: float
    slots: np.ndarray
    ids: np.ndarray
    weights: np.ndarray
    times: np.ndarray | None = None


@dataclass(frozen=True)
class Prune:
    """An expiry pass at ``now`` that removed at least one entry."""

    seq: int
    now: float


@dataclass(frozen=True)
class Remove:
    """Live entries removed by id."""

    seq: int
    ids: np.ndarray


@dataclass(frozen=True)
class Switch:
    """The bank's IVF index, built in the background since an earlier add, replaced the flat
    one here (replay waits for its own build at this point)."""

    seq: int


@dataclass(frozen=True)
class Meta:
    """The bank's ``meta`` as of this point."""

    seq: int
    meta: dict[str, Any]


Operation = Add | Touch | Prune | Remove | Meta | Switch


def _split(body: bytes, offset: int, parts: list[tuple[str, int]]) -> list[np.ndarray]:
    out = []
    for dtype, count in parts:
        out.append(np.frombuffer(body, dtype, count, offset))
        offset += np.dtype(dtype).itemsize * count
    if offset != len(body):
        raise ValueError("record length does not match its contents")
    return out


def _decode(rec: LogRecord, key_dim: int, value_dim: int) -> Operation:
    body = rec.payload
    if rec.type == ADD:
        now, n = _ADD.unpack_from(body)
        pos, keys, values = _split(
            body, _ADD.size, [("<i8", n), ("<f4", n * key_dim), ("<f4", n * value_dim)]
        )
        return Add(rec.seq, now, keys.reshape(n, key_dim), values.reshape(n, value_dim), pos)
    if rec.type == TOUCH:
        now, m = _TOUCH.unpack_from(body)
        slots, ids, weights = _split(body, _TOUCH.size, [("<i8", m), ("<i8", m), ("<f8", m)])
        return Touch(rec.seq, now, slots, ids, weights)
    if rec.type == TOUCH_AT:
        (m,) = _TOUCH_AT.unpack_from(body)
        slots, ids, weights, times = _split(
            body, _TOUCH_AT.size, [("<i8", m), ("<i8", m), ("<f8", m), ("<f8", m)]
        )
        if m == 0:
            raise ValueError("touch record names no entries")
        return Touch(rec.seq, float(times.max()), slots, ids, weights, times)
    if rec.type == PRUNE:
        (now,) = _PRUNE.unpack(body)
        return Prune(rec.seq, now)
    if rec.type == REMOVE:
        (ids,) = _split(body, 0, [("<i8", len(body) // 8)])
        return Remove(rec.seq, ids)
    if rec.type == SWITCH:
        if body:
            raise ValueError("switch record has a body")
        return Switch(rec.seq)
    if rec.type == META:
        meta = json.loads(body)
        if not isinstance(meta, dict):
            raise ValueError("meta record is not an object")
        return Meta(rec.seq, meta)
    raise ValueError(f"unknown record type {rec.type}")


def replay_error(log_name: str, seq: int, exc: Exception) -> BankFormatError:
    """The error for log record ``seq`` that does not decode or does not apply to the bank."""
    return BankFormatError(f"{log_name}: record {seq} does not replay: {exc}")


# -- the journal: what a persistent bank writes ----------------------------------------------


def _log_header(key_dim: int, value_dim: int, config: Mapping[str, object]) -> dict[str, object]:
    # "commits": every sync ends with a COMMIT record, and recovery replays up to the last one.
    return {"key_dim": key_dim, "value_dim": value_dim, "config": dict(config), "commits": 1}


class Journal:
    """The append log of one bank directory, and the generations it starts.

    Callers may rely on: each operation method appends one record, in call order (buffered,
    no fsync); :meth:`sync` makes every record so far durable (it survives a crash or kill -9);
    :meth:`snapshot` leaves exactly one complete generation on disk at every instant. The
    arrays passed in are encoded at once, so callers may reuse them afterwards.
    """

    def __init__(self, directory: Path, generation: int, writer: LogWriter, meta: object) -> None:
        self._dir = directory
        self._generation = generation
        self._writer = writer
        self._logged_meta = meta_json(meta)

    @property
    def generation(self) -> int:
        """The generation on disk (0: no snapshot yet)."""
        return self._generation

    def size(self) -> int:
        """Bytes of the log since the last snapshot (header included)."""
        return self._writer.size()

    @property
    def position(self) -> tuple[int, int]:
        """(generation, records durably written to its log): where the last sync left it."""
        return self._generation, self._writer.durable_seq

    def add(self, now: float, keys: np.ndarray, values: np.ndarray, positions: np.ndarray) -> None:
        """Log entries added at ``now`` (float32 keys and values, int64 positions)."""
        parts = [positions.tobytes(), keys.tobytes(), values.tobytes()]
        self._writer.append(ADD, b"".join([_ADD.pack(now, keys.shape[0]), *parts]))

    def touch(
        self,
        now: float | np.ndarray,
        slots: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        """Log a retrieval at ``now`` (int64 slots and ids, float64 weights); ``now`` may be
        an array of float64 times, one per entry (record type ``TOUCH_AT``; a single time is
        written as a plain ``TOUCH``, as before it existed)."""
        parts = [slots.tobytes(), ids.tobytes(), weights.tobytes()]
        if isinstance(now, np.ndarray):
            times = np.ascontiguousarray(now, np.float64)
            record = [_TOUCH_AT.pack(slots.shape[0]), *parts, times.tobytes()]
            self._writer.append(TOUCH_AT, b"".join(record))
            return
        self._writer.append(TOUCH, b"".join([_TOUCH.pack(now, slots.shape[0]), *parts]))

    def switch(self) -> None:
        """Log that the background-built IVF index replaced the flat one here."""
        self._writer.append(SWITCH, b"")

    def prune(self, now: float) -> None:
        """Log an expiry pass at ``now``."""
        self._writer.append(PRUNE, _PRUNE.pack(now))

    def remove(self, ids: np.ndarray) -> None:
        """Log the removal of entries by id (int64)."""
        self._writer.append(REMOVE, np.ascontiguousarray(ids, np.int64).tobytes())

    def sync(self, meta: object) -> None:
        """Log ``meta`` if it changed since last logged, then commit: a COMMIT record ends the
        batch and the log is fsynced. Recovery replays exactly the committed batches; a batch
        that did not reach the disk whole is dropped. Raises :class:`StorageError` (nothing of
        the batch is on disk; it stays pending and the next sync writes it again)."""
        text = meta_json(meta)
        if text != self._logged_meta:
            self._writer.append(META, text.encode())
            self._logged_meta = text
        self._writer.sync(commit=self._writer.dirty)

    def snapshot(self, state: Mapping[str, Any]) -> None:
        """Write ``state`` as generation g+1, start its empty log, then delete generation g."""
        gen = self._generation + 1
        cipher = self._writer.cipher
        try:
            write_state(_snap_path(self._dir, gen), gen, state, cipher)
        except OSError as exc:  # the previous generation is untouched
            raise StorageError(
                f"cannot write a bank snapshot: {exc.strerror or exc}", exc.errno
            ) from exc
        header = _log_header(state["key_dim"], state["value_dim"], state["config"])
        try:
            new_log = LogWriter.create(_log_path(self._dir, gen), gen, header, cipher)
        except StorageError:
            # Without its log the new snapshot must not become the newest generation: later
            # commits go on in generation g's log, which recovery would otherwise delete.
            _snap_path(self._dir, gen).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                _log_path(self._dir, gen).unlink(missing_ok=True)
            fsync_dir(self._dir)
            raise
        old = self._writer
        self._writer, self._generation = new_log, gen
        self._logged_meta = meta_json(state["meta"])
        old.close()
        _drop_older(self._dir, gen)

    def close(self) -> None:
        """Release the log file (without syncing it). Idempotent."""
        self._writer.close()


# -- recovery: what a bank restores itself from ----------------------------------------------


@dataclass
class Recovery:
    """The newest generation of a bank directory, verified and checked against the bank.

    ``state`` is the snapshot's state dict (``None`` for generation 0); :meth:`operations`
    yields the log's operations to apply after loading it, under ``replay_config``: the
    config the log was written with (the snapshot's without a log, the caller's without
    either). :meth:`journal` then continues the log.
    """

    directory: Path
    generation: int
    cipher: Cipher | None
    key_dim: int
    value_dim: int
    state: dict[str, Any] | None
    replay_config: MemoryConfig
    log_name: str
    committed: list[LogRecord] | None = field(repr=False)
    """The log's committed records, COMMIT records included (``None``: no log file yet)."""
    valid_end: int
    """Byte offset where the committed records end (what follows is cut on reopen)."""
    header_end: int = 0
    """Byte offset where the log's first record starts."""
    uncommitted: int = 0
    """Records after the last commit (unacknowledged writes), dropped and cut from the log."""

    @property
    def records(self) -> list[LogRecord] | None:
        """The committed operation records (COMMIT records left out)."""
        if self.committed is None:
            return None
        return [r for r in self.committed if r.type != COMMIT]

    @property
    def next_seq(self) -> int:
        """Sequence number of the next record appended to the log."""
        return self.committed[-1].seq + 1 if self.committed else 0

    @property
    def position(self) -> tuple[int, int]:
        """(generation, committed log records): what :meth:`MemoryBank.durable_position` gives."""
        return self.generation, self.next_seq

    def limit(self, position: tuple[int, int]) -> None:
        """Replay no further than ``position`` (an earlier :attr:`position`, e.g. the last one a
        caller acknowledged): later commits are dropped and cut on reopen. Raises
        :class:`BankFormatError`, before anything is written, when the directory holds less
        than ``position`` (a lost generation, a log cut back past a commit)."""
        gen, records = position
        if self.generation < gen or (self.generation == gen and self.next_seq < records):
            raise BankFormatError(
                f"{self.directory}: holds less than was acknowledged (generation"
                f" {self.generation}, {self.next_seq} log records; expected generation {gen},"
                f" {records} records)"
            )
        if self.generation > gen or self.committed is None or self.next_seq == records:
            return  # a newer generation includes everything, or nothing to drop
        if records and self.committed[records - 1].type != COMMIT:
            raise BankFormatError(f"{self.log_name}: position {records} is not a commit")
        dropped = self.committed[records:]
        self.committed = self.committed[:records]
        self.valid_end = self.committed[-1].end if self.committed else self.header_end
        self.uncommitted += len(dropped)

    def operations(self) -> Iterator[Operation]:
        """The log's operations in order, decoded lazily.

        A record that does not decode raises :class:`BankFormatError` (:func:`replay_error`).
        """
        for rec in self.records or ():
            try:
                op = _decode(rec, self.key_dim, self.value_dim)
            except (ValueError, struct.error, json.JSONDecodeError) as exc:
                raise replay_error(self.log_name, rec.seq, exc) from exc
            yield op

    def journal(self, config: MemoryConfig, meta: object) -> Journal:
        """Continue the log after its last valid record (cutting a torn tail), or start one
        for ``config``; then delete older generations. Call once, after the replay."""
        path = _log_path(self.directory, self.generation)
        if self.committed is not None:
            writer = LogWriter.reopen(
                path, self.generation, self.next_seq, self.valid_end, self.cipher
            )
        else:
            header = _log_header(self.key_dim, self.value_dim, config.to_dict())
            writer = LogWriter.create(path, self.generation, header, self.cipher)
        _drop_older(self.directory, self.generation)
        return Journal(self.directory, self.generation, writer, meta)


def recover(
    directory: Path, key_dim: int, value_dim: int, config: MemoryConfig, cipher: Cipher | None
) -> Recovery:
    """Find and verify the newest generation in ``directory`` (created if missing).

    Unfinished ``*.tmp`` files are deleted. Raises :class:`BankFormatError` for torn,
    tampered or incompatible files: other dims or layout fields than ``config``'s (see
    :func:`~memory.config.check_layout`), a missing or unexpected cipher, a log without its
    snapshot, a file holding another generation than its name says.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for tmp in directory.glob("*.tmp"):
        tmp.unlink()  # an unfinished generation: never renamed, so never part of the state
    snaps = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _SNAP.fullmatch(p.name)))
    logs = sorted(int(m.group(1)) for p in directory.iterdir() if (m := _LOG.fullmatch(p.name)))
    gen = snaps[-1] if snaps else 0
    if any(g > gen for g in logs):
        raise BankFormatError(f"{directory}: log of generation {logs[-1]} has no snapshot")
    state: dict[str, Any] | None = None
    replay_config = config
    if snaps:
        path = _snap_path(directory, gen)
        file_gen, state = read_state(path, cipher)
        if file_gen != gen:
            raise BankFormatError(f"{path.name}: holds generation {file_gen}")
        replay_config = check_layout(path.name, state, key_dim, value_dim, config)
    log_path = _log_path(directory, gen)
    records: list[LogRecord] | None = None
    valid_end = 0
    uncommitted = header_end = 0
    if log_path.exists():
        scan = read_log(log_path, cipher)
        if scan.generation != gen:
            raise BankFormatError(f"{log_path.name}: holds generation {scan.generation}")
        replay_config = check_layout(log_path.name, scan.header, key_dim, value_dim, config)
        records, valid_end = _committed(log_path.name, scan)
        uncommitted, header_end = len(scan.records) - len(records), scan.header_end
    return Recovery(
        directory=directory,
        generation=gen,
        cipher=cipher,
        key_dim=key_dim,
        value_dim=value_dim,
        state=state,
        replay_config=replay_config,
        log_name=log_path.name,
        committed=records,
        valid_end=valid_end,
        header_end=header_end,
        uncommitted=uncommitted,
    )


def _committed(name: str, scan: LogScan) -> tuple[list[LogRecord], int]:
    """The records a recovery replays, and where they end.

    A log written with commits replays up to its last COMMIT record: anything after it was
    never acknowledged (a batch cut short by a crash or a full disk). A log without commits
    (written by an older version) replays every valid record, and any damage is corruption.
    """
    if not scan.header.get("commits"):
        if scan.damaged_at is not None:
            raise BankFormatError(
                f"{name}: record {len(scan.records)} at byte {scan.damaged_at} is corrupt"
            )
        return scan.records, scan.valid_end
    last = max((i for i, r in enumerate(scan.records) if r.type == COMMIT), default=-1)
    committed = scan.records[: last + 1]
    return committed, committed[-1].end if committed else scan.header_end


def _drop_older(directory: Path, gen: int) -> None:
    removed = False
    for p in directory.iterdir():
        m = _SNAP.fullmatch(p.name) or _LOG.fullmatch(p.name)
        if m and int(m.group(1)) < gen:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            removed = True
    if removed:
        fsync_dir(directory)
