r"""Effective transverse relaxation rate R2* from multi-echo gradient-echo magnitudes.

Signal model: :math:`S(TE) = S_0 \exp(-R_2^* TE)`, with TE in seconds and R2* in 1/s. The joint
ESTATICS model (Weiskopf et al. 2014) fits several contrasts (e.g. one per flip angle, or MT on/off)
with one shared R2* and one intercept per contrast:
:math:`S_c(TE) = S_{0,c} \exp(-R_2^* TE)`.

Estimators
----------
* Log-linear least squares on :math:`\log S`. Weighted (``weighted=True``): weights proportional
  to :math:`S^2`, the inverse variance of :math:`\log S` under Gaussian noise at high SNR. The first
  pass weights with the measured magnitudes; the following passes use the model-predicted
  magnitudes, which removes the small bias caused by the correlation between the measured weights
  and the noise and makes the estimator asymptotically efficient (Veraart et al. 2013).
* Non-linear least squares (vectorised Levenberg-Marquardt, initialised by the log-linear fit). With
  ``sigma`` given, the fitted model is the expected magnitude :math:`E[M]` of a Rician
  (``n_coils = 1``, Gudbjartsson & Patz 1995) or non-central chi variable (RSS of ``n_coils``
  channels, Constantinides et al. 1997) rather than :math:`S` itself, so late echoes near the noise
  floor do not bias R2* low. The exact mean is used (not the second-moment form
  :math:`\sqrt{S^2 + 2N\sigma^2}`), because a least-squares fit of the magnitudes estimates the
  magnitude's first moment: the second-moment form overstates :math:`E[M]` near the floor (by 13 %
  for pure noise with ``N = 1``) and would bias R2* high there.

Conventions: voxels outside ``mask`` receive 0 for S0 and R2*; voxels where the fit is
undetermined (fewer than two usable echo times in every contrast; or non-convergent values that are
not finite) receive NaN, as does the intercept of a contrast without a usable sample. NaN or
infinite values (in the signal or in the echo times) mark a missing sample for every estimator,
voxel by voxel. The log-linear fits also give zero weight to zero and negative magnitudes (their
logarithm is undefined; this is the limit of clipping them at a tiny positive value with weight
~ S^2), whereas the NLS fits treat every finite magnitude as data.

References
----------
.. [1] Weiskopf N, Callaghan MF, Josephs O, Lutti A, Mohammadi S. Estimating the apparent
   transverse relaxation time (R2*) from images with different contrasts (ESTATICS) reduces motion
   artifacts. Front Neurosci. 2014;8:278. doi:10.3389/fnins.2014.00278
.. [2] Gudbjartsson H, Patz S. The Rician distribution of noisy MRI data. Magn Reson Med.
   1995;34(6):910-914. doi:10.1002/mrm.1910340618
.. [3] Constantinides CD, Atalar E, McVeigh ER. Signal-to-noise measurements in magnitude images
   from NMR phased arrays. Magn Reson Med. 1997;38(5):852-857. doi:10.1002/mrm.1910380524
.. [4] Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B. Weighted linear least squares
   estimation of diffusion MRI parameters: strengths, limitations, and pitfalls. NeuroImage.
   2013;81:335-346. doi:10.1016/j.neuroimage.2013.05.028
.. [5] Marquardt DW. An algorithm for least-squares estimation of nonlinear parameters. J Soc Ind
   Appl Math. 1963;11(2):431-441. doi:10.1137/0111030
"""

import numpy as np

from ._chunks import apply_in_chunks, check_mask
from .crlb import estatics_r2star_information
from .noise import MagnitudeMeanTable, _check_n_coils

__all__ = [
    "MIN_RESIDUAL_DOF",
    "T2STAR_MIN_SIGNIFICANCE",
    "fit_estatics",
    "fit_r2star_loglinear",
    "fit_r2star_nonlinear",
    "t2star_where_significant",
]

# Echo times are in seconds; anything above this is certainly a unit error (ms passed as s).
_MAX_PLAUSIBLE_TE = 1.0
# Exponents are clipped to keep exp() finite for diverging voxels.
_MAX_EXPONENT = 600.0
#: Largest decay exponent R2* x (first echo time) that the non-linear fit explores. A voxel without
#: signal (noise only, or a signal gone before the first echo) may have no minimum: with the
#: noise-floor model its fit runs off along S0 exp(-R2* TE1) -> 0 towards infinite R2*, and its
#: intercept, extrapolated from the first echo by exp(R2* TE1), means nothing. Beyond e^10 (22 000
#: fold; R2* = 5000 1/s at TE1 = 2 ms, 2000 1/s at 5 ms: far beyond tissue, haemorrhage included)
#: no measurable signal is left at the first echo, so the fit stops there and a voxel that ends
#: within one e-fold of this edge gets NaN (undetermined), as a voxel without data.
MAX_DECAY_BEFORE_FIRST_ECHO = 10.0

T2STAR_MIN_SIGNIFICANCE = 2.0
"""T2* is written where R2* exceeds this many standard errors (about a one-sided 2.3 % test)."""

MIN_RESIDUAL_DOF = 4
"""Fewest residual degrees of freedom for the standard error to use the voxel's own noise estimate.

With fewer, the residual SD is too erratic (with one, a 2-standard-error test passes 15 % of
zero rates, some with a tiny standard error and an absurd T2*); a noise SD measured elsewhere (the
air) is used instead when given.
"""


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------
def _check_joint_inputs(signals, echo_times):
    """Validate ``signals[..., n_contrast, n_echo]`` and echo times; return TE as (C, E)."""
    signals = np.asarray(signals)
    if signals.ndim < 2:
        raise ValueError(f"signals must have shape (..., n_contrast, n_echo), got shape {signals.shape}")
    n_contrast, n_echo = signals.shape[-2:]
    echo_times = np.asarray(echo_times, dtype=float)
    if echo_times.ndim == 1:
        echo_times = np.broadcast_to(echo_times, (n_contrast, echo_times.size))
    if echo_times.shape != (n_contrast, n_echo):
        raise ValueError(
            f"echo_times must have shape ({n_echo},) or ({n_contrast}, {n_echo}) to match signals "
            f"of shape {signals.shape}, got {echo_times.shape}"
        )
    finite_te = echo_times[np.isfinite(echo_times)]
    if finite_te.size and (finite_te.max() > _MAX_PLAUSIBLE_TE or finite_te.min() < 0):
        raise ValueError(
            f"echo_times must be non-negative and in seconds, got range [{finite_te.min()}, {finite_te.max()}]"
        )
    if np.unique(finite_te).size < 2:
        raise ValueError(f"at least two distinct finite echo times are needed, got {echo_times}")
    return signals, echo_times


def _check_sigma_map(sigma, leading_shape):
    """Return sigma as a scalar or an array of ``leading_shape``; None passes through."""
    if sigma is None:
        return None
    sigma = np.asarray(sigma, dtype=float)
    if np.any(~(sigma > 0)):
        raise ValueError(f"sigma must be positive and finite, got minimum {np.nanmin(sigma)!r}")
    if sigma.ndim == 0:
        return sigma
    try:
        return np.broadcast_to(sigma, leading_shape)
    except ValueError:
        raise ValueError(
            f"sigma must be a scalar or broadcastable to the leading shape {leading_shape}, got shape {sigma.shape}"
        ) from None


# --------------------------------------------------------------------------------------------
# Log-linear (weighted) least squares, shared slope across contrasts
# --------------------------------------------------------------------------------------------
def _shared_slope_wls(log_signal, echo_times, weights):
    """Weighted LS of ``log S[n, c, e] = b[n, c] - R[n] TE[c, e]`` (one slope, C intercepts).

    Eliminating each intercept leaves a regression on the TE and log S deviations from their
    weighted per-contrast means, solved in closed form.
    """
    weight_sum = weights.sum(axis=-1)
    safe_sum = np.where(weight_sum > 0, weight_sum, 1.0)
    te_mean = (weights * echo_times).sum(axis=-1) / safe_sum
    log_mean = (weights * log_signal).sum(axis=-1) / safe_sum
    te_dev = echo_times - te_mean[..., None]
    weighted_te_dev = weights * te_dev
    sxx = (weighted_te_dev * te_dev).sum(axis=(-2, -1))
    sxy = (weighted_te_dev * (log_signal - log_mean[..., None])).sum(axis=(-2, -1))
    # Relative threshold so that single-TE voxels (sxx is rounding noise) are flagged.
    scale = (weights * echo_times**2).sum(axis=(-2, -1))
    determined = sxx > 1e-12 * scale
    r2star = np.where(determined, -sxy / np.where(determined, sxx, 1.0), 0.0)
    log_s0 = log_mean + r2star[:, None] * te_mean
    has_data = weight_sum > 0
    return log_s0, r2star, determined, has_data


def _loglinear_chunk(signal, echo_times, *, weighted, n_iter, noise_sd=None, with_stderr=False):
    """Log-linear fit of one chunk: signal (n, C, E) -> s0 (n, C), r2star (n)[, stderr (n)].

    Undetermined voxels get NaN; so do the intercepts of contrasts without a usable sample.
    """
    signal = signal.astype(np.float64, copy=False)
    te = np.where(np.isfinite(echo_times), echo_times, 0.0)
    valid = (signal > 0) & np.isfinite(signal) & np.isfinite(echo_times)
    # Missing samples get zero weight; the clipped value only keeps log() finite.
    log_signal = np.log(np.where(valid, signal, 1.0))
    if weighted:
        # Weights ~ S^2, normalised per voxel (scale-free) to avoid under/overflow.
        peak = np.where(valid, log_signal, -np.inf).max(axis=(-2, -1), initial=-np.inf)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        weights = np.where(valid, np.exp(2.0 * (log_signal - peak[:, None, None])), 0.0)
    else:
        weights = valid.astype(np.float64)
    log_s0, r2star, determined, has_data = _shared_slope_wls(log_signal, te, weights)
    if weighted:
        for _ in range(max(int(n_iter), 1) - 1):
            predicted = log_s0[..., None] - r2star[:, None, None] * te
            peak = np.where(valid, predicted, -np.inf).max(axis=(-2, -1), initial=-np.inf)
            peak = np.where(np.isfinite(peak), peak, 0.0)
            exponent = np.clip(2.0 * (predicted - peak[:, None, None]), -_MAX_EXPONENT, 0.0)
            weights = np.where(valid, np.exp(exponent), 0.0)
            log_s0, r2star, determined, has_data = _shared_slope_wls(log_signal, te, weights)
    s0 = np.exp(np.clip(log_s0, -_MAX_EXPONENT, _MAX_EXPONENT))
    ok = determined & np.isfinite(r2star)
    s0 = np.where(ok[:, None] & has_data & np.isfinite(s0), s0, np.nan)
    r2star = np.where(ok, r2star, np.nan)
    if not with_stderr:
        return s0, r2star
    decay = np.exp(np.clip(-np.nan_to_num(r2star)[:, None, None] * te, -_MAX_EXPONENT, _MAX_EXPONENT))
    residual = np.where(valid, signal - np.nan_to_num(s0)[..., None] * decay, 0.0).reshape(signal.shape[0], -1)
    residual_ss = np.einsum("ij,ij->i", residual, residual)
    stderr = _r2star_standard_error(s0, r2star, residual_ss, echo_times, valid, noise_sd)
    return s0, r2star, stderr


def _r2star_standard_error(s0, r2star, residual_ss, echo_times, valid, noise_sd):
    """Standard error of R2* per voxel: noise SD over the square root of the R2* information.

    The noise SD is the RMS of the residuals over the degrees of freedom left by the fit (valid
    samples minus one intercept per contrast with data, minus R2*) where there are at least
    :data:`MIN_RESIDUAL_DOF`; ``noise_sd`` where there are fewer, if given (the residual RMS
    otherwise, NaN without any residual). NaN where R2* is NaN or not identifiable.
    """
    n_voxels = valid.shape[0]
    n_samples = np.count_nonzero(valid.reshape(n_voxels, -1), axis=-1)
    n_intercepts = np.count_nonzero(valid.any(axis=-1), axis=-1)
    dof = n_samples - n_intercepts - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        residual_sd = np.sqrt(residual_ss / np.where(dof > 0, dof, np.nan))
    if noise_sd is not None:
        noise_sd = np.asarray(noise_sd, dtype=np.float64).reshape(-1) if np.ndim(noise_sd) else noise_sd
        residual_sd = np.where(dof >= MIN_RESIDUAL_DOF, residual_sd, noise_sd)
    # Each voxel's own missing samples (non-finite or, for log fits, non-positive magnitudes).
    voxel_echo_times = np.where(valid, echo_times, np.nan)
    information = estatics_r2star_information(np.nan_to_num(s0), np.nan_to_num(r2star), voxel_echo_times)
    identifiable = (information > 0) & np.isfinite(r2star)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(identifiable, residual_sd / np.sqrt(np.where(identifiable, information, 1.0)), np.nan)


# --------------------------------------------------------------------------------------------
# Non-linear least squares (vectorised Levenberg-Marquardt), optional noise-floor model
# --------------------------------------------------------------------------------------------
class _MagnitudeModel:
    """Predicted magnitude and its slope dPred/dA for amplitude A (noise floor optional)."""

    def __init__(self, n_coils, with_floor):
        self.with_floor = with_floor
        self.table = MagnitudeMeanTable(n_coils) if with_floor else None

    def __call__(self, amplitude, sigma):
        if not self.with_floor:
            return amplitude, np.ones_like(amplitude)
        value, slope = self.table(amplitude / sigma)
        return sigma * value, slope


def _residuals_and_jacobian(s0, r2star, signal, te, valid, sigma, model):
    """Residuals, Jacobian columns wrt s0 and r2star (each (n, C, E)) and cost (n,)."""
    decay = np.exp(np.clip(-r2star[:, None, None] * te, -_MAX_EXPONENT, _MAX_EXPONENT))
    amplitude = s0[..., None] * decay
    predicted, slope = model(amplitude, sigma)
    residual = np.where(valid, signal - predicted, 0.0)
    jac_s0 = np.where(valid, slope * decay, 0.0)
    jac_r2 = np.where(valid, -slope * amplitude * te, 0.0)
    cost = (residual * residual).sum(axis=(-2, -1))
    return residual, jac_s0, jac_r2, cost


def _lm_step(residual, jac_s0, jac_r2, damping):
    """Solve the damped normal equations of the arrow-shaped (C + 1) system per voxel."""
    h_cc = (jac_s0 * jac_s0).sum(axis=-1)  # (n, C): intercepts decouple from each other
    h_cr = (jac_s0 * jac_r2).sum(axis=-1)  # (n, C)
    h_rr = (jac_r2 * jac_r2).sum(axis=(-2, -1))  # (n,)
    g_c = (jac_s0 * residual).sum(axis=-1)
    g_r = (jac_r2 * residual).sum(axis=(-2, -1))
    has_data = h_cc > 0
    d_c = np.where(has_data, h_cc * (1.0 + damping[:, None]), 1.0)
    d_r = h_rr * (1.0 + damping)
    schur = d_r - (h_cr**2 / d_c).sum(axis=-1)
    rhs = g_r - (h_cr * g_c / d_c).sum(axis=-1)
    safe = np.abs(schur) > 0
    delta_r = np.where(safe, rhs / np.where(safe, schur, 1.0), 0.0)
    delta_c = np.where(has_data, (g_c - h_cr * delta_r[:, None]) / d_c, 0.0)
    return delta_c, delta_r


def _levenberg_marquardt(s0, r2star, data, te, valid, sigma, *, model, max_iter, tol, max_r2star):
    """Vectorised Levenberg-Marquardt from (s0, r2star); returns them refined, and the final cost.

    Converged voxels are removed from the working set; one model evaluation per iteration (the
    trial point's residuals and Jacobian are kept when its step is accepted). Steps beyond
    ``max_r2star`` (per voxel) fail, as steps to negative intercepts do.
    """
    s0 = s0.copy()
    r2star = np.minimum(r2star, max_r2star)
    final_cost = np.empty(s0.shape[0])
    active = np.arange(s0.shape[0])
    a_s0, a_r2, a_data, a_valid, a_sigma, a_max = s0, r2star, data, valid, sigma, max_r2star
    damping = np.full(active.size, 1e-3)
    residual, jac_s0, jac_r2, cost = _residuals_and_jacobian(a_s0, a_r2, a_data, te, a_valid, a_sigma, model)
    for _ in range(int(max_iter)):
        if active.size == 0:
            break
        delta_c, delta_r = _lm_step(residual, jac_s0, jac_r2, damping)
        trial_s0 = a_s0 + delta_c
        trial_r2 = a_r2 + delta_r
        # A wild step may overflow: its cost is then infinite and the step fails below.
        with np.errstate(over="ignore"):
            t_residual, t_jac_s0, t_jac_r2, t_cost = _residuals_and_jacobian(
                trial_s0, trial_r2, a_data, te, a_valid, a_sigma, model
            )
        # Negative intercepts and runaway decay are outside the model's domain: failed steps.
        accept = (t_cost <= cost) & np.isfinite(t_cost) & ~(trial_s0 < 0).any(axis=-1) & (trial_r2 <= a_max)
        a_s0 = np.where(accept[:, None], trial_s0, a_s0)
        a_r2 = np.where(accept, trial_r2, a_r2)
        cost = np.where(accept, t_cost, cost)
        take = accept[:, None, None]
        residual = np.where(take, t_residual, residual)
        jac_s0 = np.where(take, t_jac_s0, jac_s0)
        jac_r2 = np.where(take, t_jac_r2, jac_r2)
        damping = np.where(accept, damping * 0.2, damping * 10.0)
        small_step = (np.abs(delta_r) <= tol * np.maximum(np.abs(a_r2), 1.0)) & (
            np.abs(delta_c) <= tol * np.abs(a_s0)
        ).all(axis=-1)
        done = (accept & small_step) | (damping > 1e12)
        if np.any(done):
            finished = active[done]
            s0[finished] = a_s0[done]
            r2star[finished] = a_r2[done]
            final_cost[finished] = cost[done]
            keep = ~done
            active = active[keep]
            a_s0, a_r2, a_data, a_valid, a_max = a_s0[keep], a_r2[keep], a_data[keep], a_valid[keep], a_max[keep]
            damping, cost = damping[keep], cost[keep]
            residual, jac_s0, jac_r2 = residual[keep], jac_s0[keep], jac_r2[keep]
            if a_sigma is not None and a_sigma.ndim:
                a_sigma = a_sigma[keep]
    # Voxels still active after max_iter keep their best point so far.
    s0[active] = a_s0
    r2star[active] = a_r2
    final_cost[active] = cost
    return s0, r2star, final_cost


def _nonlinear_chunk(signal, echo_times, sigma, *, model, max_iter, tol, with_stderr=False):
    """NLS fit of one chunk: signal (n, C, E) -> s0 (n, C), r2star (n)[, stderr (n)].

    Undetermined voxels get NaN; so do the intercepts of contrasts without a finite sample.
    """
    signal = signal.astype(np.float64, copy=False)
    n_voxels = signal.shape[0]
    valid = np.isfinite(signal) & np.isfinite(echo_times)
    te = np.where(np.isfinite(echo_times), echo_times, 0.0)
    data = np.where(valid, signal, 0.0)
    if sigma is not None:
        sigma = np.asarray(sigma, dtype=np.float64)
        sigma = sigma.reshape(-1, 1, 1) if sigma.ndim else sigma

    # Start from the log-linear WLS fit of floor-corrected magnitudes: closer to the answer.
    start_signal = data
    if sigma is not None:
        floor2 = 2.0 * model.table.n_coils * sigma**2
        start_signal = np.sqrt(np.maximum(data**2 - floor2, 0.0))
    start_signal = np.where(valid, start_signal, np.nan)
    s0, r2star = _loglinear_chunk(start_signal, echo_times, weighted=True, n_iter=2)
    unstarted = np.flatnonzero(~np.isfinite(r2star))
    if unstarted.size:
        s0[unstarted], r2star[unstarted] = _loglinear_chunk(
            np.where(valid[unstarted], data[unstarted], np.nan), echo_times, weighted=True, n_iter=2
        )
    fitted = np.isfinite(r2star)
    # The intercept of a contrast without data gets no gradient: 0 keeps it (and its step) at 0.
    s0 = np.nan_to_num(s0)
    r2star = np.nan_to_num(r2star)

    first_te = np.min(np.where(valid, te, np.inf), axis=(-2, -1))
    with np.errstate(divide="ignore"):
        max_r2star = np.where(first_te > 0, MAX_DECAY_BEFORE_FIRST_ECHO / first_te, np.inf)
    active = np.flatnonzero(fitted)
    # The residual sum of squares at the fitted values (the LM cost), for the standard error.
    residual_ss = np.full(n_voxels, np.nan)
    if active.size:
        s0[active], r2star[active], residual_ss[active] = _levenberg_marquardt(
            s0[active],
            r2star[active],
            data[active],
            te,
            valid[active],
            sigma[active] if sigma is not None and sigma.ndim else sigma,
            model=model,
            max_iter=max_iter,
            tol=tol,
            max_r2star=max_r2star[active],
        )

    with np.errstate(invalid="ignore"):
        runaway = r2star * first_te > MAX_DECAY_BEFORE_FIRST_ECHO - 1.0
    ok = fitted & np.isfinite(r2star) & np.isfinite(s0).all(axis=-1) & ~runaway
    s0 = np.where(ok[:, None] & valid.any(axis=-1), s0, np.nan)
    r2star = np.where(ok, r2star, np.nan)
    if not with_stderr:
        return s0, r2star
    stderr = _r2star_standard_error(s0, r2star, residual_ss, echo_times, valid, sigma)
    return s0, r2star, stderr


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def fit_estatics(
    signals,
    echo_times,
    *,
    sigma=None,
    n_coils=1,
    method="wls",
    mask=None,
    weighted=True,
    n_iter=2,
    max_iter=30,
    tol=1e-6,
    chunk_size=None,
    n_jobs=1,
    return_stderr=False,
):
    r"""Joint R2* fit across contrasts (ESTATICS): one shared R2*, one intercept per contrast.

    Parameters
    ----------
    signals : ndarray, shape (..., n_contrast, n_echo)
        Magnitudes (any float dtype; computed in float64 chunk by chunk). Contrasts with fewer
        echoes are NaN-padded (NaN in ``signals`` or in ``echo_times``); any non-finite sample of
        any voxel is left out of that voxel's fit.
    echo_times : array_like, shape (n_echo,) or (n_contrast, n_echo)
        Echo times in seconds, shared or per contrast; NaN marks a missing echo.
    sigma : float or ndarray, optional
        Per-channel noise SD (scalar or of the leading shape), used by ``method="nls"`` to fit the
        expected magnitude including the noise floor, and by every method for the standard error
        (``return_stderr``) of voxels whose fit leaves fewer than :data:`MIN_RESIDUAL_DOF` residual
        degrees of freedom. The log-linear fits themselves ignore it.
    n_coils : int, optional
        Number of RSS-combined channels for the noise-floor model (1 = Rician).
    method : {"wls", "ols", "nls"}, optional
        ``"wls"``: log-linear weighted LS (weights ~ S^2, ``n_iter`` passes, the later ones with
        model-predicted weights). ``"ols"``: unweighted log-linear LS. ``"nls"``: non-linear LS
        (Levenberg-Marquardt) initialised by WLS.
    mask : ndarray of bool, optional
        Voxels to fit, of the leading shape; others are 0 in the outputs.
    weighted : bool, optional
        For ``"wls"``: False is the same as ``method="ols"``.
    n_iter : int, optional
        Number of WLS passes (1 = measured-signal weights only).
    max_iter : int, optional
        Maximum Levenberg-Marquardt iterations for ``"nls"``.
    tol : float, optional
        Relative parameter-step tolerance for ``"nls"`` convergence.
    chunk_size : int, optional
        Voxels per chunk (default 200 000 for WLS, 50 000 for NLS), bounding temporary memory to
        roughly ``chunk_size * n_contrast * n_echo * 8 bytes * 15`` per thread.
    n_jobs : int, optional
        Threads working on chunks concurrently (about 1.9x faster with 2 on 2 cores).
    return_stderr : bool, optional
        Also return the standard error of R2*.

    Returns
    -------
    s0 : ndarray, shape (..., n_contrast)
        Intercepts at TE = 0, in signal units (0 outside the mask; NaN where undetermined, and for
        a contrast without a usable sample in the voxel).
    r2star : ndarray, shape (...)
        Shared R2* in 1/s (0 outside the mask; NaN where undetermined, i.e. fewer than two usable
        echo times in every contrast, or a fit that did not stay finite; negative values are kept).
    stderr : ndarray, shape (...)
        Only with ``return_stderr``: standard error of R2* in 1/s (0 outside the mask, NaN where
        R2* is NaN or no noise level is available), see Notes.

    Notes
    -----
    The WLS solution eliminates the intercepts analytically (within-contrast regression), so the
    cost is a handful of array passes independent of the number of contrasts.

    The standard error is the asymptotic one of a least-squares fit,
    :math:`\hat\sigma / \sqrt{I_{R_2^*}}`, with :math:`I_{R_2^*}` the R2* information of the
    model at the fitted parameters over the voxel's usable samples
    (:func:`qmri_workflows.core.crlb.estatics_r2star_information`) and :math:`\hat\sigma` the
    noise SD: the RMS of the residuals (signal minus fitted magnitude, or minus its expected value
    with the noise floor of ``"nls"``) over the degrees of freedom left (usable samples minus the
    C + 1 parameters) where they are at least :data:`MIN_RESIDUAL_DOF`, else ``sigma`` when given
    (two flip angles of two or three echoes, one of up to five echoes). Residuals
    carry physiological noise and departures from a mono-exponential decay as well as thermal noise,
    and do not depend on how the receive channels were combined. At high SNR the standard error
    matches the spread of the estimates (the WLS and NLS fits reach the Cramér-Rao bound).

    References
    ----------
    .. [1] Weiskopf N, Callaghan MF, Josephs O, Lutti A, Mohammadi S. Front Neurosci. 2014;8:278.
    .. [2] Gudbjartsson H, Patz S. Magn Reson Med. 1995;34:910-914.
    .. [3] Constantinides CD, Atalar E, McVeigh ER. Magn Reson Med. 1997;38:852-857.
    """
    signals, echo_times = _check_joint_inputs(signals, echo_times)
    leading_shape = signals.shape[:-2]
    n_contrast = signals.shape[-2]
    mask = check_mask(mask, leading_shape)
    n_coils = _check_n_coils(n_coils)
    if method not in ("wls", "ols", "nls"):
        raise ValueError(f"method must be 'wls', 'ols' or 'nls', got {method!r}")
    sigma = _check_sigma_map(sigma, leading_shape)
    if method in ("wls", "ols"):
        use_weights = bool(weighted) and method == "wls"

        def chunk_function(signal_chunk, sigma_chunk):
            return _loglinear_chunk(
                signal_chunk,
                echo_times,
                weighted=use_weights,
                n_iter=n_iter,
                noise_sd=sigma_chunk,
                with_stderr=return_stderr,
            )

        default_chunk = 200_000
    else:
        model = _MagnitudeModel(n_coils, with_floor=sigma is not None)

        def chunk_function(signal_chunk, sigma_chunk):
            return _nonlinear_chunk(
                signal_chunk,
                echo_times,
                sigma_chunk,
                model=model,
                max_iter=max_iter,
                tol=tol,
                with_stderr=return_stderr,
            )

        default_chunk = 50_000
    return tuple(
        apply_in_chunks(
            chunk_function,
            [signals, sigma],
            leading_shape=leading_shape,
            output_shapes=[(n_contrast,), ()] + ([()] if return_stderr else []),
            mask=mask,
            chunk_size=default_chunk if chunk_size is None else chunk_size,
            n_jobs=n_jobs,
        )
    )


def t2star_where_significant(r2star, stderr, *, min_significance=T2STAR_MIN_SIGNIFICANCE):
    """T2* = 1 / R2* where R2* is significantly above zero, NaN elsewhere.

    A decay rate indistinguishable from zero (noise in CSF, a two-echo fit at low SNR) has an
    inverse anywhere between a fraction of a second and infinity; such values (T2* of hundreds of
    seconds, or 1e15 s) are not estimates of anything and are left NaN.

    Parameters
    ----------
    r2star : ndarray
        R2* in 1/s.
    stderr : ndarray
        Its standard error in 1/s, of the same shape (NaN where unknown).
    min_significance : float, optional
        R2* must exceed ``min_significance * stderr`` (and 0).

    Returns
    -------
    t2star : ndarray
        T2* in s; NaN where R2* is not positive, not above ``min_significance`` standard errors,
        or either input is NaN.
    """
    r2star = np.asarray(r2star, dtype=float)
    stderr = np.asarray(stderr, dtype=float)
    with np.errstate(invalid="ignore"):
        significant = (r2star > 0) & (r2star > min_significance * stderr)
    with np.errstate(divide="ignore"):
        return np.where(significant, 1.0 / np.where(significant, r2star, 1.0), np.nan)


def fit_r2star_loglinear(signal, echo_times, *, mask=None, weighted=True, n_iter=2, chunk_size=200_000, n_jobs=1):
    """Log-linear (weighted) least-squares fit of ``S(TE) = S0 exp(-R2* TE)``.

    Parameters
    ----------
    signal : ndarray, shape (..., n_echo)
        Magnitudes. Zero, negative or non-finite samples are given zero weight (equivalent to
        clipping them at a tiny positive value with vanishing S^2 weight).
    echo_times : array_like, shape (n_echo,)
        Echo times in seconds (NaN marks a missing echo).
    mask : ndarray of bool, optional
        Voxels to fit, of the leading shape; others are 0 in the outputs.
    weighted : bool, optional
        True: WLS with weights ~ S^2 (first pass measured magnitudes, then model-predicted).
        False: ordinary least squares on log S.
    n_iter : int, optional
        Number of WLS passes.
    chunk_size : int, optional
        Voxels per chunk.
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    s0 : ndarray, shape (...)
        Signal at TE = 0 (0 outside the mask, NaN where fewer than two echoes are usable).
    r2star : ndarray, shape (...)
        R2* in 1/s (0 outside the mask, NaN where undetermined).

    References
    ----------
    .. [1] Veraart J, Sijbers J, Sunaert S, Leemans A, Jeurissen B. NeuroImage. 2013;81:335-346.
    .. [2] Weiskopf N et al. Front Neurosci. 2014;8:278.
    """
    signal = _as_single_contrast(signal)
    s0, r2star = fit_estatics(
        signal,
        _as_single_te(echo_times),
        method="wls" if weighted else "ols",
        mask=mask,
        n_iter=n_iter,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )
    return s0[..., 0], r2star


def fit_r2star_nonlinear(
    signal,
    echo_times,
    *,
    sigma=None,
    n_coils=1,
    mask=None,
    max_iter=30,
    tol=1e-6,
    chunk_size=50_000,
    n_jobs=1,
):
    """Non-linear least-squares fit of ``S(TE) = S0 exp(-R2* TE)``, optionally above a noise floor.

    Parameters
    ----------
    signal : ndarray, shape (..., n_echo)
        Magnitudes.
    echo_times : array_like, shape (n_echo,)
        Echo times in seconds.
    sigma : float or ndarray, optional
        Per-channel noise SD (scalar or leading-shape map). If given, the model is the expected
        magnitude ``E[M](S0 exp(-R2* TE); sigma, n_coils)`` (exact Rician / non-central chi mean),
        which removes the low R2* bias from echoes near the noise floor. If None, the plain
        exponential is fitted (ML under Gaussian noise).
    n_coils : int, optional
        Number of RSS-combined channels (1 = Rician).
    mask : ndarray of bool, optional
        Voxels to fit; others are 0 in the outputs.
    max_iter : int, optional
        Maximum Levenberg-Marquardt iterations.
    tol : float, optional
        Convergence when the step of every parameter is below ``tol`` times its magnitude.
    chunk_size : int, optional
        Voxels per chunk.
    n_jobs : int, optional
        Threads working on chunks concurrently.

    Returns
    -------
    s0 : ndarray, shape (...)
    r2star : ndarray, shape (...)
        As in :func:`fit_r2star_loglinear`.

    References
    ----------
    .. [1] Gudbjartsson H, Patz S. Magn Reson Med. 1995;34:910-914.
    .. [2] Constantinides CD, Atalar E, McVeigh ER. Magn Reson Med. 1997;38:852-857.
    .. [3] Marquardt DW. J Soc Ind Appl Math. 1963;11:431-441.
    """
    signal = _as_single_contrast(signal)
    s0, r2star = fit_estatics(
        signal,
        _as_single_te(echo_times),
        sigma=sigma,
        n_coils=n_coils,
        method="nls",
        mask=mask,
        max_iter=max_iter,
        tol=tol,
        chunk_size=chunk_size,
        n_jobs=n_jobs,
    )
    return s0[..., 0], r2star


def _as_single_contrast(signal):
    signal = np.asarray(signal)
    if signal.ndim < 1:
        raise ValueError(f"signal must have shape (..., n_echo), got shape {signal.shape}")
    return signal[..., None, :]


def _as_single_te(echo_times):
    echo_times = np.asarray(echo_times, dtype=float)
    if echo_times.ndim != 1:
        raise ValueError(f"echo_times must have shape (n_echo,), got {echo_times.shape}")
    return echo_times
