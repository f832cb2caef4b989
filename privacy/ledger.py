"""The privacy ledger: what the stored keys of one session have cost, in (epsilon, delta).

Mechanism: every stored key is one release of the Gaussian mechanism (sample rate 1,
sensitivity C under add/remove adjacency, noise N(0, (sigma*C)^2), see :mod:`privacy.noise`).
Accounting uses Opacus's accountants (``rdp`` or ``prv``).

Protected unit (what one "individual" is):

``key`` (default)
    One stored key. Each key is released exactly once and the keys are disjoint, so by
    *parallel* composition the epsilon of every unit is that of ONE Gaussian release at
    sigma, however many keys the session stores. The number of releases is reported but
    does not grow epsilon.
``message``
    All keys that one message produced. A message with m keys costs the composition of m
    releases; the ledger tracks keys per message and reports the largest m. Keys charged
    without a message id are all counted as one message, which is a sound over-estimate.

At sample rate 1, m Gaussian releases with multiplier sigma compose *exactly* to one
Gaussian release with multiplier ``sigma / sqrt(m)`` (their privacy-loss distributions are
Gaussian; Dong, Roth & Su 2019). The ledger asks Opacus for that single release, which gives
the same RDP value as stepping the accountant m times and keeps PRV fast for large m.

The ledger must be charged *before* the noised keys become durable; :mod:`privacy.session`
does that ordering (charge, persist the ledger with fsync, then hand the keys to the bank).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from agent_runtime.errors import BudgetExhaustedError, ConfigError, PrivacyError
from privacy.config import PrivacyConfig

__all__ = [
    "ACCOUNTANTS",
    "STATE_VERSION",
    "UNITS",
    "PrivacyLedger",
    "gaussian_epsilon",
    "sigma_for_epsilon",
]

STATE_VERSION = 1
UNITS = ("key", "message")
ACCOUNTANTS = ("rdp", "prv")
MECHANISM = "gaussian"

_COVERED = ["stored memory keys (the retrieval index and anything trained on it)"]
_NOT_COVERED = [
    "memory values (returned verbatim on retrieval, so model outputs are not covered)",
    "conversation transcripts and generation state",
    "metadata: session ids, timestamps, counts (Redis and the data directory)",
]
_NOT_COVERED_PROTECTION = (
    "encrypted at rest with AES-GCM (per-session data keys) when encryption is on; "
    "not differentially private"
)


@functools.lru_cache(maxsize=4096)
def gaussian_epsilon(sigma: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``releases`` composed Gaussian releases at sample rate 1.

    ``sigma == 0`` (no noise) gives ``inf``; ``releases == 0`` gives 0.
    Raises PrivacyError when Opacus cannot evaluate the parameters.
    """
    if releases < 0:
        raise PrivacyError(f"releases must be >= 0, got {releases}")
    if releases == 0:
        return 0.0
    if sigma <= 0:
        return math.inf
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma / math.sqrt(releases), 1.0, 1)]  # exact composition, see module doc
    try:
        # PRV evaluates log(1 - q) at q = 1 on purpose and masks the result; silence numpy.
        with np.errstate(all="ignore"):
            eps = float(acc.get_epsilon(delta=delta))
    except (ValueError, ArithmeticError, RuntimeError) as exc:
        raise PrivacyError(
            f"{accountant} accountant failed for sigma={sigma}, releases={releases}, delta={delta}"
        ) from exc
    return eps


def sigma_for_epsilon(
    target_epsilon: float, delta: float, releases: int = 1, accountant: str = "rdp"
) -> float:
    """Smallest noise multiplier (within Opacus's 0.01 epsilon tolerance) such that
    ``releases`` Gaussian releases at sample rate 1 cost at most ``target_epsilon``.

    For the ``key`` unit use ``releases=1``; for ``message``, the largest number of keys a
    message may produce. Uses ``opacus.accountants.utils.get_noise_multiplier`` for one
    release and scales by ``sqrt(releases)`` (exact, see module doc).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError("privacy.target_epsilon", target_epsilon, "must be a finite number > 0")
    if releases < 1:
        raise ConfigError("privacy.target_releases", releases, "must be >= 1")
    try:
        with np.errstate(all="ignore"):
            sigma1 = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=1,
                accountant=accountant,
            )
    except ValueError as exc:
        raise PrivacyError(f"no noise multiplier reaches epsilon={target_epsilon}") from exc
    return float(sigma1) * math.sqrt(releases)


def resolve_sigma(config: PrivacyConfig) -> float:
    """The noise multiplier a config asks for: ``noise_sigma``, or the one that reaches
    ``target_epsilon`` per unit (:func:`sigma_for_epsilon`) when that is set."""
    if config.target_epsilon > 0:
        return _cached_sigma(
            config.target_epsilon, config.delta, config.target_releases, config.accountant
        )
    return config.noise_sigma


@functools.lru_cache(maxsize=64)
def _cached_sigma(target_epsilon: float, delta: float, releases: int, accountant: str) -> float:
    return sigma_for_epsilon(target_epsilon, delta, releases, accountant)


class PrivacyLedger:
    """Accounts the Gaussian releases of one session's stored keys.

    Callers may rely on: :meth:`charge` either records all ``n_keys`` or nothing (it raises
    BudgetExhaustedError before recording); :meth:`epsilon` never decreases as charges are
    added; :meth:`state_dict` / :meth:`load_state_dict` round-trip exactly.

    Args:
        noise_sigma: noise multiplier of every release (0: noising off, epsilon = inf).
        clip_norm: clipping bound C (the sensitivity).
        unit: protected unit, ``key`` or ``message`` (module doc).
        accountant: ``rdp`` or ``prv``.
        delta: the delta at which epsilon is reported and the budget is enforced.
        budget_epsilon: largest epsilon per unit this session may reach (None: no budget).
    """

    def __init__(
        self,
        *,
        noise_sigma: float,
        clip_norm: float,
        unit: str = "key",
        accountant: str = "rdp",
        delta: float = 1e-6,
        budget_epsilon: float | None = None,
    ) -> None:
        if not (math.isfinite(noise_sigma) and noise_sigma >= 0):
            raise ConfigError("privacy.noise_sigma", noise_sigma, "must be a finite number >= 0")
        if not (math.isfinite(clip_norm) and clip_norm > 0):
            raise ConfigError("privacy.clip_norm", clip_norm, "must be a finite number > 0")
        if unit not in UNITS:
            raise ConfigError("privacy.unit", unit, f"must be one of {UNITS}")
        if accountant not in ACCOUNTANTS:
            raise ConfigError("privacy.accountant", accountant, f"must be one of {ACCOUNTANTS}")
        if not 0.0 < delta < 1.0:
            raise ConfigError("privacy.delta", delta, "must be in (0, 1)")
        if budget_epsilon is not None and not budget_epsilon > 0:
            raise ConfigError("privacy.budget_epsilon", budget_epsilon, "must be > 0 or unset")
        if budget_epsilon is not None and noise_sigma == 0:
            raise ConfigError(
                "privacy.budget_epsilon", budget_epsilon, "a budget needs privacy.noise_sigma > 0"
            )
        self.noise_sigma = float(noise_sigma)
        self.clip_norm = float(clip_norm)
        self.unit = unit
        self.accountant = accountant
        self.delta = float(delta)
        self.budget_epsilon = None if budget_epsilon is None else float(budget_epsilon)
        self.releases = 0  # keys charged in total
        self.message_releases: dict[str, int] = {}  # unit == "message": keys per message id
        self.unattributed_releases = 0  # unit == "message": keys charged without a message id

    @classmethod
    def from_config(
        cls, config: PrivacyConfig, *, unit: str = "key", budget_epsilon: float | None = None
    ) -> PrivacyLedger:
        """A ledger with the config's sigma (:func:`resolve_sigma`), C, delta and accountant."""
        return cls(
            noise_sigma=resolve_sigma(config),
            clip_norm=config.clip_norm,
            unit=unit,
            accountant=config.accountant,
            delta=config.delta,
            budget_epsilon=budget_epsilon,
        )

    # -- accounting --------------------------------------------------------------------------

    @property
    def unit_releases(self) -> int:
        """Releases composed in the worst-off unit (1 for ``key`` once anything is stored)."""
        if self.unit == "key":
            return min(self.releases, 1)
        return max(self.unattributed_releases, max(self.message_releases.values(), default=0))

    def _unit_releases_after(self, n_keys: int, message_id: str | None) -> int:
        if n_keys < 0:
            raise PrivacyError(f"n_keys must be >= 0, got {n_keys}")
        if self.unit == "key":
            return min(self.releases + n_keys, 1)
        if message_id is None:
            after = self.unattributed_releases + n_keys
        else:
            after = self.message_releases.get(message_id, 0) + n_keys
        return max(self.unit_releases, after)

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon per protected unit spent so far, at ``delta`` (default: the ledger's).

        With noising off (sigma 0) it is ``inf`` even before any charge: such sessions store
        keys without charging, so no finite claim can be made about them.
        """
        if self.noise_sigma == 0:
            return math.inf
        return self._epsilon_for(self.unit_releases, self.delta if delta is None else delta)

    def _epsilon_for(self, unit_releases: int, delta: float) -> float:
        return gaussian_epsilon(self.noise_sigma, unit_releases, delta, self.accountant)

    def would_exceed(self, n_keys: int, message_id: str | None = None) -> bool:
        """Whether charging ``n_keys`` (for ``message_id``) would pass the budget."""
        if self.budget_epsilon is None or n_keys == 0:
            return False
        after = self._epsilon_for(self._unit_releases_after(n_keys, message_id), self.delta)
        return after > self.budget_epsilon

    def charge(self, n_keys: int, message_id: str | None = None) -> None:
        """Record ``n_keys`` releases; call it before the noised keys become durable.

        Raises:
            BudgetExhaustedError: the budget would be passed; nothing is recorded.
        """
        if self.would_exceed(n_keys, message_id):
            raise BudgetExhaustedError(
                f"privacy budget epsilon={self.budget_epsilon} at delta={self.delta} would be "
                f"exceeded by {n_keys} more keys (unit={self.unit})"
            )
        self._unit_releases_after(n_keys, message_id)  # validates n_keys
        self.releases += n_keys
        if self.unit == "message":
            if message_id is None:
                self.unattributed_releases += n_keys
            else:
                self.message_releases[message_id] = (
                    self.message_releases.get(message_id, 0) + n_keys
                )

    def report(self, delta: float | None = None) -> dict[str, Any]:
        """A JSON-serialisable statement of what is protected, how, and at what epsilon."""
        d = self.delta if delta is None else delta
        eps = self.epsilon(d)
        m = self.unit_releases
        noising = self.noise_sigma > 0
        if self.unit == "key":
            composition = (
                "parallel composition over disjoint units: each stored key is released once, "
                "so epsilon is that of one Gaussian release however many keys are stored"
            )
        else:
            composition = (
                "sequential composition over the keys of one message; epsilon is that of the "
                "message with the most keys (keys without a message id count as one message)"
            )
        budget = self.budget_epsilon
        return {
            "mechanism": MECHANISM,
            "noising": "on" if noising else "off (stored keys are not differentially private)",
            "accountant": self.accountant,
            "clip_norm": self.clip_norm,
            "noise_sigma": self.noise_sigma,
            "noise_std": self.noise_sigma * self.clip_norm,
            "sample_rate": 1.0,
            "adjacency": "add/remove one unit (its keys replaced by zero vectors); sensitivity C",
            "unit": self.unit,
            "composition": composition,
            "releases": self.releases,
            "unit_releases": m,
            "delta": d,
            "epsilon": _json_float(eps),
            # Swapping a unit's key for any other key moves it by up to 2C: sigma/2 in effect.
            "epsilon_replace_one": _json_float(
                math.inf
                if not noising
                else gaussian_epsilon(self.noise_sigma / 2, m, d, self.accountant)
            ),
            "budget_epsilon": budget,
            "budget_remaining": None if budget is None else _json_float(max(0.0, budget - eps)),
            "covered": list(_COVERED),
            "not_covered": list(_NOT_COVERED),
            "not_covered_protection": _NOT_COVERED_PROTECTION,
        }

    # -- persistence -------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to restore this ledger, JSON-serialisable, with a format version."""
        return {
            "format_version": STATE_VERSION,
            "mechanism": MECHANISM,
            "noise_sigma": self.noise_sigma,
            "clip_norm": self.clip_norm,
            "unit": self.unit,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget_epsilon": self.budget_epsilon,
            "releases": self.releases,
            "message_releases": dict(self.message_releases),
            "unattributed_releases": self.unattributed_releases,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the charges of ``state`` into this ledger.

        The mechanism parameters (sigma, C, unit, accountant) must equal this ledger's, since
        the recorded charges were made under them; ``delta`` and ``budget_epsilon`` stay this
        ledger's (they are reporting policy). Raises PrivacyError naming the first problem.
        """
        _validate_state(state)
        for name in ("noise_sigma", "clip_norm", "unit", "accountant"):
            if state[name] != getattr(self, name):
                raise PrivacyError(
                    f"state_dict was recorded with {name}={state[name]!r}; this ledger has "
                    f"{name}={getattr(self, name)!r}"
                )
        self.releases = state["releases"]
        self.message_releases = dict(state["message_releases"])
        self.unattributed_releases = state["unattributed_releases"]

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyLedger:
        """A ledger with the parameters *and* charges of ``state`` (a resumed session)."""
        _validate_state(state)
        ledger = cls(
            noise_sigma=state["noise_sigma"],
            clip_norm=state["clip_norm"],
            unit=state["unit"],
            accountant=state["accountant"],
            delta=state["delta"],
            budget_epsilon=state["budget_epsilon"],
        )
        ledger.load_state_dict(state)
        return ledger

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(unit={self.unit!r}, sigma={self.noise_sigma}, C={self.clip_norm}, "
            f"releases={self.releases})"
        )


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no inf: None means unbounded


_FIELDS: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "mechanism": (str,),
    "noise_sigma": (int, float),
    "clip_norm": (int, float),
    "unit": (str,),
    "accountant": (str,),
    "delta": (int, float),
    "budget_epsilon": (int, float, type(None)),
    "releases": (int,),
    "message_releases": (dict,),
    "unattributed_releases": (int,),
}


def _validate_state(state: object) -> None:
    """Opacus-style validation: the first missing or malformed field is named."""
    if not isinstance(state, dict) or not state:
        raise PrivacyError("ledger state_dict is empty or not a dict and cannot be loaded")
    for name, types in _FIELDS.items():
        if name not in state:
            raise PrivacyError(f"ledger state_dict does not have the key `{name}`")
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise PrivacyError(f"ledger state_dict field `{name}` has invalid value {value!r}")
    if state["format_version"] != STATE_VERSION:
        raise PrivacyError(
            f"ledger state_dict has format version {state['format_version']}; "
            f"this code reads version {STATE_VERSION}"
        )
    if state["mechanism"] != MECHANISM:
        raise PrivacyError(
            f"ledger state_dict of mechanism {state['mechanism']!r} cannot be loaded"
        )
    counts = state["message_releases"]
    if not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in counts.items()
    ):
        raise PrivacyError("ledger state_dict field `message_releases` must map str to int >= 0")
    if state["releases"] < 0 or state["unattributed_releases"] < 0:
        raise PrivacyError("ledger state_dict release counts must be >= 0")
    if state["unit"] == "message" and (
        sum(counts.values()) + state["unattributed_releases"] != state["releases"]
    ):
        raise PrivacyError("ledger state_dict release counts do not add up")
