"""B1+ ratio maps (AFI, double-angle) against ground truth: noiseless, noisy (delta-method CRLB),
low-signal holes, the noise floor of many channels, and (double angle) a Bloch-simulated train."""

import math

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.b1 import (
    afi_b1_standard_error,
    afi_flip_angle_ratio,
    afi_raw_ratio,
    dam_flip_angle_ratio,
    dam_raw_ratio,
    dam_t1_bias,
)
from qmri_workflows.core.signal import afi_signals

FLIP = math.radians(60.0)
TR1, TR2 = 0.020, 0.100


def _smooth_b1(shape):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    return 1.0 + 0.2 * grid[0] - 0.1 * grid[1] ** 2 + 0.05 * grid[2]


def test_noiseless_ratio_within_one_percent():
    t1 = np.array([0.85, 1.4, 4.0])[:, None]
    b1 = np.linspace(0.6, 1.4, 9)[None, :]
    s1, s2 = afi_signals(1000.0, 1 / t1, 0.0, FLIP, TR1, TR2, 0.0025, b1=b1)
    estimate = afi_raw_ratio(s1, s2, TR1, TR2, FLIP)
    assert np.max(np.abs(estimate / b1 - 1)) < 0.01


def test_smoothed_map_on_a_volume_with_holes_and_background():
    shape = (24, 26, 20)
    b1 = _smooth_b1(shape)
    head = np.zeros(shape, bool)
    head[3:-3, 3:-3, 2:-2] = True
    m0 = np.where(head, 1000.0, 0.0)
    m0[10:13, 10:13, 8:11] = 5.0  # a low-signal pocket (sinus, bone): a hole to fill
    s1, s2 = afi_signals(m0, 1 / 1.2, 0.0, FLIP, TR1, TR2, 0.0025, b1=b1)
    rng = np.random.default_rng(4)
    sigma = 2.0
    s1, s2 = np.abs(s1 + rng.normal(0, sigma, shape)), np.abs(s2 + rng.normal(0, sigma, shape))
    result = afi_flip_angle_ratio(s1, s2, TR1, TR2, FLIP, voxel_size=(2.0, 2.0, 2.0), smoothing_fwhm=6.0)
    assert np.all(np.isfinite(result.b1))
    assert not result.valid[11, 11, 9] and result.valid[6, 6, 6]
    interior = np.zeros(shape, bool)
    interior[6:-6, 6:-6, 5:-5] = True
    error = np.abs(result.b1 / b1 - 1)[interior]
    print(f"\nAFI smoothed map: median error {100 * np.median(error):.2f} %, max {100 * error.max():.2f} %")
    assert np.median(error) < 0.005 and error.max() < 0.02
    assert np.abs(result.b1[11, 11, 9] / b1[11, 11, 9] - 1) < 0.01  # the hole is filled sensibly


def test_noisy_raw_ratio_matches_its_cramer_rao_bound():
    n = 40000
    b1 = 1.1
    s1, s2 = afi_signals(1000.0, 1 / 1.2, 0.0, FLIP, TR1, TR2, 0.0025, b1=b1)
    sigma = float(s1) / 50.0
    rng = np.random.default_rng(5)
    noisy = afi_raw_ratio(s1 + rng.normal(0, sigma, n), s2 + rng.normal(0, sigma, n), TR1, TR2, FLIP)
    bound = afi_b1_standard_error(s1, s2, TR1, TR2, FLIP, sigma)
    bias = np.nanmean(noisy) / b1 - 1
    sd_ratio = np.nanstd(noisy) / bound
    print(f"\nAFI SNR 50: bias {100 * bias:+.2f} %, SD/CRLB {sd_ratio:.3f}")
    assert abs(bias) < 0.01
    # the SE of an SD from 4e4 draws is 0.35 %: the delta method holds to 1 % at SNR 50 (1.15 without
    # the S2^2 / S1^4 term of var(r))
    assert 0.95 < sd_ratio < 1.05


def test_bad_inputs_get_clear_messages():
    with pytest.raises(ValueError, match="TR2 > TR1"):
        afi_raw_ratio(1.0, 0.5, 0.05, 0.05, FLIP)
    with pytest.raises(ValueError, match="swapped"):
        afi_flip_angle_ratio(np.full((4, 4, 4), 1.0), np.full((4, 4, 4), 2.0), TR1, TR2, FLIP)


def test_weak_voxels_count_by_their_inverse_variance_in_the_smoothed_map():
    """Every other slice at 6 % of the signal: valid, but its ratio is ~30 % noise. Weighted by S1^2
    (inverse variance of the ratio) they hardly move the map; counted equally they would."""
    shape = (24, 24, 24)
    m0 = np.full(shape, 1000.0)
    m0[::2] = 60.0
    s1, s2 = afi_signals(m0, 1 / 1.2, 0.0, FLIP, TR1, TR2, 0.0025, b1=1.0)
    truth = afi_raw_ratio(s1, s2, TR1, TR2, FLIP)  # the noiseless reading (0.1 % below 1 at T1 1.2 s)
    rng = np.random.default_rng(6)
    s1, s2 = np.abs(s1 + rng.normal(0, 5.0, shape)), np.abs(s2 + rng.normal(0, 5.0, shape))
    result = afi_flip_angle_ratio(s1, s2, TR1, TR2, FLIP, voxel_size=(2.0, 2.0, 2.0), smoothing_fwhm=6.0)
    assert result.valid[::2].mean() > 0.4  # the weak voxels are used
    assert np.median(np.abs(result.b1 / truth - 1)[4:-4, 4:-4, 4:-4]) < 0.02


def test_mask_and_equal_signals_exclude_voxels():
    s1, s2 = afi_signals(np.full((6, 6, 6), 1000.0), 1 / 1.2, 0.0, FLIP, TR1, TR2, 0.0025, b1=1.0)
    s2 = np.array(s2)
    s2[0, 0, 0] = s1[0, 0, 0]  # r = 1 reads a zero flip angle: not a measurement
    mask = np.ones((6, 6, 6), bool)
    mask[3:] = False
    result = afi_flip_angle_ratio(s1, s2, TR1, TR2, FLIP, mask=mask)
    assert not result.valid[3:].any() and not result.valid[0, 0, 0]
    assert result.valid[:3].sum() == 6 * 6 * 3 - 1


def _root_sum_of_squares(signal, sigma, n_channels, rng):
    """Magnitude of ``n_channels`` receive channels (fixed complex sensitivities, unit RSS) with
    complex Gaussian noise of SD ``sigma`` each, combined by root-sum-of-squares."""
    sensitivity = rng.uniform(0.5, 1.0, n_channels) * np.exp(1j * rng.uniform(0, 2 * np.pi, n_channels))
    sensitivity /= np.linalg.norm(sensitivity)
    noise = rng.normal(0.0, sigma, signal.shape + (n_channels, 2)) @ np.array([1.0, 1.0j])
    return np.sqrt(np.sum(np.abs(signal[..., None] * sensitivity + noise) ** 2, axis=-1))


def test_noise_floor_of_many_channels_is_removed_before_the_ratio():
    """The floor of root-sum-of-squares data raises the darker TR2 image more: r reads high and B1+
    low (-3.0 % here: 8 channels, S1 at 20 sigma, S2 at 13). With the noise SD given, what is left
    (-0.4 %) is mostly the ratio's own bias at that SNR."""
    shape = (24, 26, 20)
    b1 = _smooth_b1(shape)
    head = np.zeros(shape, bool)
    head[3:-3, 3:-3, 2:-2] = True
    s1, s2 = afi_signals(np.where(head, 1000.0, 0.0), 1 / 1.2, 0.0, FLIP, TR1, TR2, 0.0025, b1=b1)
    sigma, n_channels = float(np.median(s1[head])) / 20.0, 8
    rng = np.random.default_rng(6)
    m1, m2 = (_root_sum_of_squares(signal, sigma, n_channels, rng) for signal in (s1, s2))
    interior = np.zeros(shape, bool)
    interior[6:-6, 6:-6, 5:-5] = True
    bias = {}
    for name, noise in (("raw", {}), ("corrected", {"noise_sigma": sigma, "n_coils": n_channels})):
        result = afi_flip_angle_ratio(m1, m2, TR1, TR2, FLIP, voxel_size=(2.0,) * 3, smoothing_fwhm=6.0, **noise)
        bias[name] = float(np.median((result.b1 / b1 - 1)[interior]))
    print(f"\nAFI, 8 channels: median B1+ error {bias['raw']:+.2%} raw, {bias['corrected']:+.2%} without the floor")
    assert bias["raw"] < -0.02
    assert abs(bias["corrected"]) < 0.01


# --------------------------------------------------------------------------------------------------
# double-angle method
# --------------------------------------------------------------------------------------------------
def _ernst(m0, t1, alpha, tr):
    e1 = np.exp(-tr / t1)
    return m0 * np.sin(alpha) * (1 - e1) / (1 - e1 * np.cos(alpha))


@pytest.mark.parametrize("angles", [(60.0, 120.0), (45.0, 90.0), (50.0, 130.0), (30.0, 150.0)])
def test_double_angle_reading_inverts_its_models_exactly(angles):
    a1, a2 = np.deg2rad(angles)
    b1 = np.linspace(0.3, 0.999 * np.pi / a2, 40)[:, None]
    # full relaxation: sin(B1 a) alone
    long_tr = dam_raw_ratio(np.sin(b1 * a1), np.sin(b1 * a2), a1, a2)
    np.testing.assert_allclose(long_tr, b1, rtol=1e-9)
    # finite TR: Ernst signals at each voxel's T1 (NaN T1: taken as relaxed, as in air)
    t1 = np.array([0.3, 0.85, 1.4, 4.0, 30.0])[None, :]
    tr = 2.0
    exact = dam_raw_ratio(_ernst(1.0, t1, b1 * a1, tr), _ernst(1.0, t1, b1 * a2, tr), a1, a2, repetition_time=tr, t1=t1)
    np.testing.assert_allclose(exact, np.broadcast_to(b1, exact.shape), rtol=1e-8)
    relaxed = dam_raw_ratio(np.sin(b1 * a1), np.sin(b1 * a2), a1, a2, repetition_time=tr, t1=np.nan)
    np.testing.assert_allclose(relaxed, b1, rtol=1e-8)


def test_double_angle_t1_bias_is_what_the_long_tr_reading_makes_of_ernst_signals():
    a1, a2 = math.radians(60.0), math.radians(120.0)
    b1 = np.array([0.7, 1.0, 1.25])[:, None]
    t1 = np.array([0.85, 1.3, 4.0])[None, :]
    tr = 2.0
    read = dam_raw_ratio(_ernst(1.0, t1, b1 * a1, tr), _ernst(1.0, t1, b1 * a2, tr), a1, a2)
    np.testing.assert_allclose(read / b1, dam_t1_bias(b1, t1, tr, a1, a2), rtol=1e-8)
    # the bias differs by tissue (white matter, grey matter, CSF at B1 = 1): why it must go per voxel
    np.testing.assert_allclose(dam_t1_bias(1.0, t1, tr, a1, a2).ravel(), [1.049, 1.104, 1.242], atol=2e-3)
    assert dam_t1_bias(1.0, 0.05, tr, a1, a2) == pytest.approx(1.0, abs=1e-9)


def test_double_angle_reading_of_bloch_simulated_spoiled_echoes():
    """Independent forward model: brute-force isochromats of an RF- and gradient-spoiled train (TR
    2 s, 50 deg quadratic increment, T2 80 ms) at 60 and 120 deg: read at the right T1 the ratio
    gives the flip angle within 0.2 % (0.00 % measured); the long-TR model reads it 2.5-42 % high."""
    from tests.isochromats import simulate

    t1 = np.array([0.85, 1.3, 4.0])
    b1 = np.array([0.8, 1.0, 1.2])
    t1_grid, b1_grid = (a.ravel() for a in np.meshgrid(t1, b1, indexing="ij"))
    a1, a2 = math.radians(60.0), math.radians(120.0)
    signals = [
        simulate(t1_grid, 0.08, b1_grid * angle, [(2.0, 4.0)], math.radians(50.0), n_pulses=80)[:, 0]
        for angle in (a1, a2)
    ]
    exact = dam_raw_ratio(*signals, a1, a2, repetition_time=2.0, t1=t1_grid)
    long_tr = dam_raw_ratio(*signals, a1, a2)
    print(f"\nDAM on isochromats: max error {np.max(np.abs(exact / b1_grid - 1)):.2%} at the right T1, "
          f"{np.min(long_tr / b1_grid - 1):+.1%} to {np.max(long_tr / b1_grid - 1):+.1%} long-TR")  # fmt: skip
    np.testing.assert_allclose(exact, b1_grid, rtol=2e-3)
    assert np.min(long_tr / b1_grid - 1) > 0.02


def test_double_angle_map_removes_the_noise_floor_and_fills_holes():
    """At 60/120 deg the two signals are equal at the nominal field and their floors cancel; where
    B1+ is high (1.3 here, as at 7 T) the 120 deg image is dark, and the floor of 8 channels reads
    B1+ low (-1.7 %; +0.1 % with the noise SD given)."""
    shape = (24, 26, 20)
    b1 = _smooth_b1(shape) + 0.3
    head = np.zeros(shape, bool)
    head[3:-3, 3:-3, 2:-2] = True
    m0 = np.where(head, 1000.0, 0.0)
    m0[10:13, 10:13, 8:11] = 5.0  # a low-signal pocket: a hole to fill
    a1, a2 = math.radians(60.0), math.radians(120.0)
    s1, s2 = (np.where(head, _ernst(m0, 1.0, b1 * angle, 6.0), 0.0) for angle in (a1, a2))
    sigma, n_channels = float(np.median(s2[head])) / 8.0, 8
    rng = np.random.default_rng(7)
    m1, m2 = (_root_sum_of_squares(signal, sigma, n_channels, rng) for signal in (s1, s2))
    interior = np.zeros(shape, bool)
    interior[6:-6, 6:-6, 5:-5] = True
    interior[9:14, 9:14, 7:12] = False
    bias = {}
    for name, noise in (("raw", {}), ("corrected", {"noise_sigma": sigma, "n_coils": n_channels})):
        result = dam_flip_angle_ratio(
            m1, m2, a1, a2, voxel_size=(2.0,) * 3, smoothing_fwhm=6.0, repetition_time=6.0, t1=1.0, **noise
        )
        assert np.all(np.isfinite(result.b1))
        bias[name] = float(np.median((result.b1 / b1 - 1)[interior]))
    print(f"\nDAM, 8 channels: median B1+ error {bias['raw']:+.2%} raw, {bias['corrected']:+.2%} without the floor")
    assert bias["raw"] < -0.01  # the floor lifts the darker 120 deg image more: the ratio reads high
    assert abs(bias["corrected"]) < 0.005


def test_double_angle_bad_inputs_get_clear_messages():
    with pytest.raises(ValueError, match="flip-1 and flip-2"):
        dam_raw_ratio(1.0, 1.0, math.radians(120.0), math.radians(60.0))
    with pytest.raises(ValueError, match="usable signal ratio"):
        dam_flip_angle_ratio(np.ones((4, 4, 4)), np.full((4, 4, 4), 3.0), math.radians(60.0), math.radians(120.0))
