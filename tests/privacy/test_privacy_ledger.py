"""The privacy ledger against Opacus's own accountants, the analytic Gaussian, and its budget."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant, create_accountant
from scipy import optimize, stats

from agent_runtime.errors import BudgetExhaustedError, ConfigError, PrivacyError
from privacy.config import PrivacyConfig
from privacy.ledger import PrivacyLedger, gaussian_epsilon, sigma_for_epsilon

DELTA = 1e-6


def _opacus_epsilon(accountant: str, sigma: float, steps: int, delta: float = DELTA) -> float:
    acc = create_accountant(mechanism=accountant)
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    with np.errstate(all="ignore"):  # PRV at sample rate 1 evaluates log(0) and masks it
        return float(acc.get_epsilon(delta=delta))


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with sensitivity/std = mu (Balle & Wang 2018)."""

    def excess(eps: float) -> float:
        d = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
        return float(d - delta)

    return float(optimize.brentq(excess, 0.0, 500.0, xtol=1e-12))


def test_opacus_rdp_golden_value() -> None:
    # Opacus's own regression value: if this moves, every epsilon we report moves with it.
    acc = RDPAccountant()
    for _ in range(2250):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(7.32911117143, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_key_unit_epsilon_is_one_opacus_release_however_many_keys(accountant: str) -> None:
    ledger = PrivacyLedger(noise_sigma=1.3, clip_norm=1.0, accountant=accountant, delta=DELTA)
    assert ledger.epsilon() == 0.0
    for batch in (1, 7, 500, 2000):
        ledger.charge(batch)
        assert ledger.epsilon() == pytest.approx(_opacus_epsilon(accountant, 1.3, 1), rel=1e-12)
    assert ledger.releases == 2508
    assert ledger.unit_releases == 1


@pytest.mark.parametrize("sigma", [0.7, 2.0, 8.0])
def test_message_unit_equals_opacus_rdp_stepped_per_key(sigma: float) -> None:
    ledger = PrivacyLedger(noise_sigma=sigma, clip_norm=2.0, unit="message", delta=DELTA)
    ledger.charge(3, "msg_a")
    ledger.charge(4, "msg_b")
    ledger.charge(2)  # unattributed keys count as one message
    ledger.charge(9, "msg_b")  # a message's keys may leave the window over several turns
    assert ledger.unit_releases == 13
    assert ledger.epsilon() == pytest.approx(_opacus_epsilon("rdp", sigma, 13), rel=1e-9)


def test_message_unit_prv_matches_opacus_stepped_per_key() -> None:
    ledger = PrivacyLedger(noise_sigma=2.0, clip_norm=1.0, unit="message", accountant="prv")
    ledger.charge(5, "m")
    # PRV discretises numerically (eps_error 0.01), so the two histories agree to that error.
    assert ledger.epsilon() == pytest.approx(_opacus_epsilon("prv", 2.0, 5), abs=0.02)


@pytest.mark.parametrize(("sigma", "releases"), [(1.0, 1), (2.0, 1), (3.0, 4), (6.0, 50)])
def test_epsilon_bounds_the_exact_gaussian_epsilon(sigma: float, releases: int) -> None:
    exact = _analytic_gaussian_epsilon(math.sqrt(releases) / sigma, DELTA)
    prv = gaussian_epsilon(sigma, releases, DELTA, "prv")
    rdp = gaussian_epsilon(sigma, releases, DELTA, "rdp")
    assert exact <= prv <= exact + 0.02  # PRV is tight
    assert exact <= rdp  # RDP is a valid, looser upper bound


def test_noise_off_reports_infinite_epsilon() -> None:
    ledger = PrivacyLedger(noise_sigma=0.0, clip_norm=1.0)
    assert ledger.epsilon() == math.inf  # keys are stored uncharged: no finite claim
    ledger.charge(10)
    assert ledger.epsilon() == math.inf
    report = ledger.report()
    assert report["epsilon"] is None and report["noising"].startswith("off")
    assert report["epsilon_replace_one"] is None
    with pytest.raises(ConfigError, match="needs"):
        PrivacyLedger(noise_sigma=0.0, clip_norm=1.0, budget_epsilon=1.0)
    json.dumps(report, allow_nan=False)


def test_report_says_what_is_and_is_not_covered() -> None:
    ledger = PrivacyLedger(noise_sigma=1.0, clip_norm=0.5, budget_epsilon=10.0, delta=DELTA)
    ledger.charge(4)
    report = ledger.report()
    assert report["mechanism"] == "gaussian" and report["sample_rate"] == 1.0
    assert report["unit"] == "key" and "parallel composition" in report["composition"]
    assert report["releases"] == 4 and report["unit_releases"] == 1
    assert report["epsilon"] == pytest.approx(_opacus_epsilon("rdp", 1.0, 1))
    assert report["epsilon_replace_one"] == pytest.approx(_opacus_epsilon("rdp", 0.5, 1))
    assert report["noise_std"] == 0.5
    assert report["budget_remaining"] == pytest.approx(10.0 - report["epsilon"])
    assert any("keys" in c for c in report["covered"])
    not_covered = " ".join(report["not_covered"])
    assert "values" in not_covered and "transcripts" in not_covered and "metadata" in not_covered
    assert "encrypted" in report["not_covered_protection"]
    json.dumps(report, allow_nan=False)


def test_budget_refuses_the_charge_that_would_pass_it_and_records_nothing() -> None:
    budget = gaussian_epsilon(4.0, 10, DELTA)  # exactly 10 keys per message fit
    ledger = PrivacyLedger(noise_sigma=4.0, clip_norm=1.0, unit="message", budget_epsilon=budget)
    ledger.charge(6, "a")
    assert not ledger.would_exceed(4, "a")
    assert ledger.would_exceed(5, "a")
    before = ledger.state_dict()
    with pytest.raises(BudgetExhaustedError, match="budget"):
        ledger.charge(5, "a")
    assert ledger.state_dict() == before
    ledger.charge(4, "a")
    ledger.charge(10, "b")  # another message may use its own 10 keys
    with pytest.raises(BudgetExhaustedError):
        ledger.charge(1, "b")
    assert ledger.epsilon() <= budget


def test_key_unit_budget_is_met_by_every_key_or_by_none() -> None:
    one = gaussian_epsilon(1.0, 1, DELTA)
    tight = PrivacyLedger(noise_sigma=1.0, clip_norm=1.0, budget_epsilon=one * 0.99)
    with pytest.raises(BudgetExhaustedError):
        tight.charge(1)
    loose = PrivacyLedger(noise_sigma=1.0, clip_norm=1.0, budget_epsilon=one)
    for _ in range(100):
        loose.charge(50)
    assert loose.epsilon() == one


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.sampled_from([None, "a", "b", "c"])), max_size=20))
def test_epsilon_never_decreases(charges: list[tuple[int, str | None]]) -> None:
    ledger = PrivacyLedger(noise_sigma=3.0, clip_norm=1.0, unit="message")
    last = 0.0
    for n, msg in charges:
        ledger.charge(n, msg)
        eps = ledger.epsilon()
        assert eps >= last
        last = eps
    assert ledger.releases == sum(n for n, _ in charges)


@pytest.mark.parametrize("unit", ["key", "message"])
def test_state_dict_round_trips_through_json(unit: str) -> None:
    ledger = PrivacyLedger(
        noise_sigma=1.7, clip_norm=0.9, unit=unit, accountant="rdp", delta=1e-7, budget_epsilon=50
    )
    ledger.charge(5, "x")
    ledger.charge(3)
    state = json.loads(json.dumps(ledger.state_dict()))
    restored = PrivacyLedger.from_state_dict(state)
    assert restored.state_dict() == ledger.state_dict()
    assert restored.epsilon() == ledger.epsilon()
    same_params = PrivacyLedger(noise_sigma=1.7, clip_norm=0.9, unit=unit)
    same_params.load_state_dict(state)
    assert same_params.releases == 8


def _state() -> dict[str, Any]:
    ledger = PrivacyLedger(noise_sigma=1.0, clip_norm=1.0, unit="message")
    ledger.charge(2, "m")
    return ledger.state_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("releases"), "does not have the key `releases`"),
        (lambda s: s.update(format_version=2), "format version 2"),
        (lambda s: s.update(mechanism="laplace"), "mechanism 'laplace'"),
        (lambda s: s.update(releases="2"), "`releases` has invalid value"),
        (lambda s: s.update(releases=True), "`releases` has invalid value"),
        (lambda s: s.update(message_releases={"m": -1}), "message_releases"),
        (lambda s: s.update(releases=5), "do not add up"),
    ],
)
def test_load_state_dict_names_the_problem(change: Any, message: str) -> None:
    state = _state()
    change(state)
    with pytest.raises(PrivacyError, match=message):
        PrivacyLedger.from_state_dict(state)


def test_load_state_dict_refuses_other_mechanism_parameters() -> None:
    other = PrivacyLedger(noise_sigma=2.0, clip_norm=1.0, unit="message")
    with pytest.raises(PrivacyError, match=r"noise_sigma=1\.0"):
        other.load_state_dict(_state())
    with pytest.raises(PrivacyError, match="empty"):
        other.load_state_dict({})


@pytest.mark.parametrize(
    ("accountant", "releases"), [("rdp", 1), ("rdp", 20), ("prv", 1), ("prv", 6)]
)
def test_sigma_for_epsilon_reaches_the_target(accountant: str, releases: int) -> None:
    sigma = sigma_for_epsilon(2.0, DELTA, releases, accountant)
    eps = gaussian_epsilon(sigma, releases, DELTA, accountant)
    assert 2.0 - 0.05 <= eps <= 2.0 + 1e-9


def test_sigma_for_epsilon_agrees_with_opacus_get_noise_multiplier() -> None:
    from opacus.accountants.utils import get_noise_multiplier

    ours = sigma_for_epsilon(3.0, DELTA, 8, "rdp")
    theirs = get_noise_multiplier(
        target_epsilon=3.0, target_delta=DELTA, sample_rate=1.0, steps=8, accountant="rdp"
    )
    assert ours == pytest.approx(theirs, rel=0.02)  # both within Opacus's 0.01 eps tolerance


def test_ledger_from_config_and_validation() -> None:
    cfg = PrivacyConfig(noise_sigma=1.1, clip_norm=0.7, delta=1e-5, accountant="prv")
    ledger = PrivacyLedger.from_config(cfg, unit="message", budget_epsilon=9.0)
    assert (ledger.noise_sigma, ledger.clip_norm, ledger.delta, ledger.accountant) == (
        1.1,
        0.7,
        1e-5,
        "prv",
    )
    with pytest.raises(ConfigError, match=r"privacy\.unit"):
        PrivacyLedger(noise_sigma=1.0, clip_norm=1.0, unit="token")
    with pytest.raises(ConfigError, match=r"privacy\.budget_epsilon"):
        PrivacyLedger(noise_sigma=1.0, clip_norm=1.0, budget_epsilon=0.0)
    with pytest.raises(PrivacyError):
        PrivacyLedger(noise_sigma=1.0, clip_norm=1.0).charge(-1)


def test_prv_accountant_class_is_the_one_used() -> None:
    assert isinstance(create_accountant(mechanism="prv"), PRVAccountant)
