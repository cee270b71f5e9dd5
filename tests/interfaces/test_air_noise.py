"""measure_air_noise: the noise SD in the air, or the reason there is none to measure."""

import numpy as np
import pytest

from qmri_workflows.interfaces._noise import MIN_AIR_VOXELS, measure_air_noise

SHAPE = (40, 40, 32)
VOXEL_SIZE = (3.0, 3.0, 3.0)


def _head(radius=0.7):
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return sum((g / radius) ** 2 for g in grid) < 1


def _rss_image(head, sigma, n_coils, seed=0):
    """Root-sum-of-squares magnitude of ``n_coils`` channels with complex Gaussian noise of SD ``sigma``."""
    rng = np.random.default_rng(seed)
    amplitude = np.where(head, 100.0, 0.0) / np.sqrt(n_coils)
    channels = amplitude + sigma * (
        rng.standard_normal((n_coils, *SHAPE)) + 1j * rng.standard_normal((n_coils, *SHAPE))
    )
    return np.sqrt(np.sum(np.abs(channels) ** 2, axis=0))


@pytest.mark.parametrize("n_coils", [1, 4])
def test_noise_of_a_noisy_background_is_measured_with_its_air(n_coils):
    head = _head()
    noise = measure_air_noise(_rss_image(head, 3.0, n_coils), voxel_size=VOXEL_SIZE, n_coils=n_coils)
    assert noise.sigma == pytest.approx(3.0, rel=0.05)
    assert noise.problem == ""
    assert noise.air.dtype == bool and noise.air.sum() >= MIN_AIR_VOXELS
    assert not (noise.air & head).any()


def test_air_of_another_image_is_reused():
    """A darker image of the same grid is measured in the air found in a brighter one."""
    head = _head()
    bright = _rss_image(head, 2.0, 1, seed=1)
    dark = np.where(head, 5.0, _rss_image(head, 2.0, 1, seed=2))
    found = measure_air_noise(bright, voxel_size=VOXEL_SIZE)
    reused = measure_air_noise(dark, voxel_size=VOXEL_SIZE, air=found.air)
    assert reused.sigma == pytest.approx(2.0, rel=0.05)
    np.testing.assert_array_equal(reused.air, found.air)


def test_noiseless_background_gives_the_reason_and_no_remedy():
    """A noiseless simulation's background is exact zeros: no air is left to measure."""
    noise = measure_air_noise(np.where(_head(), 100.0, 0.0), voxel_size=VOXEL_SIZE)
    assert noise.sigma is None and noise.air is None
    assert noise.problem.startswith("only 0 air voxels")
    assert "zero-filled" in noise.problem and "noiseless simulation" in noise.problem
    assert "noise_sigma" not in noise.problem  # the remedy is the caller's


def test_air_without_noise_keeps_its_voxels_and_says_so():
    head = _head()
    air = measure_air_noise(_rss_image(head, 3.0, 1), voxel_size=VOXEL_SIZE).air
    noise = measure_air_noise(np.where(head, 100.0, 0.0), voxel_size=VOXEL_SIZE, air=air)
    assert noise.sigma is None
    np.testing.assert_array_equal(noise.air, air)
    assert noise.problem.startswith("the air holds no noise")


def test_too_little_air_in_a_tight_field_of_view():
    head = _head(radius=1.6)  # the head fills the field of view
    noise = measure_air_noise(_rss_image(head, 3.0, 1), voxel_size=VOXEL_SIZE)
    assert noise.sigma is None and noise.air is None
    assert "air voxels to estimate the noise level from" in noise.problem
    assert "too little air around the head" in noise.problem


def test_non_finite_air_voxels_do_not_count():
    head = _head()
    image = _rss_image(head, 3.0, 1)
    image[~head] = np.nan
    noise = measure_air_noise(image, voxel_size=VOXEL_SIZE)
    assert noise.sigma is None and noise.problem.startswith("only 0 air voxels")


@pytest.mark.parametrize("jitter", [0.0, 0.02])
def test_background_filled_with_a_constant_is_not_noise(jitter):
    """Some converters fill the background with one value (or nearly): its second moment would pass
    for noise of SD value / sqrt(2 N), and every noise-floor correction would then remove a floor
    that is not there."""
    head = _head()
    rng = np.random.default_rng(3)
    image = np.where(head, 100.0, 5.0 * (1 + jitter * rng.standard_normal(SHAPE)))
    noise = measure_air_noise(image, voxel_size=VOXEL_SIZE, n_coils=4)
    assert noise.sigma is None and noise.air is not None
    assert "filled with a constant" in noise.problem and "25 %" in noise.problem, noise.problem
