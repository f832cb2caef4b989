"""Erasure of one session from every store: data key, files, Redis keys, then the audit record.

Order matters. The data key goes first: from then on every ciphertext of the session, in
the data directory or in any copy of it, is unreadable (crypto-erasure), even if a later
step fails or the process dies. Then every file under the session directory is unlinked
(bank snapshots of every generation, logs, generation state, the privacy ledger), then the
session's Redis keys, and finally one ``erase`` audit record with counts (no content).

The caller first stops the session (cancel its response, close its bank, drop it from the
in-process session table); this module does not know those caches.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent_runtime.errors import PrivacyError
from agent_runtime.files import fsync_dir
from agent_runtime.layout import check_session_id, session_directory, tenant_hash
from privacy.audit import AuditLog
from privacy.crypto import KeyStore

__all__ = ["ErasureReport", "erase_session", "session_directory"]

DeleteKeys = Callable[[list[str]], Awaitable[object]]


@dataclass(frozen=True)
class ErasureReport:
    """What an erasure removed."""

    key_destroyed: bool
    files: int
    bytes: int
    redis_keys: int


def _delete_tree(root: Path) -> tuple[int, int]:
    """Unlink every file below ``root`` and the directories; returns (files, bytes)."""
    files = nbytes = 0
    if not root.exists():
        return 0, 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False, followlinks=False):
        base = Path(dirpath)
        for name in filenames:
            path = base / name
            nbytes += path.lstat().st_size
            path.unlink()
            files += 1
        for name in dirnames:
            sub = base / name
            if sub.is_symlink():
                sub.unlink()  # a link is removed, never followed out of the session directory
                files += 1
            else:
                sub.rmdir()
        fsync_dir(base)
    root.rmdir()
    fsync_dir(root.parent)
    return files, nbytes


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        return  # not empty (other sessions) or already gone
    fsync_dir(directory.parent)


def _erase_local(
    data_dir: Path, tenant: str, session_id: str, keystore: KeyStore | None
) -> tuple[bool, int, int]:
    destroyed = keystore.destroy_session_key(tenant, session_id) if keystore is not None else False
    directory = session_directory(data_dir, tenant, session_id)
    files, nbytes = _delete_tree(directory)
    _remove_if_empty(directory.parent)
    if keystore is not None:
        _remove_if_empty(keystore.root / "sessions" / tenant_hash(tenant))
    return destroyed, files, nbytes


async def erase_session(
    data_dir: Path,
    tenant: str,
    session_id: str,
    keystore: KeyStore | None,
    delete_keys: DeleteKeys | None = None,
    redis_keys: Sequence[str] = (),
    *,
    audit: AuditLog | None = None,
    actor: str | None = None,
) -> ErasureReport:
    """Erase ``tenant``'s session ``session_id`` everywhere; see the module doc for the order.

    Args:
        data_dir: the data directory (``store.data_dir``).
        keystore: destroys the session's data key (None when encryption is off).
        delete_keys: async callable deleting Redis keys, e.g. a wrapper of the session
            store's client; called once with ``list(redis_keys)`` when there are any.
        redis_keys: every Redis key of the session.
        audit: where the ``erase`` record goes; ``actor`` defaults to ``tenant``.

    Returns:
        What was removed. Erasing a session that is already gone succeeds with zeros.

    Raises:
        PrivacyError: a step failed; the steps before it took effect, the audit record says
            ``ok: false``, and calling again finishes the job.
    """
    check_session_id(session_id)
    destroyed, files, nbytes, deleted = False, 0, 0, 0
    failure: BaseException | None = None
    try:
        destroyed, files, nbytes = await asyncio.to_thread(
            _erase_local, Path(data_dir), tenant, session_id, keystore
        )
        if redis_keys and delete_keys is not None:
            await delete_keys(list(redis_keys))
            deleted = len(redis_keys)
    except Exception as exc:
        failure = exc
    if audit is not None:
        await asyncio.to_thread(
            audit.append,
            actor if actor is not None else tenant,
            "erase",
            session_id,
            key_destroyed=destroyed,
            files=files,
            bytes=nbytes,
            redis_keys=deleted,
            ok=failure is None,
        )
    if failure is not None:
        raise PrivacyError(f"erasure of session {session_id} is incomplete: {failure}") from failure
    return ErasureReport(destroyed, files, nbytes, deleted)
