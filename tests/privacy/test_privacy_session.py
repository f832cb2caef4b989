"""SessionPrivacy: charge and persist before returning keys; a session keeps its parameters."""

from __future__ import annotations

import numpy as np
import pytest

from agent_runtime.errors import BudgetExhaustedError, PrivacyError
from privacy.config import PrivacyConfig
from privacy.ledger import gaussian_epsilon
from privacy.session import LEDGER_FILE, SessionPrivacy, load_ledger


def _keys(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, 8)).astype(np.float32)


def test_protect_persists_the_charge_before_returning_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sp = SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=1.0), unit="message")
    assert load_ledger(tmp_path / LEDGER_FILE).releases == 0  # parameters on disk at once
    out = sp.protect(_keys(5), "msg_1")
    assert out.shape == (5, 8) and out.dtype == np.float32
    on_disk = load_ledger(tmp_path / LEDGER_FILE)
    assert on_disk.releases == 5 and on_disk.message_releases == {"msg_1": 5}
    assert sp.report()["unit_releases"] == 5


def test_budget_exhaustion_charges_nothing_and_returns_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    budget = gaussian_epsilon(2.0, 4, 1e-6)
    sp = SessionPrivacy.open(
        tmp_path, PrivacyConfig(noise_sigma=2.0), unit="message", budget_epsilon=budget
    )
    sp.protect(_keys(4), "m")
    before = (tmp_path / LEDGER_FILE).read_bytes()
    with pytest.raises(BudgetExhaustedError):
        sp.protect(_keys(1), "m")
    assert (tmp_path / LEDGER_FILE).read_bytes() == before


def test_noising_off_passes_keys_through_uncharged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sp = SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=0.0))
    keys = _keys(3)
    np.testing.assert_array_equal(sp.protect(keys), keys)
    assert sp.ledger.releases == 0 and not sp.enabled
    assert sp.report()["noising"].startswith("off")


def test_a_resumed_session_keeps_its_parameters(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=1.5, clip_norm=0.5))
    first.protect(_keys(7))
    resumed = SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=0.1, clip_norm=2.0))
    assert (resumed.ledger.noise_sigma, resumed.ledger.clip_norm) == (1.5, 0.5)
    assert (resumed.noiser.sigma, resumed.noiser.clip_norm) == (1.5, 0.5)
    assert resumed.ledger.releases == 7
    assert resumed.audit_details()["noise_sigma"] == 1.5


def test_corrupt_ledger_file_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=1.0)).protect(_keys(2))
    path = tmp_path / LEDGER_FILE
    path.write_bytes(path.read_bytes().replace(b'"releases": 2', b'"releases": 0'))
    with pytest.raises(PrivacyError, match="checksum"):
        SessionPrivacy.open(tmp_path, PrivacyConfig(noise_sigma=1.0))
    path.write_bytes(b"{")
    with pytest.raises(PrivacyError, match="unreadable"):
        load_ledger(path)
