"""Durable file primitives shared by every package (banks, generation state, keys, tenants,
ledgers, audit log).

Every file written here is either absent or complete after a crash: it is written to a
temporary sibling, fsynced, renamed over the target, and the directory is fsynced so the
rename itself is durable. Files are created owner-only (0600) because several of them hold
key material or credential hashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent_runtime.errors import DataDirLockedError, StorageError, UnavailableError

__all__ = [
    "DirectoryLock",
    "StorageHealth",
    "atomic_create",
    "atomic_write",
    "ensure_private_dir",
    "fsync_dir",
    "locked",
]

log = logging.getLogger(__name__)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(directory: Path) -> Path:
    """Create ``directory`` (and parents) owner-only if missing; returns it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory


def _write_all(fd: int, chunks: bytes | Sequence[bytes | memoryview]) -> None:
    for chunk in [chunks] if isinstance(chunks, bytes) else chunks:
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
    os.fsync(fd)


def _temp_for(path: Path, mode: int) -> tuple[Path, int]:
    # A unique temporary name, so two writers never interleave bytes in one temp file.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)


def atomic_write(
    path: Path, data: bytes | Sequence[bytes | memoryview], *, mode: int = 0o600
) -> None:
    """Replace ``path`` with ``data`` (bytes, or chunks written in order) atomically and durably:
    temporary file, fsync, rename, fsync of the directory. After a crash the file is either
    the old one or the complete new one."""
    tmp, fd = _temp_for(path, mode)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; True if this call created it.

    The complete file appears at once (``link`` of a fsynced temporary, which fails if the
    name exists), so concurrent creators agree on one content: the loser reads the winner's.
    """
    tmp, fd = _temp_for(path, mode)
    try:
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``lock_path`` across processes.

    Read-modify-write cycles of shared files (the tenant registry, the audit log) run under
    it, so the CLI and a running server never lose each other's updates.
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``<directory>/.lock`` held until :meth:`release`.

    One server process per data directory: a second one gets :class:`DataDirLockedError`
    naming the holder's pid. The kernel drops the lock when the holder dies, even on
    ``kill -9``, so a crash never leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        ensure_private_dir(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirLockedError(
                f"data directory {self.path.parent} is in use by another agent-runtime process"
                f" (pid {holder}); stop it or choose another --data-dir"
            ) from None
        self._fd = fd
        with contextlib.suppress(OSError):  # the pid is a courtesy: a full disk must not stop us
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


class StorageHealth:
    """Whether the data directory takes writes: set by failures, cleared by a successful
    commit or :meth:`probe` (the server probes while unhealthy, so it recovers by itself)."""

    PROBE = ".write-probe"

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.healthy = True
        self.last_error: str | None = None

    def failed(self, exc: StorageError) -> None:
        if self.healthy:
            log.error("storage is not taking writes: %s", exc)
        self.healthy, self.last_error = False, str(exc)

    def ok(self) -> None:
        if not self.healthy:
            log.info("storage takes writes again")
        self.healthy, self.last_error = True, None

    def check(self) -> None:
        """Refuse new work while the storage is failing."""
        if not self.healthy:
            raise UnavailableError(
                "the server cannot write to its storage right now; retry later",
                code="storage_unavailable",
            )

    def probe(self, size: int = 1 << 16) -> bool:
        """Write, fsync and remove a small file; True (and healthy) when that works."""
        path = self.data_dir / self.PROBE
        try:
            atomic_write(path, bytes(size))
            path.unlink()
        except OSError as exc:
            with contextlib.suppress(OSError):
                path.unlink()
            self.failed(StorageError(str(exc), exc.errno))
            return False
        self.ok()
        return True
