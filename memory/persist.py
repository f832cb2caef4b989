"""On-disk format of a bank: snapshots (one per generation) and an append log between them.

Directory ``D`` of a bank holds ``snapshot-<gen>.bank`` (absent for generation 0) and
``log-<gen>.wal``: the state is the snapshot plus a replay of its log. A new generation is
written to ``*.tmp``, fsynced, renamed, and the directory fsynced before its log is started
and the previous generation deleted, so a crash at any point leaves one complete generation.

Snapshot file::

    preamble  <8s magic "ARMBSNP1"> <u32 version> <u32 flags> <u64 generation> <u64 body_len>
    body      payload, or cipher.seal(payload, aad=preamble) when flags & SEALED
    trailer   blake2b-128 of preamble + body

    payload   <u32 header_len> <header JSON> <section bytes ...>

Log file::

    header    <8s magic "ARMBLOG1"> <u32 version> <u32 flags> <u64 generation> <u32 json_len>
              <JSON: dims, config> <blake2b-128 of everything before it>
    record*   <u32 body_len> <u32 crc32(seq, type, body)> <u64 seq> <u8 type> <body>
              body = payload, or cipher.seal(payload, aad=seq|type|generation) when sealed

Logs are written as version 2 (records ADD, TOUCH, PRUNE, META, REMOVE, COMMIT and, new in
2, TOUCH_AT and SWITCH); version 1 logs (without the two) are still read. Code that reads
only version 1 refuses a version 2 log with a clear version error rather than taking its new
records for corruption. Snapshots are version 1.

Every length, digest and bound is checked before any byte reaches numpy or FAISS; failures
raise :class:`BankFormatError`. The checksums catch torn and corrupted files; deliberate
tampering is only detectable with a ``cipher`` (an AEAD, e.g. AES-GCM), which authenticates
every snapshot body and log record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from agent_runtime.errors import BankFormatError, StorageError
from agent_runtime.files import atomic_write

__all__ = [
    "Cipher",
    "LogRecord",
    "LogScan",
    "LogWriter",
    "read_log",
    "read_snapshot",
    "write_snapshot",
]

FORMAT_VERSION = 1  # snapshots
LOG_VERSION = 2  # logs: version 2 adds the TOUCH_AT and SWITCH records
SEALED = 1  # flags bit: bodies are sealed by a cipher
SNAP_MAGIC = b"ARMBSNP1"
LOG_MAGIC = b"ARMBLOG1"
_PRE = struct.Struct("<8sIIQQ")
_LOG_HEAD = struct.Struct("<8sIIQI")
_REC = struct.Struct("<IIQB")
_DIGEST = 16
_AAD_LEN = 24  # magic, version, flags, generation: what a sealed snapshot body is bound to
MAX_RECORD = 1 << 30
DTYPES = ("<f2", "<f4", "<f8", "<i8", "|b1", "|u1")

# log record types
ADD, TOUCH, PRUNE, META, REMOVE, COMMIT, TOUCH_AT, SWITCH = 1, 2, 3, 4, 5, 6, 7, 8
RECORD_TYPES = {1: (ADD, TOUCH, PRUNE, META, REMOVE, COMMIT), 2: (1, 2, 3, 4, 5, 6, 7, 8)}
"""The record types each log version may hold."""


class Cipher(Protocol):
    """Encryption at rest: an AEAD applied to every snapshot body and log record payload.

    ``open`` must raise (any exception) when the ciphertext or ``aad`` was altered.
    """

    def seal(self, plaintext: bytes, aad: bytes) -> bytes: ...

    def open(self, ciphertext: bytes, aad: bytes) -> bytes: ...


def _digest(*parts: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=_DIGEST)
    for p in parts:
        h.update(p)
    return h.digest()


def _open_sealed(cipher: Cipher | None, flags: int, body: bytes, aad: bytes, what: str) -> bytes:
    if flags & SEALED and cipher is None:
        raise BankFormatError(f"{what} is encrypted; a cipher is required to open it")
    if not flags & SEALED and cipher is not None:
        raise BankFormatError(
            f"{what} is not encrypted but a cipher was given (refusing a downgrade)"
        )
    if cipher is None:
        return body
    try:
        return cipher.open(body, aad)
    except Exception as exc:  # any failure of the AEAD means the bytes are not ours
        raise BankFormatError(f"{what} fails authentication") from exc


# -- snapshots ---------------------------------------------------------------------------------


def write_snapshot(
    path: Path,
    generation: int,
    header: dict[str, object],
    sections: dict[str, np.ndarray],
    cipher: Cipher | None,
) -> int:
    """Atomically write a snapshot; returns its size in bytes."""
    entries = []
    blobs: list[bytes | memoryview] = []
    offset = 0
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype.str not in DTYPES:
            raise ValueError(f"section {name} has unsupported dtype {arr.dtype}")
        entries.append(
            {"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset}
        )
        blobs.append(arr.reshape(-1).view(np.uint8).data)
        offset += arr.nbytes
    head = json.dumps({**header, "sections": entries}, separators=(",", ":")).encode()
    payload = b"".join([struct.pack("<I", len(head)), head, *blobs])
    flags = SEALED if cipher is not None else 0
    aad = _PRE.pack(SNAP_MAGIC, FORMAT_VERSION, flags, generation, 0)[:_AAD_LEN]
    body = payload if cipher is None else cipher.seal(payload, aad)
    pre = _PRE.pack(SNAP_MAGIC, FORMAT_VERSION, flags, generation, len(body))
    atomic_write(path, [pre, body, _digest(pre, body)])
    return _PRE.size + len(body) + _DIGEST


def read_snapshot(
    path: Path, cipher: Cipher | None
) -> tuple[int, dict[str, object], dict[str, np.ndarray]]:
    """Verify and parse a snapshot: ``(generation, header, sections)``."""
    data = path.read_bytes()
    name = path.name
    if len(data) < _PRE.size + _DIGEST:
        raise BankFormatError(f"{name}: truncated ({len(data)} bytes)")
    magic, version, flags, generation, body_len = _PRE.unpack_from(data)
    if magic != SNAP_MAGIC:
        raise BankFormatError(f"{name}: not a bank snapshot")
    if version != FORMAT_VERSION:
        raise BankFormatError(f"{name}: format version {version}, this code reads {FORMAT_VERSION}")
    if body_len != len(data) - _PRE.size - _DIGEST:
        raise BankFormatError(
            f"{name}: truncated or extended (body {body_len}, file {len(data)} bytes)"
        )
    view = memoryview(data)
    pre, body, digest = view[: _PRE.size], view[_PRE.size : -_DIGEST], view[-_DIGEST:]
    if _digest(pre, body) != bytes(digest):
        raise BankFormatError(f"{name}: checksum mismatch (torn or corrupted)")
    payload: bytes | memoryview = body
    if flags & SEALED or cipher is not None:
        payload = _open_sealed(cipher, flags, bytes(body), bytes(pre[:_AAD_LEN]), name)
    return generation, *_parse_payload(name, payload)


def _parse_payload(
    name: str, payload: bytes | memoryview
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Header and zero-copy section arrays (read-only views into ``payload``)."""
    try:
        (head_len,) = struct.unpack_from("<I", payload)
        if 4 + head_len > len(payload):
            raise ValueError("header overruns the payload")
        header = json.loads(bytes(payload[4 : 4 + head_len]))
        if not isinstance(header, dict) or not isinstance(header.get("sections"), list):
            raise ValueError("header is not an object with sections")
        base = 4 + head_len
        sections: dict[str, np.ndarray] = {}
        for entry in header.pop("sections"):
            dtype, shape, offset = entry["dtype"], entry["shape"], entry["offset"]
            if dtype not in DTYPES or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise ValueError(f"bad section {entry}")
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count * np.dtype(dtype).itemsize
            if not isinstance(offset, int) or offset < 0 or base + offset + nbytes > len(payload):
                raise ValueError(f"section {entry['name']} overruns the payload")
            arr = np.frombuffer(payload, dtype, count, base + offset).reshape(shape)
            sections[str(entry["name"])] = arr
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError) as exc:
        raise BankFormatError(f"{name}: malformed payload: {exc}") from exc
    return header, sections


# -- append log --------------------------------------------------------------------------------


@dataclass
class LogRecord:
    seq: int
    type: int
    payload: bytes
    end: int = 0
    """Byte offset just after this record in its file."""


@dataclass
class LogScan:
    """A verified log: its generation, header and records up to the first damaged byte."""

    generation: int
    header: dict[str, object]
    records: list[LogRecord]
    valid_end: int
    """Where the valid records end: a torn tail (or damage) after it is cut on reopen."""
    header_end: int
    """Where the header ends (the first record starts)."""
    damaged_at: int | None
    """Byte offset of a record that is corrupt although more data follows it (None: clean)."""


def _record_aad(generation: int, seq: int, rtype: int) -> bytes:
    return struct.pack("<QQB", generation, seq, rtype)


class LogWriter:
    """Appends records to ``log-<gen>.wal``, all or nothing.

    Records are encoded into memory by :meth:`append`; :meth:`sync` writes them after the last
    durable record and fsyncs. A failed or short write (``ENOSPC``, ``EIO``...) truncates the
    file back to the last durable record and raises :class:`StorageError`; the records stay
    pending, so the next :meth:`sync` writes them again. The file therefore only ever holds
    complete records followed, at worst during a crash, by one torn tail.
    """

    def __init__(
        self, path: Path, generation: int, next_seq: int, cipher: Cipher | None, fd: int, end: int
    ) -> None:
        self.path = path
        self.generation = generation
        self.seq = next_seq
        self.durable_seq = next_seq  # records on disk and committed (the next record's seq)
        self.cipher = cipher
        self._fd: int | None = fd
        self._durable = end  # bytes of complete, fsynced records (header included)
        self._pending = bytearray()

    @property
    def dirty(self) -> bool:
        return bool(self._pending)

    @classmethod
    def create(
        cls, path: Path, generation: int, header: dict[str, object], cipher: Cipher | None
    ) -> LogWriter:
        """Start an empty log (durably: file and directory entry are fsynced)."""
        flags = SEALED if cipher is not None else 0
        head = json.dumps(header, separators=(",", ":")).encode()
        prefix = _LOG_HEAD.pack(LOG_MAGIC, LOG_VERSION, flags, generation, len(head)) + head
        try:
            atomic_write(path, [prefix, _digest(prefix)])
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise _storage_error(path, "create", exc) from exc
        return cls(path, generation, 0, cipher, fd, len(prefix) + _DIGEST)

    @classmethod
    def reopen(
        cls, path: Path, generation: int, next_seq: int, valid_end: int, cipher: Cipher | None
    ) -> LogWriter:
        """Continue a log after its last valid record, cutting off what follows it."""
        try:
            fd = os.open(path, os.O_RDWR)
            os.ftruncate(fd, valid_end)
            os.fsync(fd)
        except OSError as exc:
            raise _storage_error(path, "reopen", exc) from exc
        return cls(path, generation, next_seq, cipher, fd, valid_end)

    def _encode(self, seq: int, rtype: int, payload: bytes) -> bytes:
        body = payload
        if self.cipher is not None:
            body = self.cipher.seal(payload, _record_aad(self.generation, seq, rtype))
        crc = zlib.crc32(body, zlib.crc32(struct.pack("<QB", seq, rtype)))
        return _REC.pack(len(body), crc, seq, rtype) + body

    def append(self, rtype: int, payload: bytes) -> None:
        self._pending += self._encode(self.seq, rtype, payload)
        self.seq += 1

    def sync(self, *, commit: bool = False) -> None:
        """Write and fsync every pending record, or none of them (StorageError).

        With ``commit``, a COMMIT record follows in a second write and fsync, so a COMMIT on
        disk always means its whole batch was durable before it: recovery can tell damage in
        acknowledged data (a valid COMMIT after it) from a batch a crash cut short.
        """
        if not self._pending and not commit:
            return
        if self._fd is None:
            raise StorageError(f"{self.path.name}: the log is closed")
        start = self._durable
        try:
            end = self._write_at(start, self._pending)
            if commit:
                end = self._write_at(end, self._encode(self.seq, COMMIT, b""))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)  # a batch whose fsync failed must not come back after a crash
            raise _storage_error(self.path, "write", exc) from exc
        if commit:
            self.seq += 1
        self._durable = end
        self.durable_seq = self.seq
        self._pending.clear()

    def _write_at(self, offset: int, data: bytes | bytearray) -> int:
        assert self._fd is not None
        view = memoryview(data)
        try:
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        finally:
            view.release()
        os.ftruncate(self._fd, offset + done)  # drop whatever a failed attempt left after it
        os.fsync(self._fd)
        return offset + done

    def size(self) -> int:
        return self._durable + len(self._pending)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _storage_error(path: Path, what: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {what} bank log {path.name}: {exc.strerror or exc}", exc.errno)


def _commit_follows(
    data: bytes, pos: int, generation: int, flags: int, cipher: Cipher | None
) -> bool:
    """Whether a valid COMMIT record is reachable from ``pos`` along the record lengths."""
    while pos + _REC.size <= len(data):
        body_len, crc, seq, rtype = _REC.unpack_from(data, pos)
        stop = pos + _REC.size + body_len
        if body_len > MAX_RECORD or stop > len(data):
            return False
        body = data[pos + _REC.size : stop]
        if rtype == COMMIT and zlib.crc32(body, zlib.crc32(struct.pack("<QB", seq, rtype))) == crc:
            return True
        pos = stop
    return False


def read_log(path: Path, cipher: Cipher | None) -> LogScan:
    """Verify and parse a log up to its first damaged record.

    A torn tail (the last record incomplete or failing its checksum) ends the log at
    ``valid_end``. A bad record followed by more data is corruption (BankFormatError) when a
    valid COMMIT record follows it (commits are written only after their batch is durable);
    otherwise it is a batch a crash cut short, reported in ``damaged_at``. A bad header raises
    :class:`BankFormatError`.
    """
    data = path.read_bytes()
    name = path.name
    if len(data) < _LOG_HEAD.size:
        raise BankFormatError(f"{name}: truncated log header")
    magic, version, flags, generation, head_len = _LOG_HEAD.unpack_from(data)
    if magic != LOG_MAGIC:
        raise BankFormatError(f"{name}: not a bank log")
    if version not in RECORD_TYPES:
        raise BankFormatError(
            f"{name}: log format version {version}, this code reads {sorted(RECORD_TYPES)}"
        )
    types = RECORD_TYPES[version]
    end = _LOG_HEAD.size + head_len
    if end + _DIGEST > len(data) or _digest(data[:end]) != data[end : end + _DIGEST]:
        raise BankFormatError(f"{name}: log header checksum mismatch")
    try:
        header = json.loads(data[_LOG_HEAD.size : end])
    except json.JSONDecodeError as exc:
        raise BankFormatError(f"{name}: malformed log header") from exc
    if not isinstance(header, dict):
        raise BankFormatError(f"{name}: malformed log header")
    if (flags & SEALED) != (cipher is not None):
        _open_sealed(cipher, flags, b"", b"", name)  # raises the matching message
    pos = end + _DIGEST
    records: list[LogRecord] = []
    damaged_at: int | None = None
    while pos < len(data):
        if pos + _REC.size > len(data):
            break  # torn record header
        body_len, crc, seq, rtype = _REC.unpack_from(data, pos)
        stop = pos + _REC.size + body_len
        if body_len > MAX_RECORD or stop > len(data):
            break  # torn (or a length that cannot be ours: nothing after it is trustworthy)
        body = data[pos + _REC.size : stop]
        good = zlib.crc32(body, zlib.crc32(struct.pack("<QB", seq, rtype))) == crc
        if good and (seq != len(records) or rtype not in types):
            good = False
        if not good:
            if stop != len(data) and _commit_follows(data, stop, generation, flags, cipher):
                raise BankFormatError(
                    f"{name}: record {len(records)} at byte {pos} is corrupt, and committed"
                    " records follow it"
                )
            if stop != len(data):
                damaged_at = pos
            break  # a torn last record, or an uncommitted batch cut short
        if cipher is not None:
            body = _open_sealed(
                cipher, flags, body, _record_aad(generation, seq, rtype), f"{name} record {seq}"
            )
        pos = stop
        records.append(LogRecord(seq, rtype, body, pos))
    return LogScan(generation, header, records, pos, end + _DIGEST, damaged_at)
