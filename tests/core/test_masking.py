"""Tests of the brain mask on a synthetic head: bias, lesions, scalp, Rician noise, 1 and 4 mm."""

import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.core.masking import brain_mask, fit_smooth_bias, otsu_threshold

# Relative intensities of an RSS of PD- and T1-weighted first echoes.
WM, GM, CSF, SKULL, SCALP = 1.0, 0.85, 0.6, 0.02, 1.2
DARK_LESION, BRIGHT_LESION = 0.35, 1.4


def synthetic_head(voxel_mm, *, sigma=0.03, bias_amplitude=0.3, seed=0):
    """Ellipsoidal head: (image, brain, scalp, lesions) at ``voxel_mm`` isotropic.

    Built at 1 mm and block-averaged (realistic partial volume at 4 mm). Brain: CSF rim, cortex,
    white matter, two ventricles and five lesions (dark and bright, one juxtacortical); then a 6 mm
    dark skull and a 6 mm bright scalp; a smooth non-polynomial multiplicative bias of
    1 +- ``bias_amplitude`` over the head; Rician noise from complex Gaussian noise ``sigma``.
    """
    semi = np.array([68.0, 82.0, 58.0])
    skull_mm, scalp_mm, margin_mm = 6.0, 6.0, 12.0
    factor = int(round(voxel_mm))
    half = np.ceil((semi + skull_mm + scalp_mm + margin_mm) / factor).astype(int) * factor
    x, y, z = np.meshgrid(*[np.arange(-h, h) + 0.5 for h in half], indexing="ij", sparse=True)

    def ellipsoid(offset_mm, centre=(0.0, 0.0, 0.0), semi_axes=semi):
        a, b, c = np.asarray(semi_axes) + offset_mm
        u, v, w = (x - centre[0]) / a, (y - centre[1]) / b, (z - centre[2]) / c
        return u**2 + v**2 + w**2 <= 1

    brain = ellipsoid(0.0)
    head = ellipsoid(skull_mm + scalp_mm)
    scalp = head & ~ellipsoid(skull_mm)
    truth = np.zeros(brain.shape)
    truth[scalp] = SCALP
    truth[ellipsoid(skull_mm) & ~brain] = SKULL
    truth[brain] = CSF
    truth[ellipsoid(-2.0)] = GM
    truth[ellipsoid(-5.0)] = WM
    for side in (-1, 1):
        truth[ellipsoid(0.0, (side * 12.0, 5.0, 8.0), (6.0, 25.0, 10.0))] = CSF
    lesions = np.zeros(brain.shape, dtype=bool)
    for centre, radius, value in [
        ((25, 20, 15), 6, DARK_LESION),
        ((-30, -25, 5), 5, BRIGHT_LESION),
        ((10, -40, -10), 4, DARK_LESION),
        ((-20, 35, 25), 7, BRIGHT_LESION),
        ((60, 0, 0), 5, DARK_LESION),  # juxtacortical, touching the CSF rim
    ]:
        blob = ellipsoid(0.0, centre, (radius,) * 3)
        truth[blob] = value
        lesions |= blob
    field = np.exp(-((x - 40) ** 2 + (y + 50) ** 2 + (z - 30) ** 2) / (2 * 90.0**2))
    low, high = field[head].min(), field[head].max()
    bias = 1 - bias_amplitude + 2 * bias_amplitude * (field - low) / (high - low)
    signal = truth * bias
    if factor > 1:

        def downsample(volume):
            n = [s // factor for s in volume.shape]
            return volume.reshape(n[0], factor, n[1], factor, n[2], factor).mean(axis=(1, 3, 5))

        signal = downsample(signal)
        brain, scalp, lesions = (downsample(m.astype(float)) >= 0.5 for m in (brain, scalp, lesions))
    rng = np.random.default_rng(seed)
    noise = rng.normal(scale=sigma, size=(2,) + signal.shape)
    image = np.hypot(signal + noise[0], noise[1])
    return image.astype(np.float32), brain, scalp, lesions


def _dice(a, b):
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.mark.parametrize("voxel_mm", [1.0, 4.0])
@pytest.mark.parametrize("sigma", [0.03, 0.1])
def test_brain_mask_on_synthetic_head(voxel_mm, sigma):
    image, brain, scalp, lesions = synthetic_head(voxel_mm, sigma=sigma, seed=int(voxel_mm))
    mask = brain_mask(image, voxel_size=(voxel_mm,) * 3)
    assert mask.dtype == bool and mask.shape == image.shape
    assert _dice(mask, brain) > 0.95
    assert np.count_nonzero(mask & scalp) <= 0.001 * np.count_nonzero(scalp)
    assert np.all(mask[lesions])


def test_brain_mask_anisotropic_voxels():
    image, brain, scalp, lesions = synthetic_head(1.0, sigma=0.05, seed=3)
    # Keep every second slice along z: 1 x 1 x 2 mm voxels.
    image, brain, scalp, lesions = (v[:, :, ::2] for v in (image, brain, scalp, lesions))
    mask = brain_mask(image, voxel_size=(1.0, 1.0, 2.0))
    assert _dice(mask, brain) > 0.95
    assert not np.any(mask & scalp)
    assert np.all(mask[lesions])


@pytest.mark.parametrize("voxel_mm", [1.0, 4.0])
def test_brain_mask_does_not_depend_on_the_storage_order(voxel_mm):
    """The same head stored with its axes permuted and one reversed gives the same mask.

    At 4 mm the 2 mm closing is below half a voxel; it used to run along the first array axis only
    (the "finest" of three equal ones), which changed 0.4 % of the shipped example's mask when its
    images were stored sagittally.
    """
    image, _, _, _ = synthetic_head(voxel_mm, sigma=0.05, seed=5)
    mask = brain_mask(image, voxel_size=(voxel_mm,) * 3)
    stored = np.flip(np.transpose(image, (2, 0, 1)), 1)
    back = np.transpose(np.flip(brain_mask(stored, voxel_size=(voxel_mm,) * 3), 1), (1, 2, 0))
    assert np.array_equal(mask, back)


def test_fit_smooth_bias_recovers_polynomial_field_despite_outliers():
    rng = np.random.default_rng(0)
    shape = (30, 34, 28)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    log_field = 0.2 * x - 0.15 * y**2 + 0.1 * x * z
    image = np.exp(log_field) * (1 + 0.01 * rng.normal(size=shape))
    outliers = rng.random(shape) < 0.15  # lesion-like voxels at 40 % intensity
    image[outliers] *= 0.4
    mask = np.ones(shape, dtype=bool)
    bias = fit_smooth_bias(image, mask, voxel_size=(2.0, 2.0, 2.0))
    expected = np.exp(log_field - np.median(log_field))
    np.testing.assert_allclose(bias, expected, rtol=0.01)


def test_otsu_threshold_separates_two_modes():
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0.0, 1.0, 50_000), rng.normal(10.0, 1.0, 50_000)])
    assert 3.0 < otsu_threshold(values) < 7.0


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="3-D"):
        brain_mask(np.ones((5, 5)))
    with pytest.raises(ValueError, match="voxel_size"):
        brain_mask(np.ones((5, 5, 5)), voxel_size=(1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        brain_mask(np.zeros((5, 5, 5)))


def test_air_mask_gives_the_noise_level_of_a_phantom_head():
    from qmri_workflows.core.masking import air_mask
    from qmri_workflows.core.noise import estimate_sigma_background

    rng = np.random.default_rng(4)
    shape = (48, 48, 40)
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    head = ((grid / np.array([18, 20, 15])[:, None, None, None]) ** 2).sum(0) < 1
    sigma = 3.0
    noise = rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape)
    image = np.abs(np.where(head, 200.0, 0.0) + noise)
    air = air_mask(image, voxel_size=(2.0, 2.0, 2.0))
    assert not (air & head).any()
    assert air.sum() > 0.3 * air.size
    assert estimate_sigma_background(image[air], method="median") == pytest.approx(sigma, rel=0.03)


@pytest.mark.parametrize("stored", ["float", "integer"])
def test_air_mask_leaves_out_a_zero_filled_background(stored):
    """Exact zeros written outside the head or a reduced field of view hold no noise: counted as
    air, they made the median noise level 0 (or too low when they were under half the air)."""
    from qmri_workflows.core.masking import air_mask
    from qmri_workflows.core.noise import estimate_sigma_background

    rng = np.random.default_rng(5)
    shape = (48, 48, 40)
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    head = ((grid / np.array([18, 20, 15])[:, None, None, None]) ** 2).sum(0) < 1
    sigma = 5.0
    image = np.abs(np.where(head, 200.0, 0.0) + rng.normal(0, sigma, shape) + 1j * rng.normal(0, sigma, shape))
    if stored == "integer":
        # 0.5 % of the air rounds to 0: noise samples, to be kept (the median of integers, 6 here,
        # moves in steps of 1 / 1.18 of sigma: 5.1)
        image = np.round(image)
    kept = np.zeros(shape, dtype=bool)
    kept[:, 6:-6, 5:-5] = True  # a reduced field of view, zero-filled on four sides
    for zeroed in (np.where(kept, image, 0.0), np.where(ndimage.binary_dilation(head, iterations=6), image, 0.0)):
        air = air_mask(zeroed, voxel_size=(2.0, 2.0, 2.0))
        assert air.sum() > 1000
        assert estimate_sigma_background(zeroed[air], method="median") == pytest.approx(sigma, rel=0.03)


def test_air_mask_of_a_skull_stripped_image_is_empty():
    """With the background zero-filled up to the brain, the log-Otsu threshold splits tissue: the
    darkest tissue (here a 12 mm CSF-like shell, 0.4 of the rest) is far from the brighter one,
    but it is not air, and its level is no noise level."""
    from qmri_workflows.core.masking import air_mask

    rng = np.random.default_rng(6)
    shape = (48, 48, 40)
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    radius = np.sqrt(((grid / np.array([20, 22, 17])[:, None, None, None]) ** 2).sum(0))
    amplitude = np.where(radius < 0.6, 1.0, np.where(radius < 1, 0.4, 0.0))
    image = np.abs(amplitude + 0.03 * (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)))
    image = np.where(radius < 1, image, 0.0)
    assert not air_mask(image, voxel_size=(2.0, 2.0, 2.0)).any()


def test_speckled_head_without_skull_is_masked_whole():
    """Voxel-to-voxel texture (noise, tissue heterogeneity) must not break the opening's seed."""
    shape, voxel_size = (32, 32, 20), (1.5, 1.5, 2.0)
    grid = np.indices(shape, dtype=float)
    semi_axes = (18.0, 18.0, 14.0)
    radius = np.sqrt(sum(((grid[a] - (shape[a] - 1) / 2) * voxel_size[a] / semi_axes[a]) ** 2 for a in range(3)))
    head = radius <= 1.0
    rng = np.random.default_rng(7)
    image = np.where(head, rng.uniform(500.0, 2000.0, shape), rng.uniform(5.0, 20.0, shape))
    mask = brain_mask(image, voxel_size=voxel_size)
    assert not (mask & ~head).any()
    assert (mask & head).sum() >= 0.97 * head.sum()


def test_highest_point_is_the_highest_voxel_centre_for_any_affine():
    # The position check's height: per-column extremes must give the maximum over every voxel.
    from qmri_workflows.core.masking import _highest_point_mm

    rng = np.random.default_rng(0)
    for _ in range(50):
        region = rng.random((7, 9, 5)) < rng.uniform(0.02, 0.5)
        region[3, 4, 2] = True
        affine = np.eye(4)
        affine[:3] = rng.normal(size=(3, 4))
        heights = affine[2, :3] @ np.array(np.nonzero(region)) + affine[2, 3]
        assert np.isclose(_highest_point_mm(region, affine), heights.max())
