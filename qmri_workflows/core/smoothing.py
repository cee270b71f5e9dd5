"""Smoothing of noisy, partly missing fields by normalised convolution.

Used across the core: the B1+ and receive-sensitivity maps (``core.relaxometry``) and the filling of
missing samples before denoising (``core.denoise``).

Normalised convolution (Knutsson & Westin 1993) smooths values with a Gaussian while weighting each
by its confidence, and divides by the smoothed confidences: it both smooths and fills holes. Voxels
farther than the kernel from any valid voxel take the nearest valid value, so the field is finite
everywhere (for resampling and for extrapolation over the brain).

References
----------
.. [1] Knutsson H, Westin C-F. Normalized and differential convolution. Proc IEEE CVPR 1993:515-523.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["FWHM_TO_SIGMA", "fill_nearest", "normalised_convolution"]

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def _sigma_voxels(fwhm_mm, voxel_size, ndim):
    return [fwhm_mm * FWHM_TO_SIGMA / float(v) for v in tuple(voxel_size)[:ndim]]


def fill_nearest(field, missing, voxel_size):
    """Replace the ``missing`` voxels of ``field`` by the value of the nearest other voxel."""
    if not np.any(missing):
        return field
    nearest = ndimage.distance_transform_edt(
        missing, sampling=tuple(voxel_size)[: field.ndim], return_distances=False, return_indices=True
    )
    return field[tuple(nearest)]


def normalised_convolution(values, weights, voxel_size, fwhm_mm):
    """Gaussian smoothing of ``values`` weighted by ``weights`` (0 = missing), holes filled.

    Parameters
    ----------
    values : ndarray
        Field values; ignored where ``weights`` is 0 (may be NaN there).
    weights : ndarray, same shape
        Confidence of each value (e.g. inverse variance); 0 marks missing voxels.
    voxel_size : sequence of float
        Voxel size (mm).
    fwhm_mm : float
        Kernel FWHM (mm); 0 keeps the valid values as they are and only fills the others.

    Returns
    -------
    ndarray
        Finite everywhere.
    """
    weights = np.where(np.isfinite(values), np.asarray(weights, dtype=float), 0.0)
    values = np.where(weights > 0, values, 0.0)
    if fwhm_mm > 0:
        sigma = _sigma_voxels(fwhm_mm, voxel_size, values.ndim)
        weight_sum = ndimage.gaussian_filter(weights, sigma, mode="nearest")
        smoothed = ndimage.gaussian_filter(weights * values, sigma, mode="nearest")
        reached = weight_sum > 1e-6 * np.max(weight_sum)
        with np.errstate(divide="ignore", invalid="ignore"):
            field = np.where(reached, smoothed / weight_sum, np.nan)
    else:
        field = np.where(weights > 0, values, np.nan)
    return fill_nearest(field, ~np.isfinite(field), voxel_size)
