"""Key clipping and Gaussian noise: the bound, the noise distribution, the off switch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from agent_runtime.errors import ConfigError, PrivacyError
from privacy.config import PrivacyConfig
from privacy.noise import KeyNoiser, clip_and_noise, clip_keys


def _keys(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-2, 2, size=(n, 1))  # norms from ~0.01 to ~100 x sqrt(d)
    return (rng.standard_normal((n, d)) * scales).astype(np.float32)


@pytest.mark.parametrize("clip_norm", [0.25, 1.0, 3.0])
def test_no_clipped_key_exceeds_clip_norm(clip_norm: float) -> None:
    keys = _keys(2000, 32, seed=1)
    clipped = clip_keys(keys, clip_norm)
    norms = np.linalg.norm(clipped, axis=1)
    assert norms.max() < clip_norm
    small = np.linalg.norm(keys.astype(np.float64), axis=1) < clip_norm * 0.99
    assert small.any()
    np.testing.assert_array_equal(clipped[small], keys[small].astype(np.float64))


@settings(max_examples=50, deadline=None)
@given(
    scale=st.floats(1e-4, 1e4),
    clip_norm=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**32 - 1),
)
def test_clipping_bound_holds_for_any_scale(scale: float, clip_norm: float, seed: int) -> None:
    keys = np.random.default_rng(seed).standard_normal((8, 16)) * scale
    assert np.linalg.norm(clip_keys(keys, clip_norm), axis=1).max() < clip_norm


def test_stored_minus_clipped_is_gaussian_with_std_sigma_times_c() -> None:
    sigma, clip_norm = 0.8, 1.5
    keys = _keys(4000, 16, seed=2)
    stored = clip_and_noise(keys, clip_norm, sigma, np.random.default_rng(1234))
    assert stored.dtype == np.float32 and stored.shape == keys.shape
    residual = (stored.astype(np.float64) - clip_keys(keys, clip_norm)).ravel()  # 64000 draws
    std = sigma * clip_norm
    assert stats.kstest(residual, "norm", args=(0.0, std)).pvalue > 1e-3
    assert stats.normaltest(residual).pvalue > 1e-3
    # The test has power: a 5% error in the noise scale, or a mean shift, is rejected.
    assert stats.kstest(residual, "norm", args=(0.0, 1.05 * std)).pvalue < 1e-6
    assert stats.kstest(residual, "norm", args=(0.05 * std, std)).pvalue < 1e-6


def test_noise_is_independent_across_coordinates_and_rows() -> None:
    keys = np.zeros((20000, 4), np.float32)
    residual = clip_and_noise(keys, 1.0, 1.0, np.random.default_rng(7)).astype(np.float64)
    corr = np.corrcoef(residual.T)
    assert np.abs(corr - np.eye(4)).max() < 0.05


def test_sigma_zero_noiser_stores_keys_untouched() -> None:
    keys = _keys(50, 8, seed=3)  # many rows have norm > C: still not clipped
    noiser = KeyNoiser(1.0, 0.0)
    assert not noiser.enabled
    np.testing.assert_array_equal(noiser(keys), keys)


def test_clip_and_noise_with_sigma_zero_only_clips() -> None:
    keys = _keys(50, 8, seed=4)
    out = clip_and_noise(keys, 1.0, 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(out, clip_keys(keys, 1.0).astype(np.float32))


def test_seeded_noiser_is_reproducible_and_unseeded_noise_is_fresh() -> None:
    keys = _keys(10, 8, seed=5)
    a = KeyNoiser(1.0, 1.0, seed=99)(keys)
    b = KeyNoiser(1.0, 1.0, seed=99)(keys)
    np.testing.assert_array_equal(a, b)
    prod = KeyNoiser.from_config(PrivacyConfig(noise_sigma=1.0, clip_norm=1.0))
    assert not np.array_equal(prod(keys), prod(keys))


@pytest.mark.parametrize(("clip_norm", "sigma"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.1)])
def test_invalid_parameters_name_the_setting(clip_norm: float, sigma: float) -> None:
    with pytest.raises(ConfigError, match="privacy"):
        KeyNoiser(clip_norm, sigma)


def test_keys_must_be_two_dimensional_and_finite() -> None:
    noiser = KeyNoiser(1.0, 1.0, seed=0)
    with pytest.raises(PrivacyError, match="shape"):
        noiser(np.zeros(8, np.float32))
    with pytest.raises(PrivacyError, match="finite"):
        noiser(np.full((2, 8), np.nan, np.float32))
