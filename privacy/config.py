"""Configuration of differentially private key noising and encryption at rest."""

from __future__ import annotations

from dataclasses import dataclass

from agent_runtime.errors import ConfigError

__all__ = ["PrivacyConfig"]


@dataclass
class PrivacyConfig:
    """Differentially private noising of stored memory keys (off by default)."""

    noise_sigma: float = 0.0
    """Noise multiplier sigma: stored keys get N(0, (sigma*C)^2) noise after clipping (0 disables)."""
    clip_norm: float = 1.0
    """L2 clipping bound C of each token's key before noise."""
    delta: float = 1e-6
    """The delta at which epsilon is reported."""
    accountant: str = "rdp"
    """Opacus accountant used by the ledger: ``rdp`` or ``prv``."""
    unit: str = "key"
    """Protected unit of the ledger: ``key`` (each stored key) or ``message`` (all keys written in one turn)."""
    budget_epsilon: float = 0.0
    """Per-session epsilon budget at ``delta``; past it the session stops writing memories (0: no budget)."""
    target_epsilon: float = 0.0
    """If > 0, derive ``noise_sigma`` from this epsilon per unit (Opacus ``get_noise_multiplier``)."""
    target_releases: int = 1
    """Keys per protected unit assumed by ``target_epsilon`` (1 for the key unit)."""
    encrypt_at_rest: bool = True
    """Seal bank snapshots, logs and generation state with per-session AES-GCM keys."""

    def validate(self) -> PrivacyConfig:
        """Check every field (pure: sigma for ``target_epsilon`` is derived by
        :func:`privacy.ledger.resolve_sigma`, where the privacy guard is built)."""
        ConfigError.check_non_negative("privacy.noise_sigma", self.noise_sigma)
        ConfigError.check_positive("privacy.clip_norm", self.clip_norm)
        if not 0.0 < self.delta < 1.0:
            raise ConfigError("privacy.delta", self.delta, "must be in (0, 1)")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError("privacy.accountant", self.accountant, "must be rdp or prv")
        if self.unit not in ("key", "message"):
            raise ConfigError("privacy.unit", self.unit, "must be key or message")
        ConfigError.check_non_negative("privacy.budget_epsilon", self.budget_epsilon)
        ConfigError.check_non_negative("privacy.target_epsilon", self.target_epsilon)
        ConfigError.check_positive("privacy.target_releases", self.target_releases)
        if self.budget_epsilon > 0 and self.noise_sigma == 0 and self.target_epsilon == 0:
            raise ConfigError(
                "privacy.budget_epsilon",
                self.budget_epsilon,
                "needs noise_sigma > 0 (or target_epsilon)",
            )
        return self
