"""Append-only, tamper-evident audit log: who did what to which session, never content.

One JSON object per line::

    {"seq": 7, "time": 1718000000.123, "actor": "acme", "action": "erase",
     "session": "sess_...", "details": {"files": 4}, "prev": "<hash of record 6>",
     "hash": "<sha256 of this record without its hash field>"}

``hash`` covers every other field (canonical JSON), ``prev`` is the previous record's hash
(64 zeros for the first), and ``seq`` counts from 0: editing a line breaks its own hash,
deleting or reordering lines breaks ``prev``/``seq``. Truncating the *tail* cannot be seen
from the file alone; record the head hash (``audit --verify`` prints it) somewhere else to
detect that too.

Content stays out by construction: ``action`` comes from a fixed set and ``details`` accept
only whitelisted names with scalar values, strings limited to 128 identifier characters (no spaces).
Each ``append`` is fsynced before it returns (acknowledged = durable); the server ``post``s
its records to a writer thread that appends them in batches, one fsync each, so the event loop
never waits on the disk. Writes run under a cross-process lock, so the server and the CLI can
both append.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent_runtime.errors import PrivacyError
from agent_runtime.files import ensure_private_dir, fsync_dir, locked

__all__ = ["ACTIONS", "DETAIL_FIELDS", "AuditLog", "verify"]

log = logging.getLogger(__name__)

ACTIONS = frozenset(
    {
        "create",
        "resume",
        "export",
        "erase",
        "denied",
        "privacy_params",
        "budget_exhausted",
        "tenant_add",
        "tenant_revoke",
    }
)
DETAIL_FIELDS = frozenset(
    {
        # privacy parameters and spend
        "noise_sigma",
        "clip_norm",
        "delta",
        "accountant",
        "unit",
        "epsilon",
        "budget_epsilon",
        "releases",
        # counts and outcomes
        "entries",
        "files",
        "bytes",
        "redis_keys",
        "key_destroyed",
        "keys_revoked",
        "ok",
        # request context (codes and ids, not text)
        "reason",
        "code",
        "key_id",
        "format",
        "node",
        "remote",
    }
)
_SAFE_STR = re.compile(r"[A-Za-z0-9_.:/@+\-\[\]]{0,128}")
_GENESIS = "0" * 64
Scalar = str | int | float | bool | None


def _record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(
        json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _check_details(details: dict[str, Scalar]) -> None:
    for name, value in details.items():
        if name not in DETAIL_FIELDS:
            raise PrivacyError(f"audit detail {name!r} is not an allowed field")
        if isinstance(value, str):
            if not _SAFE_STR.fullmatch(value):
                raise PrivacyError(
                    f"audit detail {name!r} must be <= 128 chars of identifiers (no free text)"
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise PrivacyError(f"audit detail {name!r} must be finite")
        elif not (value is None or isinstance(value, bool | int)):
            raise PrivacyError(f"audit detail {name!r} must be a scalar")


Pending = tuple[str | None, str, str | None, dict[str, Scalar]]


class AuditLog:
    """Appends records to ``path`` (JSON lines, hash-chained).

    Callers may rely on: :meth:`append` returns only after the record is on disk; :meth:`post`
    validates at once and returns at once, and a writer thread appends posted records in
    batches (one fsync per batch), so the event loop never waits for the disk; :meth:`flush`
    returns once every posted record is durable. A record with a disallowed action or detail
    is refused with PrivacyError and nothing is written. Thread-safe, and safe across processes
    appending to the same file.
    """

    MAX_BATCH = 512
    MAX_QUEUE = 100_000  # records waiting while the disk refuses; past it they are counted, dropped

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        ensure_private_dir(self.path.parent)
        self._lockfile = self.path.with_name(f".{self.path.name}.lock")
        self._clock = clock
        self._mutex = threading.Lock()
        self._queue: list[Pending] = []
        self._cv = threading.Condition()
        self._writer: threading.Thread | None = None
        self._in_flight = 0
        self._closed = False
        self.dropped = 0

    def _tail(self, fd: int) -> tuple[int, str, int]:
        """(next seq, hash of the last record, size of the complete lines) of the open file."""
        size = os.fstat(fd).st_size
        buf, pos, nl, prev_nl = b"", size, -1, -1
        while pos > 0:  # read backwards until the last complete line is in the buffer
            step = min(4096, pos)
            pos -= step
            buf = os.pread(fd, step, pos) + buf
            nl = buf.rfind(b"\n")
            if nl >= 0:
                prev_nl = buf.rfind(b"\n", 0, nl)
                if prev_nl >= 0:
                    break
        end = pos + nl + 1 if nl >= 0 else 0
        if end != size:
            # A torn final line is an append that never returned: it was not acknowledged.
            log.warning("audit log %s: dropping a torn final line", self.path.name)
        if end == 0:
            return 0, _GENESIS, 0
        try:
            rec = json.loads(buf[prev_nl + 1 : nl])
            return int(rec["seq"]) + 1, str(rec["hash"]), end
        except (ValueError, KeyError, TypeError) as exc:
            raise PrivacyError(f"{self.path.name}: last record is unreadable; run verify") from exc

    @staticmethod
    def _check(
        actor: str | None, action: str, session_id: str | None, details: dict[str, Scalar]
    ) -> None:
        if action not in ACTIONS:
            raise PrivacyError(f"unknown audit action {action!r}")
        _check_details(details)
        for name, value in (("actor", actor), ("session", session_id)):
            if value is not None and not _SAFE_STR.fullmatch(value):
                raise PrivacyError(f"audit {name} must be <= 128 chars of identifiers")

    def append(
        self, actor: str | None, action: str, session_id: str | None = None, **details: Scalar
    ) -> dict[str, Any]:
        """Durably append one record; returns it (with ``seq`` and ``hash``)."""
        self._check(actor, action, session_id, details)
        return self._write([(actor, action, session_id, details)])[0]

    def post(
        self, actor: str | None, action: str, session_id: str | None = None, **details: Scalar
    ) -> None:
        """Validate a record now and append it soon (off the caller's thread, batched)."""
        self._check(actor, action, session_id, details)
        with self._cv:
            if self._closed:
                raise PrivacyError("the audit log is closed")
            if len(self._queue) >= self.MAX_QUEUE:  # the disk has refused for a long while
                self.dropped += 1
                if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                    log.error("audit log %s: %d records dropped", self.path.name, self.dropped)
                return
            self._queue.append((actor, action, session_id, details))
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._drain, name="agent-runtime-audit", daemon=True
                )
                self._writer.start()
            self._cv.notify_all()

    def flush(self) -> None:
        """Wait until every posted record is on disk."""
        with self._cv:
            self._cv.wait_for(lambda: not self._queue and not self._in_flight)

    def close(self) -> None:
        """Flush and stop the writer thread (idempotent); :meth:`append` still works."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.join()

    def _drain(self) -> None:
        failing = False
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                batch = self._queue[: self.MAX_BATCH]
                del self._queue[: self.MAX_BATCH]
                self._in_flight = len(batch)
            try:
                self._write(batch)
            except PrivacyError as exc:  # an unreadable log tail: retrying cannot help
                log.error("audit log %s: %d records dropped: %s", self.path.name, len(batch), exc)
                with self._cv:
                    self._in_flight = 0
                    self._cv.notify_all()
                continue
            except Exception as exc:  # the disk refused: keep them and retry
                if not failing:
                    log.error("audit log %s: cannot append (will retry): %s", self.path.name, exc)
                failing = True
                with self._cv:
                    self._queue[:0] = batch
                    self._in_flight = 0
                    if self._closed:  # shutting down with the disk still refusing
                        log.error("audit log: %d records could not be written", len(self._queue))
                        self._queue.clear()
                        self._cv.notify_all()
                        return
                    self._cv.wait(timeout=1.0)
                continue
            if failing:
                log.info("audit log %s: appending again", self.path.name)
                failing = False
            with self._cv:
                self._in_flight = 0
                self._cv.notify_all()

    def _write(self, batch: list[Pending]) -> list[dict[str, Any]]:
        """Append ``batch`` in order with one fsync; returns the records."""
        records: list[dict[str, Any]] = []
        with self._mutex, locked(self._lockfile):
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                seq, prev, end = self._tail(fd)
                if end != os.fstat(fd).st_size:
                    os.ftruncate(fd, end)
                lines = []
                for actor, action, session_id, details in batch:
                    record: dict[str, Any] = {
                        "seq": seq,
                        "time": round(self._clock(), 6),
                        "actor": actor,
                        "action": action,
                        "session": session_id,
                        "details": dict(sorted(details.items())),
                        "prev": prev,
                    }
                    record["hash"] = _record_hash(record)
                    records.append(record)
                    lines.append(json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n")
                    seq, prev = seq + 1, record["hash"]
                data = "".join(lines).encode()
                written = 0
                try:
                    while written < len(data):
                        written += os.write(fd, data[written:])
                    os.fsync(fd)
                except OSError:
                    os.ftruncate(fd, end)  # all or nothing: never leave a partial record
                    raise
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
        return records


def verify(path: Path) -> tuple[bool, int | None]:
    """Check the whole chain: ``(True, None)`` or ``(False, first bad line, 1-based)``.

    A line is bad when it is not a JSON record, its hash does not match its contents, its
    ``prev`` is not the previous record's hash, or its ``seq`` is out of order. A missing
    file is an empty, valid log.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return True, None
    prev, seq = _GENESIS, 0
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        try:
            rec = json.loads(raw)
            good = (
                isinstance(rec, dict)
                and rec.get("hash") == _record_hash(rec)
                and rec.get("prev") == prev
                and rec.get("seq") == seq
                and rec.get("action") in ACTIONS
            )
        except ValueError:
            good = False
        if not good:
            return False, number
        prev, seq = rec["hash"], seq + 1
    return True, None


def head(path: Path) -> str:
    """Hash of the last record (64 zeros for an empty log): anchor it elsewhere."""
    ok, _ = verify(path)
    if not ok:
        raise PrivacyError(f"{Path(path).name}: audit chain is broken")
    lines = [ln for ln in Path(path).read_bytes().split(b"\n") if ln] if Path(path).exists() else []
    return str(json.loads(lines[-1])["hash"]) if lines else _GENESIS
