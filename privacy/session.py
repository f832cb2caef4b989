"""One session's key privacy: the noiser, its ledger, and the ordering between them.

:meth:`SessionPrivacy.protect` is the single call the write path needs before
``bank.add``: it checks the budget, charges the ledger, persists the ledger durably to
``<session dir>/privacy.json`` and only then returns the noised keys. A crash after the
ledger is persisted and before the keys are stored over-counts (safe); the reverse order,
which could under-count, cannot happen.

A session keeps the mechanism parameters (sigma, C, unit, accountant) it was created with:
on resume they are read back from ``privacy.json`` even if the configuration changed since,
so one session's epsilon always refers to one mechanism.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from agent_runtime.errors import PrivacyError
from agent_runtime.files import atomic_write
from privacy.config import PrivacyConfig
from privacy.ledger import PrivacyLedger, resolve_sigma
from privacy.noise import KeyNoiser

__all__ = ["LEDGER_FILE", "SessionPrivacy", "load_ledger", "save_ledger"]

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy.json"


class SessionPrivacy:
    """The privacy state of one session (not thread-safe: use it on the bank's thread)."""

    def __init__(self, path: Path, ledger: PrivacyLedger, noiser: KeyNoiser) -> None:
        self.path = path
        self.ledger = ledger
        self.noiser = noiser

    @classmethod
    def open(
        cls,
        directory: Path,
        config: PrivacyConfig,
        *,
        unit: str = "key",
        budget_epsilon: float | None = None,
        seed: int | None = None,
    ) -> SessionPrivacy:
        """Load the session's ledger from ``directory/privacy.json``, or start one.

        A new ledger takes its parameters from ``config``/``unit``/``budget_epsilon`` and is
        written at once, so the audit CLI sees every session's parameters. ``seed`` makes the
        noise reproducible (tests only).
        """
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LEDGER_FILE
        if path.exists():
            ledger = load_ledger(path)
            sigma = resolve_sigma(config)
            if (ledger.noise_sigma, ledger.clip_norm) != (sigma, config.clip_norm):
                log.info(
                    "session keeps its privacy parameters sigma=%s C=%s (config now sigma=%s C=%s)",
                    ledger.noise_sigma,
                    ledger.clip_norm,
                    sigma,
                    config.clip_norm,
                )
        else:
            ledger = PrivacyLedger.from_config(config, unit=unit, budget_epsilon=budget_epsilon)
            save_ledger(path, ledger)
        return cls(path, ledger, KeyNoiser(ledger.clip_norm, ledger.noise_sigma, seed=seed))

    @property
    def enabled(self) -> bool:
        """Whether keys are noised (and charged) in this session."""
        return self.noiser.enabled

    def protect(self, keys: np.ndarray, message_id: str | None = None) -> np.ndarray:
        """Charge, persist the ledger, then return the keys to store (noised when enabled).

        With noising off the keys come back unchanged and nothing is charged.

        Raises:
            BudgetExhaustedError: the budget would be passed; nothing is charged or returned,
                and the caller must not store these keys.
        """
        n = int(np.shape(keys)[0])
        if not self.enabled or n == 0:
            return np.ascontiguousarray(keys, dtype=np.float32)
        state = self.ledger.state_dict()
        self.ledger.charge(n, message_id)
        try:
            save_ledger(self.path, self.ledger)
        except BaseException:
            self.ledger.load_state_dict(state)  # not durable, so not charged
            raise
        return self.noiser(keys)

    def report(self) -> dict[str, Any]:
        """The ledger's report (see :meth:`PrivacyLedger.report`)."""
        return self.ledger.report()

    def audit_details(self) -> dict[str, str | float | int | None]:
        """The parameters to record with the audit action ``privacy_params``."""
        lg = self.ledger
        return {
            "noise_sigma": lg.noise_sigma,
            "clip_norm": lg.clip_norm,
            "unit": lg.unit,
            "accountant": lg.accountant,
            "delta": lg.delta,
            "budget_epsilon": lg.budget_epsilon,
        }


# -- the privacy.json file -----------------------------------------------------------------------------


def save_ledger(path: Path, ledger: PrivacyLedger) -> None:
    """Durably replace ``path`` with the ledger's state (atomic, fsynced, checksummed)."""
    body = json.dumps(ledger.state_dict(), sort_keys=True, allow_nan=False)
    doc = {"ledger": json.loads(body), "sha256": hashlib.sha256(body.encode()).hexdigest()}
    atomic_write(path, (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode())


def load_ledger(path: Path) -> PrivacyLedger:
    """Read a ledger written by :func:`save_ledger`; PrivacyError if corrupt or unreadable."""
    try:
        doc = json.loads(path.read_bytes())
        state = doc["ledger"]
        body = json.dumps(state, sort_keys=True, allow_nan=False)
        ok = hashlib.sha256(body.encode()).hexdigest() == doc["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrivacyError(f"{path.name}: unreadable privacy ledger: {exc}") from exc
    if not ok:
        raise PrivacyError(f"{path.name}: privacy ledger checksum mismatch")
    return PrivacyLedger.from_state_dict(state)
