"""Tests of the R2* fits: exact recovery, efficiency against the CRLB, noise-floor bias."""

import warnings

import numpy as np
import pytest

from qmri_workflows.core.crlb import estatics_crlb, r2star_crlb
from qmri_workflows.core.noise import magnitude_mean
from qmri_workflows.core.r2star import (
    MAX_DECAY_BEFORE_FIRST_ECHO,
    fit_estatics,
    fit_r2star_loglinear,
    fit_r2star_nonlinear,
    t2star_where_significant,
)

ECHO_TIMES = np.linspace(2e-3, 20e-3, 8)
TE = ECHO_TIMES
R2STAR = np.linspace(5.0, 100.0, 40)
S0 = np.linspace(50.0, 2000.0, 40)


def _decay(s0, r2star, echo_times):
    return np.asarray(s0)[..., None] * np.exp(-np.asarray(r2star)[..., None] * echo_times)


def _rician(amplitude, sigma, rng, n_coils=1):
    """RSS of n_coils channels (amplitude shared equally) with complex Gaussian noise."""
    channel = amplitude[..., None] / np.sqrt(n_coils)
    real = channel + rng.normal(scale=sigma, size=amplitude.shape + (n_coils,))
    imag = rng.normal(scale=sigma, size=amplitude.shape + (n_coils,))
    return np.sqrt((real**2 + imag**2).sum(axis=-1))


# ---------------------------------------------------------------------------------------------
# Noiseless recovery
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fit",
    [
        lambda s, te: fit_r2star_loglinear(s, te),
        lambda s, te: fit_r2star_loglinear(s, te, weighted=False),
        lambda s, te: fit_r2star_nonlinear(s, te),
    ],
    ids=["wls", "ols", "nls"],
)
def test_single_contrast_noiseless_exact(fit):
    signal = _decay(S0, R2STAR, ECHO_TIMES)
    s0, r2star = fit(signal, ECHO_TIMES)
    np.testing.assert_allclose(r2star, R2STAR, rtol=1e-6)
    np.testing.assert_allclose(s0, S0, rtol=1e-6)


@pytest.mark.parametrize("n_coils", [1, 4])
def test_noise_floor_model_noiseless_exact(n_coils):
    # Data equal to the exact expected magnitude: the floor-aware NLS must return the truth.
    sigma = 20.0
    signal = magnitude_mean(_decay(S0, R2STAR, ECHO_TIMES), sigma, n_coils=n_coils)
    s0, r2star = fit_r2star_nonlinear(signal, ECHO_TIMES, sigma=sigma, n_coils=n_coils)
    np.testing.assert_allclose(r2star, R2STAR, rtol=1e-6)
    np.testing.assert_allclose(s0, S0, rtol=1e-6)


@pytest.mark.parametrize("method", ["wls", "ols", "nls"])
@pytest.mark.parametrize("n_contrast", [2, 3])
def test_estatics_noiseless_exact(method, n_contrast):
    scales = np.array([1.0, 0.4, 2.5])[:n_contrast]
    s0_true = S0[:, None] * scales
    signals = _decay(s0_true, R2STAR[:, None], ECHO_TIMES)
    s0, r2star = fit_estatics(signals, ECHO_TIMES, method=method)
    np.testing.assert_allclose(r2star, R2STAR, rtol=1e-6)
    np.testing.assert_allclose(s0, s0_true, rtol=1e-6)


@pytest.mark.parametrize("method", ["wls", "nls"])
def test_estatics_per_contrast_echo_times_with_nan_padding(method):
    # Contrast 0: 8 echoes; contrast 1: 6 different echoes, NaN-padded; contrast 2: 4 echoes.
    te = np.full((3, 8), np.nan)
    te[0] = ECHO_TIMES
    te[1, :6] = np.linspace(2.5e-3, 15e-3, 6)
    te[2, :4] = np.linspace(3e-3, 12e-3, 4)
    s0_true = S0[:, None] * np.array([1.0, 0.5, 1.5])
    signals = s0_true[..., None] * np.exp(-R2STAR[:, None, None] * np.nan_to_num(te))
    signals[:, np.isnan(te)] = np.nan
    s0, r2star = fit_estatics(signals, te, method=method)
    np.testing.assert_allclose(r2star, R2STAR, rtol=1e-6)
    np.testing.assert_allclose(s0, s0_true, rtol=1e-6)


def test_mask_leading_shape_dtype_and_chunking():
    rng = np.random.default_rng(3)
    shape = (6, 7, 5)
    r2_map = rng.uniform(5, 100, shape)
    s0_map = rng.uniform(100, 1000, shape)
    signal = _decay(s0_map, r2_map, ECHO_TIMES).astype(np.float32)
    mask = rng.random(shape) > 0.3
    s0, r2star = fit_r2star_loglinear(signal, ECHO_TIMES, mask=mask, chunk_size=17)
    assert r2star.shape == shape and s0.shape == shape
    np.testing.assert_allclose(r2star[mask], r2_map[mask], rtol=1e-5)  # float32 input
    assert np.all(r2star[~mask] == 0) and np.all(s0[~mask] == 0)
    s0_nls, r2_nls = fit_r2star_nonlinear(signal, ECHO_TIMES, mask=mask, chunk_size=23)
    np.testing.assert_allclose(r2_nls[mask], r2_map[mask], rtol=1e-5)
    assert np.all(r2_nls[~mask] == 0)


def test_zero_negative_and_empty_samples():
    signal = _decay(np.array([500.0, 500.0, 500.0, 0.0]), np.array([30.0, 30.0, 30.0, 0.0]), TE)
    signal[0, -1] = 0.0  # dropped sample
    signal[1, -2:] = -3.0  # negative samples
    signal[2, :7] = 0.0  # a single usable echo: undetermined
    s0, r2star = fit_r2star_loglinear(signal, ECHO_TIMES)
    np.testing.assert_allclose(r2star[:2], 30.0, rtol=1e-6)
    # Undetermined is NaN, not a plausible-looking 0 s^-1.
    assert np.isnan(r2star[2:]).all() and np.isnan(s0[2:]).all()
    # NLS treats finite samples (zeros included) as data and only non-finite ones as missing.
    signal[0, -1] = np.nan
    s0, r2star = fit_r2star_nonlinear(signal, ECHO_TIMES)
    assert np.all(np.isfinite(r2star[:2])) and np.all(np.isfinite(s0[:2]))
    np.testing.assert_allclose(r2star[0], 30.0, rtol=1e-6)
    # No log-linear start from a single positive echo (voxel 2), nor from zeros (voxel 3).
    assert np.isnan(r2star[2:]).all() and np.isnan(s0[2:]).all()


def test_invalid_inputs_raise():
    signal = np.ones((4, 8))
    with pytest.raises(ValueError, match="seconds"):
        fit_r2star_loglinear(signal, ECHO_TIMES * 1e3)
    with pytest.raises(ValueError, match="echo_times"):
        fit_r2star_loglinear(signal, ECHO_TIMES[:5])
    with pytest.raises(ValueError, match="mask"):
        fit_r2star_loglinear(signal, ECHO_TIMES, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="method"):
        fit_estatics(signal[:, None], ECHO_TIMES, method="lm")
    with pytest.raises(ValueError, match="sigma"):
        fit_r2star_nonlinear(signal, ECHO_TIMES, sigma=np.ones(3))


# ---------------------------------------------------------------------------------------------
# Noisy Monte Carlo: efficiency and bias
# ---------------------------------------------------------------------------------------------
N_VOXELS = 20_000
WM_R2STAR = 20.0
MC_ECHO_TIMES = np.linspace(2.3e-3, 18.4e-3, 8)


@pytest.mark.parametrize("snr", [50.0, 100.0])
@pytest.mark.parametrize("method", ["wls", "nls"])
def test_estatics_efficiency_and_bias(snr, method):
    """SD within 10 % of the CRLB and |bias| < 1 % at first-echo SNR 50-100 (two contrasts)."""
    rng = np.random.default_rng(int(snr) + (method == "nls"))
    sigma = 1.0
    first_echo = np.array([snr, 0.6 * snr])  # e.g. PD- and T1-weighted flip angles
    s0_true = first_echo * np.exp(WM_R2STAR * MC_ECHO_TIMES[0])
    amplitude = np.broadcast_to(_decay(s0_true, WM_R2STAR, MC_ECHO_TIMES), (N_VOXELS, 2, 8))
    signals = _rician(amplitude, sigma, rng)
    _, r2star = fit_estatics(signals, MC_ECHO_TIMES, method=method, sigma=sigma)
    bound = estatics_crlb(s0_true, WM_R2STAR, MC_ECHO_TIMES, sigma)
    # The SD of a sample SD from 2e4 draws is 0.5 %: a 10 % band is > 15 standard errors wide.
    assert r2star.std() == pytest.approx(bound, rel=0.10)
    assert abs(r2star.mean() / WM_R2STAR - 1) < 0.01


def test_single_contrast_wls_efficiency():
    rng = np.random.default_rng(5)
    s0_true = 60.0 * np.exp(WM_R2STAR * MC_ECHO_TIMES[0])
    amplitude = np.broadcast_to(s0_true * np.exp(-WM_R2STAR * MC_ECHO_TIMES), (N_VOXELS, 8))
    signal = _rician(amplitude, 1.0, rng)
    bound = r2star_crlb(s0_true, WM_R2STAR, MC_ECHO_TIMES, 1.0)
    _, r2_wls = fit_r2star_loglinear(signal, MC_ECHO_TIMES)
    assert r2_wls.std() == pytest.approx(bound, rel=0.10)
    assert abs(r2_wls.mean() / WM_R2STAR - 1) < 0.01


def test_estatics_ols_is_inefficient_with_unequal_contrasts():
    """Unweighted log fits weight a low-SNR contrast like a high-SNR one: SD well above the CRLB."""
    rng = np.random.default_rng(6)
    s0_true = np.array([100.0, 20.0])
    amplitude = np.broadcast_to(_decay(s0_true, 40.0, MC_ECHO_TIMES), (N_VOXELS, 2, 8))
    signals = _rician(amplitude, 1.0, rng)
    bound = estatics_crlb(s0_true, 40.0, MC_ECHO_TIMES, 1.0)
    _, r2_ols = fit_estatics(signals, MC_ECHO_TIMES, method="ols")
    _, r2_wls = fit_estatics(signals, MC_ECHO_TIMES, method="wls")
    assert r2_ols.std() > 1.3 * bound
    assert r2_wls.std() == pytest.approx(bound, rel=0.10)


@pytest.mark.parametrize("n_coils", [1, 4])
def test_noise_floor_model_removes_low_bias(n_coils):
    """High R2*, long echoes, first-echo SNR 8: late echoes sit on the noise floor.

    Plain fits (log-linear and Gaussian NLS) underestimate R2* by > 3 % (n_coils=1: about 9 %;
    n_coils=4: about 37 %); the floor-aware NLS is unbiased to within 1.5 % (median) and 3.5 %
    (mean; the remaining mean bias is the skew of a non-linear estimator at this SNR).
    """
    rng = np.random.default_rng(40 + n_coils)
    echo_times = np.linspace(2e-3, 40e-3, 12)
    r2_true, sigma = 50.0, 1.0
    first_echo_snr = 8.0
    amplitude = first_echo_snr * np.exp(-r2_true * (echo_times - echo_times[0]))
    amplitude = np.broadcast_to(amplitude, (N_VOXELS, 12))
    signal = _rician(amplitude, sigma, rng, n_coils=n_coils)
    _, r2_plain_nls = fit_r2star_nonlinear(signal, echo_times)
    _, r2_ols = fit_r2star_loglinear(signal, echo_times, weighted=False)
    _, r2_floor = fit_r2star_nonlinear(signal, echo_times, sigma=sigma, n_coils=n_coils)
    assert r2_plain_nls.mean() / r2_true - 1 < -0.03
    assert r2_ols.mean() / r2_true - 1 < -0.03
    assert abs(np.median(r2_floor) / r2_true - 1) < 0.015
    assert abs(r2_floor.mean() / r2_true - 1) < 0.035


def test_noise_only_voxels_stay_finite_without_overflow():
    """Air: pure Rician noise. The floor-aware NLS has no minimum there for many voxels (their fit
    runs off towards infinite R2*); it must stop at the decay limit, warn about nothing, and give
    NaN or values a float32 map can hold, while fast-decaying tissue is still recovered exactly."""
    rng = np.random.default_rng(5)
    echo_times = np.array([0.003, 0.006, 0.009, 0.012])
    noise = _rician(np.zeros((20_000, 4)), 2.0, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow anywhere in the iterations
        s0, r2star = fit_r2star_nonlinear(noise, echo_times, sigma=2.0)
        plain_s0, plain_r2star = fit_r2star_nonlinear(noise, echo_times)
    for intercept, rate in ((s0, r2star), (plain_s0, plain_r2star)):
        finite = np.isfinite(rate)
        assert finite.mean() > 0.9  # most noise voxels have a minimum; only runaways are dropped
        assert np.all(rate[finite] * echo_times[0] <= MAX_DECAY_BEFORE_FIRST_ECHO)
        assert np.all(np.isnan(intercept[~finite]))
        assert np.nanmax(np.abs(intercept)) < np.finfo(np.float32).max
    # Before this limit, the runaways ended at R2* ~ 3e8 1/s and S0 ~ 3e6 (here: NaN).
    assert np.isnan(r2star).any()
    # Haemorrhage-like decay (R2* up to 1500 1/s, R2* TE1 = 4.5) is not mistaken for a runaway.
    fast = np.array([300.0, 800.0, 1500.0])
    signal = magnitude_mean(_decay(np.full(3, 1000.0), fast, echo_times), 2.0)
    s0_fast, r2_fast = fit_r2star_nonlinear(signal, echo_times, sigma=2.0)
    np.testing.assert_allclose(r2_fast, fast, rtol=1e-5)
    np.testing.assert_allclose(s0_fast, 1000.0, rtol=1e-5)


def test_sigma_map_matches_scalar_sigma():
    rng = np.random.default_rng(9)
    amplitude = np.broadcast_to(_decay(40.0, 60.0, ECHO_TIMES), (200, 8))
    signal = _rician(amplitude, 1.0, rng).reshape(10, 20, 8)
    _, r2_scalar = fit_r2star_nonlinear(signal, ECHO_TIMES, sigma=1.0)
    _, r2_map = fit_r2star_nonlinear(signal, ECHO_TIMES, sigma=np.ones((10, 20)))
    np.testing.assert_allclose(r2_map, r2_scalar, rtol=1e-12)


@pytest.mark.parametrize("method", ["wls", "nls"])
def test_threaded_chunks_match_serial(method):
    rng = np.random.default_rng(11)
    amplitude = _decay(rng.uniform(50, 500, (300, 2)), rng.uniform(5, 80, (300, 1)), ECHO_TIMES)
    signals = _rician(amplitude, 1.0, rng)
    mask = rng.random(300) > 0.2
    serial = fit_estatics(signals, ECHO_TIMES, method=method, mask=mask, chunk_size=37)
    threaded = fit_estatics(signals, ECHO_TIMES, method=method, mask=mask, chunk_size=37, n_jobs=2)
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Standard error of R2*, missing samples per voxel, significance of R2* for T2*
# ---------------------------------------------------------------------------------------------
def _two_contrast_mc(rng, snr, n_voxels=N_VOXELS):
    s0_true = np.array([snr, 0.6 * snr]) * np.exp(WM_R2STAR * MC_ECHO_TIMES[0])
    amplitude = np.broadcast_to(_decay(s0_true, WM_R2STAR, MC_ECHO_TIMES), (n_voxels, 2, 8))
    return s0_true, _rician(amplitude, 1.0, rng)


@pytest.mark.parametrize("method", ["wls", "nls"])
def test_standard_error_matches_monte_carlo_sd(method):
    """Residual-based standard error (no noise level given) vs the spread of 2e4 noisy fits."""
    rng = np.random.default_rng(21 + (method == "nls"))
    s0_true, signals = _two_contrast_mc(rng, snr=50.0)
    _, r2star, stderr = fit_estatics(signals, MC_ECHO_TIMES, method=method, return_stderr=True)
    assert np.isfinite(stderr).all() and (stderr > 0).all()
    typical = np.sqrt(np.mean(stderr**2))
    assert typical == pytest.approx(r2star.std(), rel=0.10)
    assert typical == pytest.approx(estatics_crlb(s0_true, WM_R2STAR, MC_ECHO_TIMES, 1.0), rel=0.10)
    # Voxel by voxel it is an estimate from 13 residual degrees of freedom: about 20 % spread.
    assert 0.1 < stderr.std() / stderr.mean() < 0.3


@pytest.mark.parametrize("method", ["wls", "nls"])
def test_missing_samples_per_voxel(method):
    """NaN/Inf in any echo of any voxel: left out of that voxel's fit and standard error."""
    rng = np.random.default_rng(31 + (method == "nls"))
    s0_true, signals = _two_contrast_mc(rng, snr=80.0)
    signals = signals.copy()
    half = N_VOXELS // 2
    signals[half:, 1, 4:] = np.nan  # second half: late echoes of the second contrast lost
    signals[half:, 0, 2] = np.inf
    _, r2star, stderr = fit_estatics(signals, MC_ECHO_TIMES, method=method, return_stderr=True)
    incomplete_te = np.array([MC_ECHO_TIMES, MC_ECHO_TIMES])
    incomplete_te[1, 4:] = np.nan
    incomplete_te[0, 2] = np.nan
    for group, te in ((slice(None, half), MC_ECHO_TIMES), (slice(half, None), incomplete_te)):
        bound = estatics_crlb(s0_true, WM_R2STAR, te, 1.0)
        assert abs(r2star[group].mean() / WM_R2STAR - 1) < 0.01
        assert r2star[group].std() == pytest.approx(bound, rel=0.10)
        assert np.sqrt(np.mean(stderr[group] ** 2)) == pytest.approx(bound, rel=0.10)

    # Noiseless: exact wherever two echo times of one contrast remain; NaN otherwise, including
    # one echo in each contrast (each intercept absorbs its echo: nothing is left for R2*).
    exact = _decay(np.array([[300.0, 200.0]] * 5), np.full((5, 1), 25.0), MC_ECHO_TIMES)
    exact[0, 0, ::2] = np.nan
    exact[1, 1, :] = np.nan
    exact[1, 0, 1:7] = np.inf
    exact[2, :, 1:] = np.nan
    exact[3, 0, 1:] = np.nan
    exact[3, 1, :7] = -np.inf
    exact[4] = np.nan
    s0, r2star, stderr = fit_estatics(exact, MC_ECHO_TIMES, method=method, return_stderr=True)
    np.testing.assert_allclose(r2star[:2], 25.0, rtol=1e-6)
    np.testing.assert_allclose(s0[0], [300.0, 200.0], rtol=1e-6)
    np.testing.assert_allclose(s0[1, 0], 300.0, rtol=1e-6)
    assert np.isnan(s0[1, 1])  # no sample of the second contrast
    assert np.isnan(r2star[2:]).all() and np.isnan(s0[2:]).all() and np.isnan(stderr[2:]).all()


@pytest.mark.parametrize("n_echo", [2, 4])
def test_few_residuals_use_the_given_noise_level(n_echo):
    """One contrast of two (no residual) or four echoes (two residual degrees of freedom)."""
    rng = np.random.default_rng(41 + n_echo)
    echo_times = np.linspace(4.9e-3, 9.8e-3, n_echo)
    s0_true, sigma = 100.0, 1.0
    amplitude = np.broadcast_to(s0_true * np.exp(-WM_R2STAR * echo_times), (N_VOXELS, 1, n_echo))
    signals = _rician(amplitude, sigma, rng)
    s0, r2star, stderr = fit_estatics(signals, echo_times, sigma=sigma, return_stderr=True)
    assert np.sqrt(np.mean(stderr**2)) == pytest.approx(r2star.std(), rel=0.10)
    # Exactly the bound at the fitted values with the given noise SD, voxel by voxel.
    np.testing.assert_allclose(stderr, estatics_crlb(s0, r2star, echo_times, sigma), rtol=1e-9)
    _, _, unknown = fit_estatics(signals, echo_times, return_stderr=True)
    assert np.isnan(unknown).all() if n_echo == 2 else np.isfinite(unknown).all()


@pytest.mark.parametrize("first_echo", [(100.0,), (100.0, 60.0)], ids=["one-flip", "two-flips"])
def test_significance_rule_removes_absurd_t2star_with_two_echoes(first_echo):
    """Two echoes 4.9 ms apart, first-echo SNR 100: tissue (R2* 20 1/s) and fluid (R2* 0.5 1/s).

    1/R2* of the fluid voxels reaches hundreds of seconds or more (and R2* is often negative); the
    significance rule leaves them NaN and keeps the tissue. Two flip angles leave one residual: its
    noise estimate alone would let through zero rates with a tiny standard error.
    """
    rng = np.random.default_rng(42 + len(first_echo))
    echo_times = np.array([4.9e-3, 9.8e-3])
    true_r2star = np.repeat([WM_R2STAR, 0.5], N_VOXELS // 2)
    amplitude = _decay(np.array(first_echo) * np.exp(4.9e-3 * true_r2star[:, None]), true_r2star[:, None], echo_times)
    signals = _rician(amplitude, 1.0, rng)
    _, r2star, stderr = fit_estatics(signals, echo_times, sigma=1.0, return_stderr=True)
    with np.errstate(divide="ignore"):
        naive = np.where(r2star > 0, 1.0 / r2star, np.nan)
    assert np.nanmax(naive) > 100.0 and (r2star < 0).sum() > N_VOXELS // 8
    t2star = t2star_where_significant(r2star, stderr)
    assert np.nanmax(t2star) < 0.5
    tissue, fluid = slice(None, N_VOXELS // 2), slice(N_VOXELS // 2, None)
    assert np.isfinite(t2star[tissue]).mean() > 0.99
    assert np.nanmedian(t2star[tissue]) == pytest.approx(1 / WM_R2STAR, rel=0.05)
    assert np.isfinite(t2star[fluid]).mean() < 0.05  # about the one-sided 2.3 % (+ R2* > 0)
    # The rule itself: strictly positive and above min_significance standard errors; NaN unknown.
    rule = t2star_where_significant(
        np.array([10.0, 10.0, -10.0, 10.0, np.nan, 0.0]), np.array([4.9, 5.0, 1.0, np.nan, 1.0, 0.0])
    )
    np.testing.assert_array_equal(np.isnan(rule), [False, True, True, True, True, True])
    assert rule[0] == pytest.approx(0.1)


def test_negative_echo_times_raise():
    with pytest.raises(ValueError, match="non-negative"):
        fit_r2star_loglinear(np.ones((4, 8)), ECHO_TIMES - 5e-3)


@pytest.mark.parametrize("method", ["wls", "nls"])
def test_contrast_without_samples_changes_neither_fit_nor_standard_error(method):
    """A contrast whose samples are all missing holds no intercept: the fit and its residual degrees
    of freedom are those of the other contrast alone."""
    rng = np.random.default_rng(51)
    amplitude = np.broadcast_to(_decay(np.array([100.0, 60.0]), 20.0, MC_ECHO_TIMES), (50, 2, 8))
    signals = _rician(amplitude, 1.0, rng)
    signals[:, 1, :] = np.nan
    _, r2star, stderr = fit_estatics(signals, MC_ECHO_TIMES, method=method, return_stderr=True)
    _, alone, alone_stderr = fit_estatics(signals[:, :1], MC_ECHO_TIMES, method=method, return_stderr=True)
    np.testing.assert_allclose(r2star, alone, rtol=1e-10)
    np.testing.assert_allclose(stderr, alone_stderr, rtol=1e-10)


def test_exactly_min_residual_dof_uses_the_voxels_own_residuals():
    """Six echoes of one contrast leave MIN_RESIDUAL_DOF = 4 residual degrees of freedom: enough to
    use the residuals, so a (deliberately wrong, 10x) noise SD given for the air is not used."""
    rng = np.random.default_rng(52)
    echo_times = MC_ECHO_TIMES[:6]
    amplitude = np.broadcast_to(100.0 * np.exp(-WM_R2STAR * echo_times), (N_VOXELS, 1, 6))
    signals = _rician(amplitude, 1.0, rng)
    _, r2star, stderr = fit_estatics(signals, echo_times, sigma=10.0, return_stderr=True)
    assert np.sqrt(np.mean(stderr**2)) == pytest.approx(r2star.std(), rel=0.10)
