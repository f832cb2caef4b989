"""Per-token key clipping and Gaussian noise: the mechanism behind the privacy ledger.

Each row of ``keys`` is one token's key (our model has one memory layer with one shared key
head, so a row is *all* of that token's key: the L2 bound below is joint over every head and
layer, as DESIGN.md §6 requires). A row ``k`` is clipped with Opacus's per-sample rule
``k * min(1, C / (||k|| + 1e-6))`` and released as ``clip(k) + N(0, (sigma*C)^2 I)``.
Adding or removing one row's content therefore moves the released row by at most ``C`` in
L2, which is the sensitivity the ledger accounts for.

``sigma == 0`` means noising is *off*: :class:`KeyNoiser` then stores keys untouched (not
even clipped, since clipping without noise buys no privacy and only costs recall), and the
ledger reports epsilon = inf. :func:`clip_and_noise` itself is the bare formula and clips
even at ``sigma == 0``.
"""

from __future__ import annotations

import math
import secrets

import numpy as np

from agent_runtime.errors import ConfigError, PrivacyError
from privacy.config import PrivacyConfig
from privacy.ledger import resolve_sigma

__all__ = ["CLIP_EPS", "KeyNoiser", "clip_and_noise", "clip_keys"]

CLIP_EPS = 1e-6
"""Opacus's stabiliser in the clip factor; it also makes every clipped norm strictly < C."""


def _check_params(clip_norm: float, sigma: float) -> None:
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError("privacy.clip_norm", clip_norm, "must be a finite number > 0")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError("privacy.noise_sigma", sigma, "must be a finite number >= 0")


def _check_keys(keys: np.ndarray) -> None:
    if keys.ndim != 2:
        raise PrivacyError(f"keys must have shape (n, d), got {keys.shape}")
    if not np.isfinite(keys).all():
        raise PrivacyError("keys must be finite")


def clip_keys(keys: np.ndarray, clip_norm: float) -> np.ndarray:
    """Rows clipped to L2 norm < ``clip_norm`` (Opacus rule); float64, shape of ``keys``.

    Computed in float64 so the bound holds exactly: every returned row has norm
    ``||k|| * C / (||k|| + 1e-6) < C`` when it was clipped, ``||k||`` otherwise.
    """
    k = np.asarray(keys, dtype=np.float64)
    _check_keys(k)
    norms = np.linalg.norm(k, axis=1)  # (n,)
    factor = np.minimum(1.0, clip_norm / (norms + CLIP_EPS))  # (n,)
    clipped: np.ndarray = k * factor[:, None]  # (n, d)
    return clipped


def clip_and_noise(
    keys: np.ndarray, clip_norm: float, sigma: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip each row to ``clip_norm`` and add N(0, (sigma*clip_norm)^2) to every coordinate.

    Args:
        keys: (n, d) keys, one row per token.
        clip_norm: L2 bound C (the sensitivity the ledger charges for).
        sigma: noise multiplier; the noise standard deviation is ``sigma * clip_norm``.
        rng: source of the noise; in production seeded from OS entropy (see KeyNoiser).

    Returns:
        (n, d) float32 noised keys. The sum is formed in float64 and rounded once, so the
        rounding is post-processing of the Gaussian mechanism and costs no privacy.
    """
    _check_params(clip_norm, sigma)
    clipped = clip_keys(keys, clip_norm)  # (n, d) float64
    if sigma > 0:
        clipped += rng.standard_normal(clipped.shape) * (sigma * clip_norm)
    return clipped.astype(np.float32)


class KeyNoiser:
    """Clips and noises keys before they reach a memory bank.

    Callers may rely on: with ``sigma > 0`` every returned key is ``clip(k) + noise`` with
    fresh noise (never re-drawn for a key that was already stored); with ``sigma == 0``
    (:attr:`enabled` false) keys come back unchanged.

    Without ``seed`` each call draws its noise from a new generator seeded with 128 bits
    from the OS CSPRNG (``secrets``), so no generator state spans two releases and an
    observer of stored keys cannot predict later noise. ``seed`` makes the noise
    reproducible and is for tests and benchmarks only.
    """

    def __init__(self, clip_norm: float, sigma: float, *, seed: int | None = None) -> None:
        _check_params(clip_norm, sigma)
        self.clip_norm = float(clip_norm)
        self.sigma = float(sigma)
        self._rng = np.random.default_rng(seed) if seed is not None else None

    @classmethod
    def from_config(cls, config: PrivacyConfig, *, seed: int | None = None) -> KeyNoiser:
        """A noiser with ``config.clip_norm`` and the config's sigma (``resolve_sigma``)."""
        return cls(config.clip_norm, resolve_sigma(config), seed=seed)

    @property
    def enabled(self) -> bool:
        """Whether keys are clipped and noised (``sigma > 0``)."""
        return self.sigma > 0

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        """Noised (n, d) float32 keys, or ``keys`` as float32 unchanged when disabled."""
        if not self.enabled:
            return np.ascontiguousarray(keys, dtype=np.float32)
        rng = self._rng or np.random.default_rng(secrets.randbits(128))
        return clip_and_noise(keys, self.clip_norm, self.sigma, rng)

    def __repr__(self) -> str:
        return f"KeyNoiser(clip_norm={self.clip_norm}, sigma={self.sigma})"
