"""Where a session's files live under the data directory (the one definition of that layout).

::

    <data_dir>/sessions/<tenant_hash>/<session_id>/
        bank/            the memory bank: snapshot-*.bank, log-*.wal (memory/durable.py)
        state.pt         the generation state and metadata header (sessions/state.py)
        seq              the reserved event seq (sessions/state.py)
        fence            the newest fencing token an owner claimed (sessions/ownership.py)
        privacy.json     the privacy ledger (privacy/session.py)
    <data_dir>/keys/     wrapped data keys (privacy/crypto.py)
    <data_dir>/audit.log, tenants.json ...

Tenant names are hashed so that no tenant-chosen string becomes a path component, and session
ids are checked before they become one.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from agent_runtime.errors import PrivacyError

__all__ = [
    "BANK_DIR",
    "FENCE_FILE",
    "SEQ_FILE",
    "STATE_FILE",
    "check_session_id",
    "session_directory",
    "tenant_hash",
]

BANK_DIR = "bank"
STATE_FILE = "state.pt"
SEQ_FILE = "seq"
FENCE_FILE = "fence"
_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def tenant_hash(tenant: str) -> str:
    """The path component for a tenant (never the tenant-chosen string itself)."""
    return hashlib.sha256(tenant.encode()).hexdigest()[:24]


def check_session_id(session_id: str) -> str:
    """``session_id`` if it is safe as a file name; PrivacyError otherwise."""
    if not _SESSION_ID.fullmatch(session_id):
        raise PrivacyError("session id must be 1-128 characters of [A-Za-z0-9_-]")
    return session_id


def session_directory(data_dir: Path | str, tenant: str, session_id: str) -> Path:
    """``data_dir/sessions/<sha256(tenant)[:24]>/<session_id>``."""
    return Path(data_dir) / "sessions" / tenant_hash(tenant) / check_session_id(session_id)
