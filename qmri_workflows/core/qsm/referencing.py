"""Field units (Hz to ppm) and referencing of susceptibility maps to a region.

Susceptibility from QSM is relative: the dipole kernel is 0 at k = 0, so the mean of the map is not
measured. It is reported relative to the mean over a reference region (CSF of the lateral ventricles,
or the whole brain), which the caller records with the map.
"""

from __future__ import annotations

import numpy as np

from ._grid import check_mask_volume

__all__ = ["GAMMA_BAR_MHZ_PER_T", "hz_to_ppm", "ppm_to_hz", "reference_to_region"]

#: Proton gyromagnetic ratio over 2 pi, MHz/T (CODATA 2018: 42.577 478 518).
GAMMA_BAR_MHZ_PER_T = 42.577478518


def _check_field_strength(b0_tesla):
    b0_tesla = float(b0_tesla)
    if not np.isfinite(b0_tesla) or b0_tesla <= 0:
        raise ValueError(f"b0_tesla must be the positive main field strength in T, got {b0_tesla}")
    return b0_tesla


def hz_to_ppm(field_hz, b0_tesla):
    """Convert a field offset from Hz to ppm of B0: ``f / (gamma_bar B0) * 1e6``.

    Parameters
    ----------
    field_hz : array_like
        Field offset in Hz (frequency offset of the protons).
    b0_tesla : float
        Main field strength in T.

    Returns
    -------
    field_ppm : ndarray
        Field offset in ppm of B0.
    """
    return np.asarray(field_hz) / (GAMMA_BAR_MHZ_PER_T * _check_field_strength(b0_tesla))


def ppm_to_hz(field_ppm, b0_tesla):
    """Convert a field offset from ppm of B0 to Hz (inverse of :func:`hz_to_ppm`)."""
    return np.asarray(field_ppm) * (GAMMA_BAR_MHZ_PER_T * _check_field_strength(b0_tesla))


def reference_to_region(chi, reference_mask, *, mask=None):
    """Subtract the mean over a reference region from a susceptibility map.

    Parameters
    ----------
    chi : ndarray, shape (X, Y, Z)
        Susceptibility in ppm.
    reference_mask : ndarray of bool, shape (X, Y, Z)
        Reference region (e.g. lateral-ventricle CSF, or the brain mask for the whole-brain mean).
    mask : ndarray of bool, optional
        Voxels to keep; others are set to 0 after referencing.

    Returns
    -------
    referenced : ndarray, shape (X, Y, Z)
        ``chi - mean(chi[reference_mask])`` in ppm.
    reference_value : float
        The subtracted mean in ppm.
    """
    chi = np.asarray(chi)
    reference_mask = check_mask_volume(reference_mask, chi.shape, "reference_mask")
    values = chi[reference_mask]
    if not np.all(np.isfinite(values)):
        raise ValueError(
            "chi is not finite everywhere in reference_mask; restrict the reference region to the brain mask"
        )
    reference_value = float(values.mean())
    referenced = chi - reference_value
    if mask is not None:
        referenced = referenced * check_mask_volume(mask, chi.shape)
    return referenced, reference_value
