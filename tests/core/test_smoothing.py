"""core.smoothing: normalised convolution smooths a field by its confidences and fills its holes."""

import numpy as np

from qmri_workflows.core.smoothing import normalised_convolution


def test_a_smooth_field_with_holes_is_kept_and_filled():
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in (24, 20, 16)], indexing="ij")
    field = 1.0 + 0.2 * grid[0] - 0.1 * grid[1] + 0.05 * grid[2]  # linear: a symmetric kernel keeps it
    weights = np.ones(field.shape)
    weights[8:12, 8:12, 6:10] = 0.0  # a hole
    values = np.where(weights > 0, field, np.nan)
    smoothed = normalised_convolution(values, weights, (2.0, 2.0, 2.0), fwhm_mm=4.0)
    assert np.all(np.isfinite(smoothed))
    # away from the edges (mode="nearest" bends a slope there) and the hole: the linear field as it was
    away = np.zeros(field.shape, dtype=bool)
    away[4:-4, 4:-4, 4:-4] = True
    away[4:16, 4:16, 2:14] = False
    np.testing.assert_allclose(smoothed[away], field[away], atol=1e-6)
    # in the hole and around it, the lopsided weights shift the mean by a fraction of a voxel's slope
    np.testing.assert_allclose(smoothed[8:12, 8:12, 6:10], field[8:12, 8:12, 6:10], atol=0.03)


def test_without_smoothing_valid_values_stay_and_the_far_voxels_take_the_nearest():
    values = np.array([[1.0, np.nan, np.nan, 4.0, np.inf]])
    weights = np.array([[1.0, 0.0, 1.0, 2.0, 1.0]])  # the NaN at index 2 is missing despite its weight
    filled = normalised_convolution(values, weights, (1.0, 1.0), fwhm_mm=0.0)
    assert filled[0, 0] == 1.0 and filled[0, 3] == 4.0
    assert filled[0, 4] == 4.0
    assert filled[0, 1] in (1.0, 4.0) and filled[0, 2] in (1.0, 4.0)


def test_weights_decide_between_disagreeing_neighbours():
    values = np.array([0.0, 1.0])
    smoothed = normalised_convolution(values, np.array([1.0, 3.0]), (1.0,), fwhm_mm=100.0)
    # the weighted mean, 0.75, but for the kernel's truncation
    np.testing.assert_allclose(smoothed, 0.75, rtol=0.01)
