"""The QSM mask: the anatomical brain mask minus unreliable voxels at its edge.

Phase near the brain's surface is unreliable where the signal is weak (partial volume with bone or
air, fast dephasing next to sinuses) or inconsistent over echoes (large field noise). Such voxels
carry fields that no susceptibility inside the mask explains, and background removal and dipole
inversion spread their error inwards. They are removed when they are connected to the outside of
the mask through other unreliable voxels; unreliable voxels enclosed by reliable ones (a vein, a
dark deep grey nucleus at late echoes) stay, because holes in the mask bias background removal
more than a few noisy voxels do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ._grid import check_mask_volume, check_volume

__all__ = ["reliable_edge_mask"]


def reliable_edge_mask(mask, magnitude, field_sd=None, *, magnitude_fraction=0.15, sd_factor=5.0):
    """Remove unreliable voxels connected to the edge of a brain mask.

    A voxel of ``mask`` is unreliable when its magnitude is below ``magnitude_fraction`` times the
    median magnitude in the mask, or its field noise SD is not finite or above ``sd_factor``
    times the median SD in the mask. Unreliable voxels that connect (face neighbours) to the
    outside of the mask are removed; the largest connected component of the rest is returned.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Anatomical brain mask.
    magnitude : ndarray, shape (X, Y, Z)
        Magnitude (e.g. root-sum-of-squares over echoes).
    field_sd : ndarray, shape (X, Y, Z), optional
        Noise SD of the total field (any unit, e.g. Hz); not used if None or NaN everywhere in the
        mask (two echoes leave no degree of freedom to estimate it).
    magnitude_fraction : float, optional
        Fraction of the median magnitude below which a voxel is unreliable.
    sd_factor : float, optional
        Multiple of the median field SD above which a voxel is unreliable.

    Returns
    -------
    reliable : ndarray of bool, shape (X, Y, Z)
        The QSM mask (empty if nothing reliable remains).
    """
    magnitude = check_volume(magnitude, "magnitude")
    mask = check_mask_volume(mask, magnitude.shape)
    if not mask.any():
        return mask.copy()
    level = np.median(magnitude[mask])
    unreliable = ~(magnitude >= magnitude_fraction * level)
    if field_sd is not None:
        field_sd = check_volume(field_sd, "field_sd", magnitude.shape)
        finite = np.isfinite(field_sd) & mask
        if finite.any():
            typical = np.median(field_sd[finite])
            unreliable |= ~(field_sd <= sd_factor * typical)
    unreliable &= mask
    # Components of (outside | unreliable) that contain an outside voxel reach the edge.
    labels, _ = ndimage.label(~mask | unreliable)
    edge_labels = np.unique(labels[~mask])
    reliable = mask & ~np.isin(labels, edge_labels[edge_labels > 0])
    labels, n_components = ndimage.label(reliable)
    if n_components > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        reliable = labels == np.argmax(sizes)
    return reliable
