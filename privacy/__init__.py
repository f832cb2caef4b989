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

import importlib
from typing import Any

# Names are imported on first use (PEP 562): the ledger pulls in Opacus and torch (seconds), which
# ``agent-runtime tenants`` and the audit log never need.
_EXPORTS = {
    "AuditLog": ("privacy.audit", "AuditLog"),
    "verify_audit_log": ("privacy.audit", "verify"),
    "DecryptionError": ("privacy.crypto", "DecryptionError"),
    "KeyStore": ("privacy.crypto", "KeyStore"),
    "SessionCipher": ("privacy.crypto", "SessionCipher"),
    "ErasureReport": ("privacy.erasure", "ErasureReport"),
    "erase_session": ("privacy.erasure", "erase_session"),
    "session_directory": ("privacy.erasure", "session_directory"),
    "PrivacyLedger": ("privacy.ledger", "PrivacyLedger"),
    "sigma_for_epsilon": ("privacy.ledger", "sigma_for_epsilon"),
    "KeyNoiser": ("privacy.noise", "KeyNoiser"),
    "clip_and_noise": ("privacy.noise", "clip_and_noise"),
    "SessionPrivacy": ("privacy.session", "SessionPrivacy"),
    "load_ledger": ("privacy.session", "load_ledger"),
    "save_ledger": ("privacy.session", "save_ledger"),
    "MemoryUsedTickets": ("privacy.tenants", "MemoryUsedTickets"),
    "RedisUsedTickets": ("privacy.tenants", "RedisUsedTickets"),
    "TenantRegistry": ("privacy.tenants", "TenantRegistry"),
    "TicketIssuer": ("privacy.tenants", "TicketIssuer"),
    "UsedTickets": ("privacy.tenants", "UsedTickets"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'privacy' has no attribute {name!r}") from None
    return getattr(importlib.import_module(module), attr)
