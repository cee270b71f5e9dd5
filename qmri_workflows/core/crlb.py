r"""Cramér-Rao lower bounds for R2* estimation.

For Gaussian noise of standard deviation :math:`\sigma` on each magnitude sample (the high-SNR limit
of Rician / non-central chi noise), the Fisher information of the ESTATICS model
:math:`S_{c,e} = S_{0,c} \exp(-R_2^* TE_{c,e})` is :math:`F = J^T J / \sigma^2`. Eliminating the
intercepts :math:`S_{0,c}` (Schur complement of the arrow-shaped matrix) gives the information on
R2* alone:

.. math::

    I_{R_2^*} = \frac{1}{\sigma^2} \sum_c S_{0,c}^2
        \left[ \sum_e TE_{c,e}^2 E_{c,e}^2
        - \frac{\left(\sum_e TE_{c,e} E_{c,e}^2\right)^2}{\sum_e E_{c,e}^2} \right],
    \qquad E_{c,e} = \exp(-R_2^* TE_{c,e}),

and :math:`\mathrm{SD}(\hat R_2^*) \geq I_{R_2^*}^{-1/2}`. Each contrast contributes a weighted
variance of its echo times, so contrasts add information on R2* without sharing intercepts.

References
----------
.. [1] Kay SM. Fundamentals of Statistical Signal Processing, Volume I: Estimation Theory.
   Prentice Hall; 1993. Chapter 3.
.. [2] Weiskopf N, Callaghan MF, Josephs O, Lutti A, Mohammadi S. Estimating the apparent
   transverse relaxation time (R2*) from images with different contrasts (ESTATICS) reduces motion
   artifacts. Front Neurosci. 2014;8:278. doi:10.3389/fnins.2014.00278
.. [3] Cavassila S, Deval S, Huegen C, van Ormondt D, Graveron-Demilly D. Cramér-Rao bounds: an
   evaluation tool for quantitation. NMR Biomed. 2001;14(4):278-283. doi:10.1002/nbm.701
"""

import numpy as np

__all__ = [
    "r2star_crlb",
    "estatics_crlb",
    "estatics_fisher_information",
    "estatics_intercept_covariance",
    "estatics_r2star_information",
]


def _prepare(s0, r2star, echo_times, sigma):
    s0 = np.asarray(s0, dtype=float)
    if s0.ndim < 1:
        raise ValueError(f"s0 must have shape (..., n_contrast), got shape {s0.shape}")
    n_contrast = s0.shape[-1]
    echo_times = _contrast_echo_times(echo_times, n_contrast, s0.shape)
    sigma = np.asarray(sigma, dtype=float)
    if np.any(~(sigma > 0)):
        raise ValueError(f"sigma must be positive and finite, got minimum {np.nanmin(sigma)!r}")
    r2star = np.asarray(r2star, dtype=float)
    return s0, r2star, echo_times, sigma


def _contrast_echo_times(echo_times, n_contrast, s0_shape, *, per_voxel=False):
    """Echo times as (n_contrast, n_echo), or (..., n_contrast, n_echo) when ``per_voxel``."""
    echo_times = np.asarray(echo_times, dtype=float)
    if echo_times.ndim == 1:
        echo_times = np.broadcast_to(echo_times, (n_contrast, echo_times.size))
    if echo_times.ndim < 2 or (echo_times.ndim > 2 and not per_voxel) or echo_times.shape[-2] != n_contrast:
        expected = "(..., " if per_voxel else "("
        raise ValueError(
            f"echo_times must have shape (n_echo,) or {expected}{n_contrast}, n_echo) for s0 of shape "
            f"{s0_shape}, got {echo_times.shape}"
        )
    return echo_times


def estatics_fisher_information(s0, r2star, echo_times, sigma):
    """Full Fisher information matrix of (S0_1, ..., S0_C, R2*) under Gaussian noise.

    Parameters
    ----------
    s0, r2star, echo_times, sigma
        As in :func:`estatics_crlb`.

    Returns
    -------
    fisher : ndarray, shape (..., n_contrast + 1, n_contrast + 1)
        Parameter order: the C intercepts, then R2*. Missing (NaN) echoes contribute nothing.
    """
    s0, r2star, echo_times, sigma = _prepare(s0, r2star, echo_times, sigma)
    n_contrast = s0.shape[-1]
    valid = np.isfinite(echo_times)
    te = np.where(valid, echo_times, 0.0)
    decay = np.where(valid, np.exp(-np.asarray(r2star)[..., None, None] * te), 0.0)
    lead = np.broadcast_shapes(s0.shape[:-1], r2star.shape, sigma.shape)
    jac = np.zeros(lead + (n_contrast, te.shape[-1], n_contrast + 1))
    for contrast in range(n_contrast):
        jac[..., contrast, :, contrast] = decay[..., contrast, :]
    jac[..., -1] = -s0[..., None] * te * decay
    jac = jac.reshape(lead + (-1, n_contrast + 1))
    return np.einsum("...ki,...kj->...ij", jac, jac) / (sigma**2)[..., None, None]


def estatics_crlb(s0, r2star, echo_times, sigma):
    """Cramér-Rao bound on the SD of the shared R2* of the ESTATICS model.

    Parameters
    ----------
    s0 : array_like, shape (..., n_contrast)
        Intercepts at TE = 0 (signal units).
    r2star : array_like, shape (...)
        R2* in 1/s.
    echo_times : array_like, shape (n_echo,) or (n_contrast, n_echo)
        Echo times in seconds (NaN marks a missing echo).
    sigma : float or array_like
        Noise SD of each magnitude sample (Gaussian, high-SNR), broadcastable to the leading shape.

    Returns
    -------
    sd : ndarray, shape (...)
        Lower bound on the standard deviation of an unbiased R2* estimate, in 1/s (inf where the
        model is not identifiable).

    References
    ----------
    .. [1] Kay SM. Fundamentals of Statistical Signal Processing, Vol. I. 1993.
    .. [2] Weiskopf N et al. Front Neurosci. 2014;8:278.
    """
    s0, r2star, echo_times, sigma = _prepare(s0, r2star, echo_times, sigma)
    information = estatics_r2star_information(s0, r2star, echo_times) / sigma**2
    with np.errstate(divide="ignore"):
        return np.where(information > 0, 1.0 / np.sqrt(np.maximum(information, 1e-300)), np.inf)


def estatics_r2star_information(s0, r2star, echo_times):
    r"""Fisher information on R2* alone of the ESTATICS model, for unit noise SD.

    The intercepts are eliminated (Schur complement, see the module notes), so this is
    :math:`\sigma^2 / \mathrm{CRLB}^2`, the reciprocal of the R2* element of :math:`(J^T J)^{-1}`
    at any point of the model: divided into a fit's residual noise SD it gives the asymptotic
    standard error of R2* (:func:`qmri_workflows.core.r2star.fit_estatics` with
    ``return_stderr=True``).

    Parameters
    ----------
    s0, r2star
        As in :func:`estatics_crlb`.
    echo_times : array_like, shape (n_echo,), (n_contrast, n_echo) or (..., n_contrast, n_echo)
        Echo times in seconds; NaN marks a missing sample. With leading dimensions (broadcast
        against those of ``s0``), each voxel has its own missing samples (non-finite magnitudes).

    Returns
    -------
    information : ndarray, shape (...)
        In (signal units x s)^2; 0 where R2* is not identifiable (no contrast with two echoes).
    """
    s0 = np.asarray(s0, dtype=float)
    if s0.ndim < 1:
        raise ValueError(f"s0 must have shape (..., n_contrast), got shape {s0.shape}")
    echo_times = _contrast_echo_times(echo_times, s0.shape[-1], s0.shape, per_voxel=True)
    r2star = np.asarray(r2star, dtype=float)
    valid = np.isfinite(echo_times)
    te = np.where(valid, echo_times, 0.0)
    decay_sq = np.where(valid, np.exp(-2.0 * r2star[..., None, None] * te), 0.0)
    te, decay_sq = np.broadcast_arrays(te, decay_sq)
    # einsum: sums over the short echo axis without temporaries (numpy's sum is slow there).
    sum_e2 = decay_sq.sum(axis=-1)
    te_e2 = te * decay_sq
    sum_te_e2 = te_e2.sum(axis=-1)
    sum_te2_e2 = np.einsum("...e,...e->...", te_e2, te)
    safe = np.where(sum_e2 > 0, sum_e2, 1.0)
    # Weighted variance of each contrast's echo times; clipped at 0 against rounding.
    spread = np.maximum(sum_te2_e2 - sum_te_e2**2 / safe, 0.0)
    return (s0**2 * spread).sum(axis=-1)


def estatics_intercept_covariance(s0, r2star, echo_times, *, sigma=None, r2star_stderr=None):
    r"""Asymptotic covariance of the TE = 0 intercepts of an ESTATICS fit (shared R2*).

    The intercept block of the inverse Fisher information, in closed form (Sherman-Morrison on the
    arrow-shaped matrix of the module notes): with, per contrast, :math:`a_c = \sum_e E_{c,e}^2`
    and :math:`u_c = S_{0,c} \sum_e TE_{c,e} E_{c,e}^2 / a_c`,

    .. math::

        \mathrm{Cov}(\hat S_{0}) = \sigma^2 \left[\mathrm{diag}(1/a_c)
            + u u^T / I_{R_2^*}\right],

    :math:`I_{R_2^*}` the R2* information for unit noise (:func:`estatics_r2star_information`).
    The noise SD is ``sigma``, or the one the fit used for its R2* standard error:
    :math:`\sigma = \mathrm{SE}(R_2^*)\sqrt{I_{R_2^*}}` (the residuals, or the air), so that
    the intercepts inherit the fit's own noise level, denoised data included.

    Parameters
    ----------
    s0 : array_like, shape (..., n_contrast)
        Fitted intercepts.
    r2star : array_like, shape (...)
        Fitted R2* (1/s).
    echo_times : array_like, shape (n_echo,) or (n_contrast, n_echo)
        Echo times (s); NaN marks a missing echo.
    sigma : array_like, optional
        Noise SD of each magnitude sample (scalar or of the leading shape).
    r2star_stderr : array_like, optional
        Standard error of R2* (1/s) of the fit, when ``sigma`` is not given.

    Returns
    -------
    numpy.ndarray, shape (..., n_contrast, n_contrast)
        NaN where the noise is unknown or R2* not identifiable.
    """
    if (sigma is None) == (r2star_stderr is None):
        raise ValueError("give exactly one of sigma and r2star_stderr")
    s0 = np.asarray(s0, dtype=float)
    r2star = np.asarray(r2star, dtype=float)
    n_contrast = s0.shape[-1] if s0.ndim else 0
    echo_times = _contrast_echo_times(echo_times, n_contrast, s0.shape)
    valid = np.isfinite(echo_times)
    te = np.where(valid, echo_times, 0.0)
    decay_sq = np.where(valid, np.exp(-2.0 * r2star[..., None, None] * te), 0.0)
    sum_e2 = decay_sq.sum(axis=-1)
    sum_te_e2 = (te * decay_sq).sum(axis=-1)
    information = estatics_r2star_information(s0, r2star, echo_times)
    with np.errstate(divide="ignore", invalid="ignore"):
        if sigma is not None:
            variance = np.asarray(sigma, dtype=float) ** 2
        else:
            variance = np.asarray(r2star_stderr, dtype=float) ** 2 * information
        u = s0 * sum_te_e2 / sum_e2
        covariance = u[..., :, None] * u[..., None, :] / information[..., None, None]
        covariance = covariance + np.eye(n_contrast) / sum_e2[..., None, :]
        covariance = np.asarray(variance)[..., None, None] * covariance
    identifiable = (information > 0) & np.all(sum_e2 > 0, axis=-1)
    return np.where(identifiable[..., None, None], covariance, np.nan)


def r2star_crlb(s0, r2star, echo_times, sigma):
    """Cramér-Rao bound on the SD of R2* from a single multi-echo contrast.

    Parameters
    ----------
    s0 : array_like
        Signal at TE = 0.
    r2star : array_like
        R2* in 1/s, broadcastable with ``s0``.
    echo_times : array_like, shape (n_echo,)
        Echo times in seconds.
    sigma : float or array_like
        Noise SD of each magnitude sample (Gaussian, high-SNR).

    Returns
    -------
    sd : ndarray
        Lower bound on the SD of R2* in 1/s. For two echoes it equals
        ``sigma sqrt(1/S1^2 + 1/S2^2) / (TE2 - TE1)``.

    References
    ----------
    .. [1] Kay SM. Fundamentals of Statistical Signal Processing, Vol. I. 1993.
    """
    s0 = np.asarray(s0, dtype=float)
    echo_times = np.asarray(echo_times, dtype=float)
    if echo_times.ndim != 1:
        raise ValueError(f"echo_times must have shape (n_echo,), got {echo_times.shape}")
    return estatics_crlb(s0[..., None], r2star, echo_times, sigma)
