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
"""

import numpy as np
from scipy import special

__all__ = [
    "magnitude_mean",
    "magnitude_mean_derivative",
    "magnitude_second_moment",
    "correct_noise_floor",
    "estimate_sigma_background",
    "MagnitudeMeanTable",
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
    if np.any(~(sigma > 0)):
        raise ValueError(f"sigma must be positive and finite, got min {np.nanmin(sigma)!r}")
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
    inverse_z = 2.0 / (snr * snr)
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
    if method == "second_moment":
        return float(np.sqrt(np.mean(samples**2) / (2.0 * n_coils)))
    if method == "mean":
        return float(np.mean(samples) / _mean_prefactor(n_coils))
    if method == "median":
        from scipy import stats

        return float(np.median(samples) / np.sqrt(stats.chi2.ppf(0.5, 2 * n_coils)))
    raise ValueError(f"method must be 'second_moment', 'mean' or 'median', got {method!r}")


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
