"""AFI B1+ ratio maps against ground truth: noiseless, noisy (delta-method CRLB), low-signal holes."""

import math

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.b1 import afi_b1_standard_error, afi_flip_angle_ratio, afi_raw_ratio
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
