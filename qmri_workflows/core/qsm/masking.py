"""The QSM mask (the brain mask minus unreliable voxels at its edge) and a CSF reference region.

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

__all__ = ["estimate_csf_mask", "reliable_edge_mask"]


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


def estimate_csf_mask(
    mask, r2star, voxel_size=(1.0, 1.0, 1.0), *, depth_mm=8.0, r2star_fraction=0.3, min_volume_mm3=100.0
):
    """A robust CSF reference region without a segmentation: slow-decaying voxels deep in the brain.

    CSF has an R2* several times below brain tissue's (about 1-5 s^-1 against 15-25 s^-1 at 3 T)
    and its largest pools, the lateral ventricles, lie deep inside the brain. Voxels at least
    ``depth_mm`` inside ``mask`` (exact spherical erosion, so sulcal CSF mixed with cortex and the
    partial-volume edge are left out) whose R2* is below ``r2star_fraction`` times the median R2*
    of the mask are taken.

    Parameters
    ----------
    mask : ndarray of bool, shape (X, Y, Z)
        Where the susceptibility is defined.
    r2star : ndarray, shape (X, Y, Z)
        R2* in s^-1 (non-finite values are never CSF).
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    depth_mm : float, optional
        Least distance from the edge of the mask.
    r2star_fraction : float, optional
        Fraction of the median R2* below which a voxel counts as CSF.
    min_volume_mm3 : float, optional
        Least volume of the region; below it the estimate is refused.

    Returns
    -------
    csf : ndarray of bool, shape (X, Y, Z)

    Raises
    ------
    ValueError
        If fewer than ``min_volume_mm3`` of CSF are found.
    """
    from .background import erode_ball

    r2star = check_volume(r2star, "r2star")
    mask = check_mask_volume(mask, r2star.shape)
    finite = mask & np.isfinite(r2star)
    if not finite.any():
        raise ValueError("R2* is not finite anywhere in the mask: no CSF can be estimated")
    threshold = r2star_fraction * np.median(r2star[finite])
    deep = erode_ball(mask, depth_mm, voxel_size)
    csf = deep & finite & (r2star < threshold)
    volume = float(csf.sum() * np.prod(voxel_size))
    if volume < min_volume_mm3:
        raise ValueError(
            f"only {volume:.0f} mm^3 deep inside the brain have an R2* below {threshold:.3g} 1/s "
            f"({r2star_fraction:g} x the median): too little to serve as a CSF reference"
        )
    return csf
