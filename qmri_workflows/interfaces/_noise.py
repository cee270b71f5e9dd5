"""The noise SD measured in the air around the head, for the interfaces that need one.

FitR2star, FitR1, AFIFlipAngleMap, DenoiseCollection and the bSSFP band-free step all measure it the
same way but do different things without it (ask for ``noise_sigma``, leave a standard error NaN,
keep the noise floor, skip denoising). So the outcome is returned as a value with the reason, and
each caller words its own remedy, instead of catching an exception and editing its message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.masking import air_mask
from ..core.noise import estimate_sigma_air, magnitude_mean, magnitude_second_moment, zero_filled_regions

# Fewer air voxels give too few blocks and too noisy a median to trust as the image's noise level.
MIN_AIR_VOXELS = 100


@dataclass(frozen=True)
class AirNoise:
    """What :func:`measure_air_noise` found.

    Attributes
    ----------
    sigma : float or None
        Noise SD per channel; None when it could not be measured (``problem`` says why).
    air : ndarray of bool or None
        The finite air voxels of the image; None when too few were found. Air without noise keeps
        its voxels.
    problem : str
        Why ``sigma`` is None, for the user (no remedy: that is the caller's); empty otherwise.
    """

    sigma: float | None
    air: np.ndarray | None
    problem: str = ""


def _spread(values):
    """Coefficient of variation (0 for no values or a zero mean)."""
    mean = float(np.mean(values)) if values.size else 0.0
    return float(np.std(values)) / mean if mean > 0 else 0.0


def _noise_only_spread(n_coils):
    """Coefficient of variation of noise-only root-sum-of-squares data of ``n_coils`` channels
    (0.52 for one, 0.18 for eight, 0.09 for 32): ``sqrt(E[M^2] / E[M]^2 - 1)``."""
    mean = float(magnitude_mean(0.0, 1.0, n_coils=n_coils))
    return float(np.sqrt(magnitude_second_moment(0.0, 1.0, n_coils=n_coils) / mean**2 - 1.0))


def measure_air_noise(image, *, voxel_size, n_coils=1, air=None):
    """Noise SD per channel in the air around the head of a magnitude image.

    The air is :func:`core.masking.air_mask` (finite voxels only); the SD is the median over blocks
    of it (:func:`core.noise.estimate_sigma_air`), robust to ghosts and to the few signal voxels that
    reach the air.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Magnitude image whose noise is measured.
    voxel_size : sequence of 3 float
        In mm: the air keeps its distance from the head, and the blocks their size, in mm.
    n_coils : int, optional
        Receive channels combined by root-sum-of-squares (the SD returned is that of one).
    air : ndarray of bool, optional
        Air found in another image of the same grid (a darker one's may not be findable); by
        default it is found in ``image``.

    Returns
    -------
    AirNoise
        ``sigma`` with the air, or None with the reason: fewer than :data:`MIN_AIR_VOXELS` air
        voxels (``air`` None), or air without noise (a noiseless simulation, or a background filled
        with a constant, whose values vary by less than a quarter of what noise would).
    """
    if air is None:
        air = air_mask(image, voxel_size=voxel_size)
    air = np.asarray(air, dtype=bool) & np.isfinite(image)
    n_air = np.count_nonzero(air)
    if n_air < MIN_AIR_VOXELS:
        zero_filled = np.count_nonzero(zero_filled_regions(image))
        reason = (
            f"the background is zero-filled ({zero_filled} voxels of exact zeros, which hold no noise: "
            "masked or cut by the scanner or the converter, or a noiseless simulation)"
            if zero_filled >= MIN_AIR_VOXELS
            else "the field of view holds too little air around the head"
        )
        return AirNoise(None, None, f"only {n_air} air voxels to estimate the noise level from; {reason}")
    spread, expected = _spread(image[air]), _noise_only_spread(n_coils)
    if spread < 0.25 * expected:
        # a background filled with one value (or nearly) by the scanner or the converter: its second
        # moment would pass for noise of SD value / sqrt(2 N)
        return AirNoise(
            None,
            air,
            f"the air holds no noise: its {n_air} voxels vary by {100 * spread:.2g} % around "
            f"{float(np.median(image[air])):.4g}, where noise of {n_coils} channel(s) varies by "
            f"{100 * expected:.0f} % (a background filled with a constant?)",
        )
    sigma = estimate_sigma_air(image, air, voxel_size=voxel_size, n_coils=n_coils)
    if not (sigma > 0 and np.isfinite(sigma)):
        return AirNoise(None, air, f"the air holds no noise ({n_air} voxels, noise SD {sigma:g}: simulated data?)")
    return AirNoise(float(sigma), air)
