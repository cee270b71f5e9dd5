"""Noise statistics of magnitude MR images.

The magnitude of one receive channel's complex signal with independent Gaussian noise of standard
deviation ``sigma`` in each of the real and imaginary parts is Rician distributed (Gudbjartsson &
Patz 1995). The root-sum-of-squares (RSS) combination of ``n_coils`` channels with equal,
uncorrelated noise is non-central chi distributed with ``2 n_coils`` degrees of freedom
(Constantinides et al. 1997). Rician is the special case ``n_coils = 1``.

Throughout, ``amplitude`` is the noise-free magnitude ``A`` (for RSS data, the RSS of the noise-free
channel amplitudes) and ``sigma`` is the per-channel, per-quadrature noise standard deviation.

References
----------
.. [1] Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. Magn Reson Med.
   1995;34(6):910-914. doi:10.1002/mrm.1910340618
.. [2] Constantinides CD, Atalar E, McVeigh ER. Signal-to-noise measurements in magnitude images
   from NMR phased arrays. Magn Reson Med. 1997;38(5):852-857. doi:10.1002/mrm.1910380524
.. [3] Koay CG, Basser PJ. Analytically exact correction scheme for signal extraction from noisy
   magnitude MR signals. J Magn Reson. 2006;179(2):317-322. doi:10.1016/j.jmr.2006.01.016
.. [4] Aja-Fernandez S, Vegas-Sanchez-Ferrero G. Statistical Analysis of Noise in MRI. Springer;
   2016. doi:10.1007/978-3-319-39934-8
.. [5] Aja-Fernandez S, Pieciak T, Vegas-Sanchez-Ferrero G. Spatially variant noise estimation in
   MRI: a homomorphic approach. Med Image Anal. 2015;20(1):184-197. doi:10.1016/j.media.2014.11.005
.. [6] Koay CG, Ozarslan E, Pierpaoli C. Probabilistic identification and estimation of noise
   (PIESNO). J Magn Reson. 2009;199(1):94-103. doi:10.1016/j.jmr.2009.03.005
"""

import numpy as np
from scipy import special

from .smoothing import FWHM_TO_SIGMA

__all__ = [
    "magnitude_mean",
    "magnitude_mean_derivative",
    "magnitude_second_moment",
    "correct_noise_floor",
    "remove_orthogonal_noise",
    "estimate_sigma_background",
    "estimate_sigma_air",
    "estimate_effective_coils",
    "estimate_sigma_piesno",
    "estimate_sigma_map",
    "MagnitudeMeanTable",
    "quantisation_step",
    "zero_filled_regions",
]

# Above this SNR (A / sigma) the asymptotic series of E[M] is used: with z = A^2 / (2 sigma^2) > 800
# the first omitted term is ~ z^-4 ~ 1e-12 relative, below float64 rounding of typical data.
_ASYMPTOTIC_SNR = 40.0


def _check_n_coils(n_coils):
    if int(n_coils) != n_coils or n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")
    return int(n_coils)


def _check_sigma(sigma):
    sigma = np.asarray(sigma, dtype=float)
    bad = ~(np.isfinite(sigma) & (sigma > 0))
    if np.any(bad):
        raise ValueError(
            f"sigma must be positive and finite, got {np.count_nonzero(bad)} values like {float(sigma[bad].flat[0])!r}"
        )
    return sigma


def _mean_prefactor(n_coils):
    # E[M] / sigma at zero amplitude: sqrt(2) Gamma(N + 1/2) / Gamma(N)
    return np.sqrt(2.0) * np.exp(special.gammaln(n_coils + 0.5) - special.gammaln(n_coils))


def _asymptotic_series(snr, n_coils, *, derivative=False):
    """Large-SNR expansion of E[M]/sigma (or its derivative) in powers of 1/z, z = snr^2 / 2.

    From Kummer's transformation and the asymptotic series of 1F1 (Abramowitz & Stegun 13.5.1):
    1F1(-1/2; N; -z) ~ Gamma(N)/Gamma(N+1/2) z^(1/2) sum_k (-1/2)_k (1/2 - N)_k / k! z^-k.
    """
    coefficients = [1.0]
    for k in range(1, 5):
        coefficients.append(coefficients[-1] * (k - 1.5) * (k - 0.5 - n_coils) / k)
    if derivative:
        # d/dsnr [snr z^-k] = (1 - 2k) z^-k
        coefficients = [c * (1 - 2 * k) for k, c in enumerate(coefficients)]
    inverse_z = 2.0 / snr / snr  # not 2 / snr^2: no overflow for the huge SNR of a diverging trial step
    total = coefficients[-1]
    for coefficient in coefficients[-2::-1]:
        total = total * inverse_z + coefficient
    return total if derivative else snr * total


def _mean_over_sigma_exact(snr, n_coils):
    """E[M]/sigma as a function of snr = A/sigma, exact, vectorised."""
    snr = np.abs(np.asarray(snr, dtype=float))
    out = np.empty_like(snr)
    large = snr > _ASYMPTOTIC_SNR
    small = ~large
    z = 0.5 * snr[small] ** 2
    if n_coils == 1:
        # Rician: sqrt(pi/2) L_{1/2}(-z) with exponentially scaled Bessel functions (overflow-free).
        half = 0.5 * z
        out[small] = np.sqrt(np.pi / 2.0) * ((1.0 + z) * special.i0e(half) + z * special.i1e(half))
    else:
        out[small] = _mean_prefactor(n_coils) * special.hyp1f1(-0.5, n_coils, -z)
    out[large] = _asymptotic_series(snr[large], n_coils)
    return out


def _mean_derivative_exact(snr, n_coils):
    """d(E[M]/sigma)/d(A/sigma), exact, vectorised (equals dE[M]/dA)."""
    snr = np.abs(np.asarray(snr, dtype=float))
    out = np.empty_like(snr)
    large = snr > _ASYMPTOTIC_SNR
    small = ~large
    s = snr[small]
    z = 0.5 * s**2
    if n_coils == 1:
        # d/dA uses d/dz 1F1(a; b; z) = a/b 1F1(a+1; b+1; z) and 1F1(1/2; 2; -z) =
        # exp(-z/2) [I0(z/2) + I1(z/2)].
        half = 0.5 * z
        out[small] = np.sqrt(np.pi / 8.0) * s * (special.i0e(half) + special.i1e(half))
    else:
        out[small] = _mean_prefactor(n_coils) * s / (2.0 * n_coils) * special.hyp1f1(0.5, n_coils + 1, -z)
    out[large] = _asymptotic_series(snr[large], n_coils, derivative=True)
    return out


def magnitude_mean(amplitude, sigma, *, n_coils=1):
    """Expected magnitude of a Rician or non-central chi variable.

    Parameters
    ----------
    amplitude : array_like
        Noise-free magnitude ``A`` (>= 0; the sign is ignored).
    sigma : float or array_like
        Noise standard deviation of each real/imaginary channel component, broadcastable to
        ``amplitude``.
    n_coils : int, optional
        Number of channels combined by root-sum-of-squares (1 = Rician).

    Returns
    -------
    mean : ndarray
        ``E[M] = sigma sqrt(2) Gamma(N + 1/2) / Gamma(N) 1F1(-1/2; N; -A^2 / (2 sigma^2))``,
        evaluated with scaled Bessel functions for ``N = 1`` [1]_, ``scipy.special.hyp1f1`` for
        ``N > 1`` [2]_ and a converged asymptotic series above an SNR of 40.

    References
    ----------
    .. [1] Gudbjartsson H, Patz S. Magn Reson Med. 1995;34:910-914.
    .. [2] Constantinides CD, Atalar E, McVeigh ER. Magn Reson Med. 1997;38:852-857.
    """
    n_coils = _check_n_coils(n_coils)
    sigma = _check_sigma(sigma)
    amplitude, sigma = np.broadcast_arrays(np.asarray(amplitude, dtype=float), sigma)
    return sigma * _mean_over_sigma_exact(amplitude / sigma, n_coils)


def magnitude_mean_derivative(amplitude, sigma, *, n_coils=1):
    """Derivative ``dE[M]/dA`` of :func:`magnitude_mean` with respect to the amplitude.

    Parameters
    ----------
    amplitude, sigma, n_coils
        As in :func:`magnitude_mean`.

    Returns
    -------
    derivative : ndarray
        Dimensionless slope, rising from 0 at ``A = 0`` to 1 at high SNR.
    """
    n_coils = _check_n_coils(n_coils)
    sigma = _check_sigma(sigma)
    amplitude, sigma = np.broadcast_arrays(np.asarray(amplitude, dtype=float), sigma)
    return _mean_derivative_exact(amplitude / sigma, n_coils)


def magnitude_second_moment(amplitude, sigma, *, n_coils=1):
    """Second moment ``E[M^2] = A^2 + 2 N sigma^2`` of a Rician / non-central chi variable.

    Parameters
    ----------
    amplitude, sigma, n_coils
        As in :func:`magnitude_mean`.

    Returns
    -------
    second_moment : ndarray

    References
    ----------
    .. [1] Constantinides CD, Atalar E, McVeigh ER. Magn Reson Med. 1997;38:852-857.
    """
    n_coils = _check_n_coils(n_coils)
    sigma = _check_sigma(sigma)
    amplitude = np.asarray(amplitude, dtype=float)
    return amplitude**2 + 2.0 * n_coils * sigma**2


def correct_noise_floor(magnitude, sigma, *, n_coils=1):
    """Remove the magnitude noise floor with the second-moment correction.

    Parameters
    ----------
    magnitude : array_like
        Measured (or locally averaged) magnitude.
    sigma : float or array_like
        Per-channel noise standard deviation, broadcastable to ``magnitude``.
    n_coils : int, optional
        Number of RSS-combined channels (1 = Rician).

    Returns
    -------
    corrected : ndarray
        ``sqrt(max(M^2 - 2 N sigma^2, 0))``. Exact for ``A`` when applied to ``sqrt(E[M^2])``;
        applied to a single sample it is a simple, slightly biased estimate of ``A`` (dipy's
        nlmeans uses it for ``N = 1``).

    References
    ----------
    .. [1] Gudbjartsson H, Patz S. Magn Reson Med. 1995;34:910-914.
    """
    n_coils = _check_n_coils(n_coils)
    sigma = _check_sigma(sigma)
    magnitude = np.asarray(magnitude, dtype=float)
    return np.sqrt(np.maximum(magnitude**2 - 2.0 * n_coils * sigma**2, 0.0))


def remove_orthogonal_noise(magnitude, sigma, *, n_coils):
    """Magnitude of the optimally combined complex signal, from a root-sum-of-squares magnitude.

    Project the channels' signals on the unit vector of the coil sensitivities: the projection
    (the SNR-optimal, Roemer-type combination, whose phase scanners export as the phase image)
    carries all the signal and complex Gaussian noise of SD ``sigma`` per part; the remaining
    ``N - 1`` directions carry noise only. The RSS magnitude squared is the sum of both, so the
    noise power of those directions, ``2 (N - 1) sigma^2`` on average, is what makes a magnitude
    paired with the combined phase non-Gaussian (its floor). Removing it, and no more, leaves
    data that complex-domain methods (bSSFP band-free combinations, complex averaging) can treat
    as Gaussian; :func:`correct_noise_floor` removes the whole ``2 N sigma^2`` instead, for
    magnitude-only estimates of the amplitude.

    Parameters
    ----------
    magnitude : array_like
        RSS magnitude of ``n_coils`` channels with equal, uncorrelated noise (floating point
        input keeps its precision).
    sigma : float or array_like
        Per-channel noise SD, broadcastable to ``magnitude``; 0 where unknown (the magnitude is
        then kept).
    n_coils : int
        Number of channels (1: the magnitude is returned unchanged).

    Returns
    -------
    corrected : ndarray
        ``sqrt(max(M^2 - 2 (N - 1) sigma^2, 0))``.
    """
    n_coils = _check_n_coils(n_coils)
    magnitude = np.asarray(magnitude)
    if not np.issubdtype(magnitude.dtype, np.floating):
        magnitude = magnitude.astype(float)
    sigma = np.asarray(sigma, dtype=magnitude.dtype)
    if np.any(~np.isfinite(sigma) | (sigma < 0)):
        raise ValueError("sigma must be finite and non-negative (0 where unknown)")
    if n_coils == 1:
        return magnitude.copy()
    floor = np.asarray(2 * (n_coils - 1), dtype=magnitude.dtype) * sigma * sigma
    return np.sqrt(np.maximum(magnitude * magnitude - floor, 0))


def estimate_sigma_background(magnitude_background, *, n_coils=1, method="second_moment"):
    """Estimate the per-channel noise SD from signal-free (background) magnitude samples.

    In signal-free regions the magnitude is central chi with ``2 N`` degrees of freedom and scale
    ``sigma`` (Rayleigh for ``N = 1``).

    Parameters
    ----------
    magnitude_background : array_like
        Magnitude samples from air/background, any shape. Non-finite values are ignored.
    n_coils : int, optional
        Number of RSS-combined channels (1 = Rician/Rayleigh).
    method : {"second_moment", "mean", "median"}, optional
        ``"second_moment"``: ``sqrt(mean(M^2) / (2 N))``, the maximum-likelihood estimator.
        ``"mean"``: ``mean(M) / (sqrt(2) Gamma(N + 1/2) / Gamma(N))``.
        ``"median"``: ``median(M) / sqrt(chi2.ppf(0.5, 2 N))``, robust to a few signal voxels.

    Magnitudes stored as integers (or integers times a scale slope: step ``q``,
    :func:`quantisation_step`) are noise rounded to the nearest step. Their median can only move
    by whole steps (up to 14 % off at a noise SD of 3 steps), so the median method reads the
    distribution at the two edges of the step that holds it instead; their mean square gains ``q^2 / 12``
    (Sheppard's correction), which is removed. Continuous samples are unchanged.

    Returns
    -------
    sigma : float

    References
    ----------
    .. [1] Constantinides CD, Atalar E, McVeigh ER. Magn Reson Med. 1997;38:852-857.
    .. [2] Aja-Fernandez S, Vegas-Sanchez-Ferrero G. Statistical Analysis of Noise in MRI. 2016.
    """
    n_coils = _check_n_coils(n_coils)
    samples = np.asarray(magnitude_background, dtype=float).ravel()
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        raise ValueError("magnitude_background holds no finite sample")
    if method not in ("second_moment", "mean", "median"):
        raise ValueError(f"method must be 'second_moment', 'mean' or 'median', got {method!r}")
    step = _rounding_step(samples)
    if method == "second_moment":
        return float(_sigma_from_mean_square(np.mean(samples**2), step, n_coils))
    if method == "mean":
        return float(np.mean(samples) / _mean_prefactor(n_coils))
    if step > 0:
        rounded = _sigma_from_rounded_median(samples, step, n_coils)
        if rounded is not None:
            return rounded
    # median of chi-square with 2N degrees of freedom, 2 P^-1(N, 1/2) (scipy.stats.chi2.ppf
    # computes the same; importing scipy.stats costs seconds in each worker process)
    return float(np.median(samples) / np.sqrt(2.0 * special.gammaincinv(n_coils, 0.5)))


def _sigma_from_mean_square(mean_square, step, n_coils):
    """``sqrt(E[M^2] / 2N)`` of noise-only magnitudes, less Sheppard's ``step^2 / 12`` of rounding."""
    return np.sqrt(np.maximum(mean_square - step**2 / 12.0, 0.0) / (2.0 * n_coils))


def _rounding_step(samples):
    """Step ``q`` of rounded samples, or 0 for continuous ones.

    Samples count as rounded when they hold at most a few values per step over their range: many
    repeated values, which continuous noise practically never has.
    """
    if samples.size < 2:
        return 0.0
    step = quantisation_step(samples)
    if not step > 0:
        return 0.0
    n_levels = np.ptp(samples) / step + 1
    return step if samples.size >= 4 * n_levels else 0.0


def _sigma_from_rounded_median(samples, step, n_coils):
    """Noise SD from samples rounded to multiples of ``step``, at the edges of the median's step.

    The value ``v`` that holds the median stands for ``[v - step/2, v + step/2)``. At each edge
    ``c`` the fraction of samples below is exact (no sample straddles an edge) and equals the
    central chi CDF ``P(N, c^2 / (2 sigma^2))``, which gives ``sigma``; the two edges' values are
    averaged (the lower one is skipped when it is 0).
    """
    value = step * np.round(np.median(samples) / step)
    tolerance = 1e-6 * step
    estimates = []
    for edge, fraction_below in (
        (value - 0.5 * step, np.count_nonzero(samples < value - tolerance) / samples.size),
        (value + 0.5 * step, np.count_nonzero(samples <= value + tolerance) / samples.size),
    ):
        if edge > 0 and 0 < fraction_below < 1:
            estimates.append(edge / np.sqrt(2.0 * special.gammaincinv(n_coils, fraction_below)))
    return float(np.mean(estimates)) if estimates else None


def estimate_effective_coils(magnitude_background):
    """Effective number of coils and noise SD from signal-free magnitude samples.

    Parallel imaging and correlated channels make RSS data behave as non-central chi with fewer
    effective channels ``N_eff`` and a larger effective ``sigma_eff`` than the hardware's [4]_. In the
    background, ``M^2 / sigma^2`` is chi-square with ``2 N`` degrees of freedom, so
    ``E[M^2] = 2 N sigma^2`` and ``Var[M^2] = 4 N sigma^4``: the two moments give both numbers.

    Parameters
    ----------
    magnitude_background : array_like
        Magnitude samples from air; non-finite values are ignored.

    Returns
    -------
    n_effective : float
        ``E[M^2]^2 / Var[M^2]`` (not rounded; 1 for Rayleigh samples).
    sigma_effective : float
        ``sqrt(Var[M^2] / (2 E[M^2]))``.
    """
    samples = np.asarray(magnitude_background, dtype=float).ravel()
    samples = samples[np.isfinite(samples)]
    if samples.size < 2:
        raise ValueError("magnitude_background needs at least 2 finite samples")
    power = samples**2
    second, variance = power.mean(), power.var()
    if not variance > 0:
        raise ValueError("magnitude_background has no spread: it holds no noise")
    return float(second**2 / variance), float(np.sqrt(variance / (2.0 * second)))


def _centred_blocks(n, voxels_per_block, minimum=1):
    """``(count, step, offset)``: blocks of an odd ``step`` of about ``voxels_per_block`` voxels (at
    least ``minimum``), laid out symmetrically about the centre of an axis of ``n`` voxels (voxel
    ``i`` is in block ``(i + offset) // step``), so that reversing the axis maps blocks onto blocks:
    what is computed over them does not depend on the direction in which the image is stored."""
    step = max(int(minimum), int(round(voxels_per_block))) | 1
    count = -(-n // step)
    if (count * step - n) % 2:  # an odd step changes the parity of the overhang
        count += 1
    return count, step, (count * step - n) // 2


def estimate_sigma_air(image, air, *, voxel_size=(1.0, 1.0, 1.0), n_coils=1, block_mm=12.0, min_block_voxels=64):
    """Noise SD per channel from the air of an image, robust to ghosts: the median over blocks.

    Ghosts of the head (Nyquist and motion ghosts, shifted along the phase-encoding direction) lie
    in the air as bands of signal; those of 1-2 noise SDs are too faint for an air mask to leave
    out. An estimator over all air voxels moves with the fraction they cover: the median by +11 %
    for a ghost of 2 SDs over a fifth of the air (tests/core/test_noise.py). Here the air is cut into
    cubes of about ``block_mm``; each cube with at least ``min_block_voxels`` air voxels gives its
    own estimate (the second moment, :func:`estimate_sigma_background`, with Sheppard's correction
    for integer-stored values), and the median over cubes is returned: ghost-free cubes decide as
    long as ghosts reach fewer than half of them. With fewer than 5 such cubes (little air, thick
    voxels) the median estimator over all air voxels is used instead.

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)
        Magnitude image.
    air : ndarray of bool, shape (X, Y, Z)
        Air voxels (e.g. :func:`qmri_workflows.core.masking.air_mask`); non-finite values are left out.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    n_coils : int, optional
        Number of RSS-combined channels.
    block_mm : float, optional
        Edge of the cubes in mm (rounded to an odd number of voxels, at least 5).
    min_block_voxels : int, optional
        Air voxels a cube needs to count.

    Returns
    -------
    sigma : float
    """
    n_coils = _check_n_coils(n_coils)
    image = np.asarray(image, dtype=float)
    air = np.asarray(air, dtype=bool) & np.isfinite(image)
    values = image[air]
    if values.size == 0:
        raise ValueError("the air mask holds no finite voxel")
    indices = np.nonzero(air)
    grid = [_centred_blocks(n, block_mm / float(size), minimum=5) for n, size in zip(image.shape, voxel_size)]
    n_blocks = [count for count, _, _ in grid]
    block = np.ravel_multi_index(
        tuple((index + offset) // step for index, (_, step, offset) in zip(indices, grid)), n_blocks
    )
    counts = np.bincount(block)
    power = np.bincount(block, weights=values**2)
    kept = counts >= int(min_block_voxels)
    if np.count_nonzero(kept) < 5:
        return estimate_sigma_background(values, n_coils=n_coils, method="median")
    return float(_sigma_from_mean_square(np.median(power[kept] / counts[kept]), _rounding_step(values), n_coils))


def estimate_sigma_piesno(images, *, n_coils=1, alpha=0.01, max_iterations=100):
    """Global noise SD of a collection of images with dipy's PIESNO [6]_.

    PIESNO finds the voxels whose values across the images behave as pure noise (central chi
    with ``2 N`` degrees of freedom), slice by slice, so it needs several images of the same
    noise (a multi-echo, multi-flip-angle collection) and some background in each slice.

    Parameters
    ----------
    images : ndarray, shape (X, Y, Z, n_images)
        Magnitude images sharing one noise level.
    n_coils : int, optional
        RSS-combined channels.
    alpha : float, optional
        Probability of error of the identification test.
    max_iterations : int, optional

    Returns
    -------
    sigma : float
        Median of PIESNO's per-slice estimates (slices without noise-only voxels left out).
    """
    from dipy.denoise.noise_estimate import piesno

    n_coils = _check_n_coils(n_coils)
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] < 2:
        raise ValueError(f"images must have shape (X, Y, Z, n_images >= 2), got {images.shape}")
    estimates = []
    for z in range(images.shape[2]):
        sigma, noise_voxels = piesno(
            images[:, :, z : z + 1, :], N=n_coils, alpha=alpha, itermax=max_iterations, return_mask=True
        )
        sigma = float(np.ravel(sigma)[0])
        if noise_voxels.any() and np.isfinite(sigma) and sigma > 0:
            estimates.append(sigma)
    if not estimates:
        raise ValueError("PIESNO found no noise-only voxel in any slice (no background in the field of view?)")
    return float(np.median(estimates))


def zero_filled_regions(image):
    """Exact zeros that fill regions of an image: background the scanner or the converter masked,
    or a zero-filled part of the field of view. They hold no noise.

    Magnitude noise is never exactly 0, but an image stored as integers (or integers times a scale
    slope) rounds a fraction of about ``q**2 / (8 sigma**2)`` of its air to 0 (step ``q``; 1.4 % at a
    noise SD of 3 steps). Those zeros are noise samples, whereas zeros written by masking fill whole
    regions. They are told apart by their extent: a zero-filled region holds 3 x 3 squares of zeros
    in the slices along some axis, which independent rounded noise practically never makes
    (probability ``p**9`` for a fraction ``p`` of zeros: below 1e-8 at ``p = 0.12``).

    Parameters
    ----------
    image : ndarray, shape (X, Y, Z)

    Returns
    -------
    ndarray of bool
        The zeros that belong to a 3 x 3 square of zeros in an axial, coronal or sagittal slice.
    """
    from scipy import ndimage

    image = np.asarray(image)
    zeros = image == 0
    if not zeros.any():
        return zeros
    filled = np.zeros(image.shape, dtype=bool)
    for axis in range(image.ndim):
        square = np.ones((3,) * image.ndim, dtype=bool)
        np.moveaxis(square, axis, 0)[[0, 2]] = False
        centres = ndimage.binary_erosion(zeros, structure=square)
        if centres.any():  # an opening, without its dilation when nothing is left (rounded noise)
            filled |= ndimage.binary_dilation(centres, structure=square)
    return filled


def quantisation_step(image, *, max_samples=200_000):
    """Step between the values an image can hold: 1 for integers, the slope for integers stored with
    a NIfTI scale slope; about the float precision for continuous data.

    Parameters
    ----------
    image : array_like
        Any shape; non-finite values are ignored.
    max_samples : int, optional
        At most this many values (evenly strided) are examined.

    Returns
    -------
    step : float
        Smallest gap between distinct values (0 with fewer than two).
    """
    values = np.asarray(image).ravel()
    values = values[:: max(1, values.size // int(max_samples))]
    values = np.unique(values[np.isfinite(values)].astype(np.float64))
    return float(np.diff(values).min()) if values.size > 1 else 0.0


class _LogSmoother:
    """Low-pass of log samples: a local plane, read where the data are.

    At each point the Gaussian-weighted mean of the samples is the map at the samples' centroid, not
    at the point. Their number per voxel differs between regimes: the air gives one in every image,
    tissue only in the images where it is flat and bright (on the 2 mm bSSFP phantom, 7 against 2 in
    each voxel that has any, and a third of the brain's voxels have some). Near the head the
    centroid lies in the air, and the mean reads the map there: 7 % low at the edge of the phantom's
    brain, where the g-factor falls off towards the air. The weighted least-squares plane through
    the samples is read at the centroid of the data (the voxels that hold an image, not zero-filled)
    instead: at the point where the data surround it, but not beyond their edge (a zero-filled
    background, the field of view), where a plane fitted to the samples of one side would amplify
    their noise and local bias (a head cut by the field of view, ``tests/core/test_denoise.py``:
    max error 6 -> 10 % when read at the point).

    The slope has a Gaussian prior of SD ``_LOG_SLOPE_PRIOR_PER_MM`` (noise maps change over
    centimetres) against samples of variance ``_LOG_SAMPLE_VARIANCE``: where few samples determine
    it (a narrow filter, far from the samples) the plane flattens into their mean.

    The map is smooth on the filter's scale, so the sums are taken over blocks of about a third of
    its SD, each block's samples standing at its centre (a blur of ``block^2 / 12`` voxels^2 more:
    the map moves by under 0.7 % on the phantom). Every moment of the fit is taken at the same
    positions, so the spread of the samples about their centroid is a true weighted covariance,
    never negative: with the first moments at the samples' own positions and the second at the
    blocks' centres, a point with its samples in one or two blocks got a near-singular spread and a
    slope without bound (a 2 x 2 x 4 mm bSSFP map ranged from 0.007 to 24 times sigma). The blocks
    have an odd number of voxels and are centred on the volume, so that the map does not depend on
    the order the image is stored in. The plane is read at the blocks' centres and interpolated
    linearly to the voxels.

    Parameters
    ----------
    data : ndarray of bool, shape (X, Y, Z)
        Voxels that hold an image.
    filter_sigma_voxels : sequence of 3 float
        SD of the Gaussian along each axis, in voxels.
    filter_sigma_mm : float
        The same in mm.
    fallback : float
        Log value where no sample is near.
    """

    def __init__(self, data, filter_sigma_voxels, filter_sigma_mm, fallback):
        sigma_voxels = np.asarray(filter_sigma_voxels, dtype=float)
        self.shape = np.array(data.shape)
        # blocks laid symmetrically about the centre: the map does not depend on the storage order
        grid = [_centred_blocks(int(n), sigma / 3.0) for n, sigma in zip(self.shape, sigma_voxels)]
        self.n_blocks = np.array([count for count, _, _ in grid])
        self.factor = np.array([step for _, step, _ in grid])
        self.padding = [(offset, int(count * step - n - offset)) for (count, step, offset), n in zip(grid, self.shape)]
        self.sigma = sigma_voxels / self.factor  # in blocks
        # the filter's weights sum to 1: the prior's weight in the same units
        kernel_samples = np.prod(np.sqrt(2.0 * np.pi) * self.sigma)
        self.ridge = _LOG_SAMPLE_VARIANCE / (_LOG_SLOPE_PRIOR_PER_MM * filter_sigma_mm) ** 2 / kernel_samples
        self.fallback = float(fallback)
        data_zeroth, data_first, _ = self._moments(data)
        with np.errstate(invalid="ignore", divide="ignore"):
            self.data_centroid = np.nan_to_num(data_first / data_zeroth[..., None])

    def _filter(self, values, order=(0, 0, 0)):
        """Sum of values x G x u^order over the blocks, u their offset from the point in SDs (with
        ``u^2 - 1`` for a second order along one axis)."""
        from scipy import ndimage

        # derivatives of G: G' = -(d / s^2) G, G'' = (d^2 / s^4 - 1 / s^2) G with d = point - block
        filtered = ndimage.gaussian_filter(values, self.sigma, order=order, mode="constant")
        return filtered * np.prod(self.sigma ** np.asarray(order))

    def _moments(self, values, *, second=False):
        """Zeroth, first (and second) moments of the samples' offsets from each point, in SDs, the
        samples of a block at its centre."""
        f0, f1, f2 = self.factor
        n0, n1, n2 = self.n_blocks
        blocks = np.pad(values, self.padding).reshape(n0, f0, n1, f1, n2, f2)
        total = blocks.sum(axis=(1, 3, 5), dtype=np.float64)
        zeroth = self._filter(total)
        unit = np.eye(3, dtype=int)
        first = np.stack([self._filter(total, unit[i]) for i in range(3)], axis=-1)
        if not second:
            return zeroth, first, None
        moment = np.empty(zeroth.shape + (3, 3))
        for i in range(3):
            for j in range(i, 3):
                value = self._filter(total, unit[i] + unit[j]) + (zeroth if i == j else 0.0)
                moment[..., i, j] = moment[..., j, i] = value
        return zeroth, first, moment

    def __call__(self, log_sum, counts):
        """Low-pass log map from ``log_sum`` (each voxel's sum of log samples) and ``counts``."""
        m0, m1, m2 = self._moments(counts, second=True)
        c0, c1, _ = self._moments(log_sum)
        fitted = m0 > 1e-6 * np.prod(self.factor)  # a millionth of a sample per voxel
        m0 = np.where(fitted, m0, 1.0)
        centroid = m1 / m0[..., None]
        spread = m2 - m0[..., None, None] * centroid[..., :, None] * centroid[..., None, :] + self.ridge * np.eye(3)
        slope = np.linalg.solve(spread, (c1 - centroid * c0[..., None])[..., None])[..., 0]
        level = c0 / m0 + np.sum(slope * (self.data_centroid - centroid), axis=-1)
        level = np.where(fitted, level, self.fallback)
        # from the blocks' centres to the voxels, linear along each axis (constant beyond the outer
        # centres)
        for axis, (size, f, n, (before, _)) in enumerate(zip(self.shape, self.factor, self.n_blocks, self.padding)):
            position = (np.arange(size) + before - 0.5 * (f - 1)) / f
            lower = np.clip(np.floor(position).astype(int), 0, max(n - 2, 0))
            upper = np.minimum(lower + 1, n - 1)
            fraction = np.clip(position - lower, 0.0, 1.0).reshape([-1 if a == axis else 1 for a in range(3)])
            level = level.take(lower, axis=axis) * (1.0 - fraction) + level.take(upper, axis=axis) * fraction
        return level


def estimate_sigma_map(
    magnitude,
    *,
    n_coils=1,
    sigma_global=None,
    echo_trains=None,
    voxel_size=(1.0, 1.0, 1.0),
    filter_fwhm_mm=30.0,
    neighbourhood=3,
    signal_snr=4.0,
    background_snr=1.5,
):
    """Spatially varying noise SD by the homomorphic approach [5]_.

    The log of a noise-only quantity is the log of the noise SD plus a known constant; the noise
    SD varies slowly (coil geometry, g-factor), the constant does not, so a low-pass filter of the
    log recovers the map. Two regimes, chosen per voxel from the local mean ``mu`` (``k^3``
    neighbourhood) against a first global SD:

    * signal (``mu > signal_snr x floor``): the magnitude is about Gaussian of SD ``sigma`` [1]_.
      With echo trains, the residual is the second difference of three consecutive echoes,
      ``r = M_1 - 2 M_2 + M_3`` (SD ``sigma sqrt(6)``), in which the anatomy cancels (the decay's
      curvature over two echo spacings is ``(R2* dTE)^2`` of the signal, about 1 % at 50 1/s and
      2.3 ms); without them, ``r`` is the voxel minus the least-squares quadratic of its 3x3x3
      neighbourhood at it (a fixed 27-tap filter; SD ``sigma sqrt(20/27)``), where the local mean
      is flat (gradient below ``sigma / 2`` per voxel), since at edges the residual holds anatomy.
      The quadratic takes out the curvature a plain local mean leaves, and residuals whose local
      energy stands over 3 times the noise's (judged against the map, then the map made again)
      are structure and go: on the 2 mm phantom the map of the bSSFP phase cycles went from a
      median error of +4 % and 5 % of the brain over 10 % off to 0 % and 0.2 % (at most 11 %;
      6 % with the neighbours' mean of the air and the plane of the low-pass, below).
      ``E[log |r|] = log(SD) - (gamma + log 2) / 2`` (``gamma`` Euler's constant);
    * background (the mean of the ``k^3 - 1`` neighbours, without the voxel, below
      ``background_snr x floor``): ``M / sigma`` is central chi with ``2 N`` degrees of freedom and
      ``E[log M] = log(sigma) + (log 2 + psi(N)) / 2``. A mean that held the voxel would keep,
      where the threshold cuts into the air's law, the voxels whose own noise fell low (air 20 %
      noisier than the first SD read 11 % low). Regions of exact zeros (background masked or
      zero-filled by the scanner or the converter, :func:`zero_filled_regions`) hold no noise and
      are left out.

    Images stored as integers (or integers times a scale slope, step ``q``,
    :func:`quantisation_step`) hold isolated exact zeros: rounded noise in the air and residuals
    that cancel. Each gets the mean log of the bin of width ``q`` it stands for, not ``log 0``.

    Both thresholds are in units of ``floor = sigma x E0(N) / E0(1)`` (``floor = sigma`` for
    ``N = 1``), with ``E0(N) sigma`` the mean of noise-only data: air has ``mu`` of 1.25, 1.88 and
    2.74 ``sigma`` for 1, 2 and 4 channels, so thresholds in units of ``sigma`` alone would leave
    the air of RSS data out of the background law (or keep only its darkest part).

    Voxels in between (low SNR, where neither law holds) are left out. The low-pass is a Gaussian
    weighted plane through the log samples of both regimes, read where the data are, not at the
    samples' centroid (which the air, with samples in every image, pulls out of the tissue): it
    fills the voxels without samples (:class:`_LogSmoother`).

    Parameters
    ----------
    magnitude : ndarray, shape (X, Y, Z) or (X, Y, Z, n_images)
        Magnitude image(s) sharing one noise map; the log estimates of several images are averaged.
    n_coils : float, optional
        (Effective) number of RSS-combined channels, for the background law.
    sigma_global : float, optional
        First global SD used to classify voxels; by default from the 10th percentile of the non-zero
        voxels of the first image, taken as the 10th percentile of the background's central chi law
        (at least 10 % of them must be air).
    echo_trains : sequence of sequences of int, optional
        Indices (last axis of ``magnitude``) of the echoes of each multi-echo series in echo-time
        order; trains of 3 or more echoes give the structure-free residuals above.
    voxel_size : sequence of 3 floats
        Voxel size (mm).
    filter_fwhm_mm : float, optional
        FWHM of the Gaussian weights of the low-pass of the log (mm).
    neighbourhood : int, optional
        Width ``k`` (voxels) of the local mean.
    signal_snr, background_snr : float, optional
        Thresholds of ``mu / sigma`` of the two regimes.

    Returns
    -------
    sigma_map : ndarray, shape (X, Y, Z), float32
        Per-channel noise SD of each voxel.
    """
    from scipy import ndimage

    magnitude = np.asarray(magnitude, dtype=np.float32)
    if magnitude.ndim == 3:
        magnitude = magnitude[..., None]
    if magnitude.ndim != 4:
        raise ValueError(f"magnitude must be 3D or 4D, got shape {magnitude.shape}")
    if not n_coils > 0:
        raise ValueError(f"n_coils must be positive, got {n_coils!r}")
    voxel_size = np.asarray(voxel_size, dtype=float)
    filter_sigma_mm = filter_fwhm_mm * FWHM_TO_SIGMA
    filter_sigma_voxels = filter_sigma_mm / voxel_size
    background_offset = 0.5 * (np.log(2.0) + special.digamma(n_coils))
    quadratic_offset = -0.5 * (np.euler_gamma + np.log(2.0)) + 0.5 * np.log(_QUADRATIC_RESIDUAL_POWER)
    if sigma_global is None:
        first = magnitude[..., 0]
        # the darkest 10 % are the lower tail of the air's law, not a sample of it: match the quantile
        # (M^2 / sigma^2 is chi-square with 2 N degrees of freedom, quantile 2 P^-1(N, q)); zeros are
        # masked background, which holds no noise
        positive = first[np.isfinite(first) & (first > 0)]
        dark_quantile = float(np.percentile(positive, 10)) if positive.size else 0.0
        sigma_global = dark_quantile / np.sqrt(2.0 * special.gammaincinv(n_coils, 0.1))
    if not sigma_global > 0:
        raise ValueError("sigma_global must be > 0 (is the image noiseless?)")
    tiny = 1e-6 * sigma_global
    # noise-only mean over the Rayleigh one: the thresholds follow the noise floor of RSS data
    floor = sigma_global * _mean_prefactor(n_coils) / _mean_prefactor(1)
    # An image stored as integers (or times a scale slope) holds exact zeros: rounded low noise in
    # the air, and signal residuals that cancel. Each stands for a bin of values around 0, whose
    # mean log it gets instead of log(tiny) ~ log(sigma) - 14, which would drag the map down (by
    # 13-44 % for integer images of a noise SD of 10-2): for a density ~ m^(2N - 1) in [0, q/2)
    # (chi noise), log(q/2) - 1/(2N); for a smooth residual density in (-q/2, q/2), log(q/2) - 1.
    step = quantisation_step(magnitude[..., 0])
    background_floor = np.float32(max(0.5 * step * np.exp(-0.5 / n_coils), tiny))
    residual_floor = max(0.5 * step * np.exp(-1.0), tiny)
    # the quadratic residual (weights in multiples of 1/27) moves in steps of q / 27
    mean_residual_floor = np.float32(max(residual_floor / 27.0, tiny))
    residual_floor = np.float32(residual_floor)
    log_sum = np.zeros(magnitude.shape[:3], dtype=np.float32)
    weight_sum = np.zeros(magnitude.shape[:3], dtype=np.float32)

    def accumulate(log_values, where):
        log_sum[where] += log_values
        weight_sum[where] += 1.0

    # zero-filled regions (masked or cropped by the scanner or the converter) are missing data too
    finite = np.isfinite(magnitude)
    magnitude = np.where(finite, magnitude, 0.0).astype(np.float32)
    for index in range(magnitude.shape[-1]):
        finite[..., index] &= ~zero_filled_regions(magnitude[..., index])
    smooth_log = _LogSmoother(finite.any(axis=-1), filter_sigma_voxels, filter_sigma_mm, np.log(sigma_global))
    triplets = [tuple(train[i : i + 3]) for train in (echo_trains or ()) for i in range(len(train) - 2)]
    # the quadratic residual of a face voxel would fit padded copies of itself (too small)
    full_neighbourhood = np.zeros(magnitude.shape[:3], dtype=bool)
    full_neighbourhood[tuple(slice(1, -1) if n >= 3 else slice(None) for n in magnitude.shape[:3])] = True
    # per image, the voxels of quadratic residuals: flat indices, log samples, local energy
    quadratic_samples = []
    for index in range(magnitude.shape[-1]):
        image = magnitude[..., index]
        # (the mirror mode keeps the voxel's own value out of the padding at the faces)
        local_mean = ndimage.uniform_filter(image, neighbourhood, mode="mirror")
        # Air is told by the mean of the voxel's neighbours, without the voxel: a mean holding it
        # keeps the voxels whose own noise fell low wherever the threshold cuts into the air's law
        # (air noisier than sigma_global), and their log then reads low (-5 % in the air beside the
        # 2 mm phantom's head, where the g-factor raises the noise by 10-20 %). The signal regime
        # keeps the full mean: the quadratic residual is orthogonal to it, not to the neighbours'.
        n_neighbourhood = neighbourhood**3
        around = local_mean * n_neighbourhood - image
        background = finite[..., index] & (around < (n_neighbourhood - 1) * background_snr * floor)
        accumulate(np.log(np.maximum(image[background], background_floor)) - background_offset, background)
        if not triplets:
            # only where the image is flat: at edges the residual holds anatomy, not noise
            slope = np.sqrt(sum(np.square(g) for g in np.gradient(local_mean)))
            flat = slope < 0.5 * sigma_global
            signal = finite[..., index] & flat & (local_mean > signal_snr * floor) & full_neighbourhood
            residual = ndimage.convolve(image, _QUADRATIC_RESIDUAL, mode="nearest")
            values = np.log(np.maximum(np.abs(residual[signal]), mean_residual_floor)) - quadratic_offset
            accumulate(values, signal)
            energy = ndimage.uniform_filter(np.square(residual), 3, mode="nearest")[signal]
            quadratic_samples.append((np.flatnonzero(signal), values, energy))
    second_difference_offset = -0.5 * (np.euler_gamma + np.log(2.0)) + 0.5 * np.log(6.0)
    for first, middle, last in triplets:
        # the last echo has the least signal: all three are above the Gaussian threshold
        local_mean = ndimage.uniform_filter(magnitude[..., last], neighbourhood, mode="nearest")
        signal = finite[..., [first, middle, last]].all(axis=-1) & (local_mean > signal_snr * floor)
        residual = magnitude[..., first] - 2.0 * magnitude[..., middle] + magnitude[..., last]
        accumulate(np.log(np.maximum(np.abs(residual[signal]), residual_floor)) - second_difference_offset, signal)
    if not weight_sum.any():
        raise ValueError("no voxel is clearly signal or clearly background: cannot estimate the noise map")
    # every sample counts once: the plane is fitted to the samples, not to each voxel's mean
    smoothed = smooth_log(log_sum, weight_sum)
    if quadratic_samples:
        # Structure a quadratic does not follow (the edges of bSSFP bands, vessels) gives residuals
        # whose local energy stands far above the noise: judged against the map so far, those
        # samples go and the map is made again, until none goes (the first map, raised by them,
        # lets the weaker ones through). Noise alone exceeds 3 times its expected energy over 27
        # voxels with a probability of about 1e-7.
        flat_log_sum, flat_weight_sum = log_sum.reshape(-1), weight_sum.reshape(-1)
        kept = [np.ones(voxels.size, dtype=bool) for voxels, _, _ in quadratic_samples]
        for _ in range(_MAX_REJECTION_PASSES):
            expected_energy = (_QUADRATIC_RESIDUAL_POWER * np.exp(2.0 * smoothed)).reshape(-1)
            changed = False
            for (voxels, values, energy), keep in zip(quadratic_samples, kept):
                structured = keep & (energy > _MAX_ENERGY_RATIO * expected_energy[voxels])
                if structured.any():
                    flat_log_sum[voxels[structured]] -= values[structured]
                    flat_weight_sum[voxels[structured]] -= 1.0
                    keep &= ~structured
                    changed = True
            if not changed:
                break
            smoothed = smooth_log(log_sum, weight_sum)
    return np.exp(smoothed).astype(np.float32)


def _quadratic_residual_kernel():
    """Filter giving a voxel minus the least-squares quadratic of its 3x3x3 neighbourhood at it."""
    offsets = np.array(list(np.ndindex(3, 3, 3)), dtype=float) - 1.0
    x, y, z = offsets.T
    design = np.stack([np.ones(27), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], axis=1)
    kernel = -(design @ np.linalg.pinv(design))[13]
    kernel[13] += 1.0
    return kernel.reshape(3, 3, 3).astype(np.float32)


_QUADRATIC_RESIDUAL = _quadratic_residual_kernel()
#: Its sum of squares (20/27): the residual's variance over the noise's.
_QUADRATIC_RESIDUAL_POWER = float(np.sum(_QUADRATIC_RESIDUAL.astype(np.float64) ** 2))
#: Local energy of the quadratic residual over its noise expectation beyond which it is structure.
_MAX_ENERGY_RATIO = 3.0
#: Passes of that rejection at most.
_MAX_REJECTION_PASSES = 4
#: Prior SD of the slope of the log noise map (1/mm): 10 % per cm. Noise maps (coil sensitivities,
#: g-factor) change over centimetres; steeper slopes still come through where the samples show them.
_LOG_SLOPE_PRIOR_PER_MM = 0.01
#: Variance of one log sample about log(sigma): pi^2 / 8 (1.23) for residuals, pi^2 / 24 (0.41) for
#: Rayleigh air.
_LOG_SAMPLE_VARIANCE = 1.0


class MagnitudeMeanTable:
    """Fast evaluation of ``E[M]/sigma`` and its slope as functions of ``A/sigma``.

    Used inside iterative fits where the exact special functions would dominate the run time. The
    exact values and derivatives are tabulated on a uniform grid of SNR in ``[0, 40]`` and
    interpolated with cubic Hermite polynomials (error ~ h^4, below 1e-10 relative with the default
    step); above the grid the asymptotic series is used.

    Parameters
    ----------
    n_coils : int, optional
        Number of RSS-combined channels.
    step : float, optional
        Grid step in units of SNR.
    """

    def __init__(self, n_coils=1, *, step=0.01):
        self.n_coils = _check_n_coils(n_coils)
        self.step = float(step)
        self.n_nodes = int(round(_ASYMPTOTIC_SNR / self.step)) + 1
        nodes = np.arange(self.n_nodes) * self.step
        value = _mean_over_sigma_exact(nodes, self.n_coils)
        slope = _mean_derivative_exact(nodes, self.n_coils) * self.step
        y0, y1, m0, m1 = value[:-1], value[1:], slope[:-1], slope[1:]
        # Cubic Hermite interpolant on each interval as a polynomial in the local coordinate t.
        self._coefficients = (y0, m0, -3 * y0 - 2 * m0 + 3 * y1 - m1, 2 * y0 + m0 - 2 * y1 + m1)

    def _interpolate(self, snr):
        position = snr * (1.0 / self.step)
        # where() also maps NaN to a valid index; t stays NaN so the result is NaN.
        index = np.where(position < self.n_nodes - 2, position, self.n_nodes - 2).astype(np.intp)
        t = position - index
        c0, c1, c2, c3 = (np.take(c, index) for c in self._coefficients)
        value = ((c3 * t + c2) * t + c1) * t + c0
        slope = ((3.0 * c3 * t + 2.0 * c2) * t + c1) * (1.0 / self.step)
        return value, slope

    def __call__(self, snr):
        """Return ``(E[M]/sigma, dE[M]/dA)`` at ``snr = A/sigma`` (array; the sign is ignored)."""
        snr = np.abs(np.asarray(snr, dtype=float))
        large = snr > _ASYMPTOTIC_SNR
        n_large = np.count_nonzero(large)
        if n_large == 0:
            return self._interpolate(snr)
        if n_large == snr.size:
            return (
                _asymptotic_series(snr, self.n_coils),
                _asymptotic_series(snr, self.n_coils, derivative=True),
            )
        value = np.empty_like(snr)
        slope = np.empty_like(snr)
        small = ~large
        value[small], slope[small] = self._interpolate(snr[small])
        snr_large = snr[large]
        value[large] = _asymptotic_series(snr_large, self.n_coils)
        slope[large] = _asymptotic_series(snr_large, self.n_coils, derivative=True)
        return value, slope
