"""Privacy and tenancy: key noise, the privacy ledger, encryption at rest, tenants, audit, erasure.

Public surface (see docs/privacy.md):

* :class:`KeyNoiser`, :func:`clip_and_noise` — per-token key clipping and Gaussian noise;
* :class:`PrivacyLedger`, :func:`sigma_for_epsilon` — Opacus accounting of stored keys;
* :class:`SessionPrivacy` — one session's noiser + ledger with the charge-before-durable order;
* :class:`KeyStore`, :class:`SessionCipher` — AES-GCM at rest, wrapped keys, crypto-erasure;
* :class:`TenantRegistry`, :class:`TicketIssuer` — API keys (hashed) and browser tickets;
* :class:`AuditLog`, :func:`verify_audit_log` — hash-chained audit log without content;
* :func:`erase_session` — erasure across the key store, the data directory and Redis.

Errors come from :mod:`agent_runtime.errors` (PrivacyError, BudgetExhaustedError,
AuthenticationError, ConfigError), plus :class:`DecryptionError` (a PrivacyError).
"""

from __future__ import annotations

from privacy.audit import AuditLog
from privacy.audit import verify as verify_audit_log
from privacy.crypto import DecryptionError, KeyStore, SessionCipher
from privacy.erasure import ErasureReport, erase_session, session_directory
from privacy.ledger import PrivacyLedger, sigma_for_epsilon
from privacy.noise import KeyNoiser, clip_and_noise
from privacy.session import SessionPrivacy, load_ledger, save_ledger
from privacy.tenants import (
    MemoryUsedTickets,
    RedisUsedTickets,
    TenantRegistry,
    TicketIssuer,
    UsedTickets,
)

__all__ = [
    "AuditLog",
    "DecryptionError",
    "ErasureReport",
    "KeyNoiser",
    "KeyStore",
    "MemoryUsedTickets",
    "PrivacyLedger",
    "RedisUsedTickets",
    "SessionCipher",
    "SessionPrivacy",
    "TenantRegistry",
    "TicketIssuer",
    "UsedTickets",
    "clip_and_noise",
    "erase_session",
    "load_ledger",
    "save_ledger",
    "session_directory",
    "sigma_for_epsilon",
    "verify_audit_log",
]
