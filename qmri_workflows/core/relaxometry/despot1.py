r"""R1 and M0 from variable-flip-angle spoiled gradient echo (DESPOT1), B1-corrected.

Model (Ernst equation, TE = 0 intercepts): with actual flip angle :math:`a_i = B_1\alpha_i` and
:math:`E_1 = e^{-TR\,R_1}`,

.. math::

    S_i = M_0 \sin a_i \frac{1 - E_1}{1 - E_1 \cos a_i}.

Estimators, all vectorised over voxels (signals have shape ``(..., n_flip)``):

* :func:`despot1_two_angle` -- exact closed form for two angles at one TR: with
  :math:`q = (S_1/\sin a_1)/(S_2/\sin a_2)`, :math:`E_1 = (q - 1)/(q\cos a_1 - \cos a_2)`.
* :func:`despot1_linear` -- the linearisation :math:`S/\sin a = E_1\,S/\tan a + M_0(1 - E_1)`, fitted
  by least squares; weighted (default) with the Chang 2008 weights
  :math:`[\sin a / (1 - E_1\cos a)]^2` (the inverse variance of the linearised residual), iterated.
* :func:`despot1_nonlinear` -- Levenberg-Marquardt on :math:`(M_0, R_1)`, started from the weighted
  linear fit (maximum likelihood under Gaussian noise).
* :func:`fit_r1` -- any of them over a volume in chunks, with B1 and the imperfect-spoiling correction
  of :mod:`.spoiling`.

Uncertainty: the standard error from the Fisher information :math:`J^T J / \sigma^2` at the estimate
(:func:`despot1_crlb` at the truth is the Cramér-Rao bound), with :math:`\sigma` given or, with more
angles than parameters, estimated from the residuals; NaN when neither is possible.

References
----------
.. [1] Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient recalled
   acquisition in the steady state. Magn Reson Med 2003;49:515-526.
.. [2] Chang L-C, Koay CG, Basser PJ, Pierpaoli C. Linear least-squares method for unbiased
   estimation of T1 from SPGR signals. Magn Reson Med 2008;60:496-501.
.. [3] Helms G, Dathe H, Dechent P. Quantitative FLASH MRI at 3T using a rational approximation of
   the Ernst equation. Magn Reson Med 2008;59:667-672.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._chunks import apply_in_chunks
from .spoiling import DEFAULT_TISSUE_T2, spoiling_ratio

__all__ = [
    "R1Fit",
    "despot1_crlb",
    "despot1_linear",
    "despot1_nonlinear",
    "despot1_two_angle",
    "fit_r1",
]

_METHODS = ("two_angle", "linear", "nonlinear")


class R1Fit(NamedTuple):
    """DESPOT1 estimates: R1 (1/s), M0, and their standard errors (NaN where unknown)."""

    r1: np.ndarray
    m0: np.ndarray
    r1_se: np.ndarray
    m0_se: np.ndarray


def _prepare(signals, flip_angles, repetition_time, b1):
    signals = np.asarray(signals, dtype=float)
    flip_angles = np.asarray(flip_angles, dtype=float)
    if flip_angles.ndim != 1 or signals.ndim < 1 or signals.shape[-1] != flip_angles.size:
        raise ValueError(
            f"signals must have shape (..., {flip_angles.size}) for flip angles {flip_angles!r}, got {signals.shape}"
        )
    if flip_angles.size < 2 or np.unique(flip_angles).size < 2:
        raise ValueError(f"DESPOT1 needs at least two different flip angles, got {flip_angles!r} (rad)")
    if np.any(~(flip_angles > 0)) or np.any(flip_angles >= np.pi):
        raise ValueError(f"flip angles must be in (0, pi) rad, got {flip_angles!r}; convert degrees with numpy.deg2rad")
    if not repetition_time > 0:
        raise ValueError(f"repetition_time must be a positive time in seconds, got {repetition_time!r}")
    actual = np.asarray(b1, dtype=float)[..., None] * flip_angles
    return signals, actual


def _model(m0, e1, actual):
    """Ernst signal (..., n_flip) and its derivatives with respect to M0 and R1 (per unit TR)."""
    sin_a, cos_a = np.sin(actual), np.cos(actual)
    denominator = 1.0 - e1[..., None] * cos_a
    shape = sin_a * (1.0 - e1[..., None]) / denominator
    d_shape_d_e1 = sin_a * (cos_a - 1.0) / denominator**2
    return m0[..., None] * shape, shape, d_shape_d_e1


def _jacobian(m0, r1, actual, repetition_time):
    """Derivatives of the Ernst signals with respect to (M0, R1), shape (..., n_flip, 2)."""
    e1 = np.exp(-repetition_time * r1)
    _, d_m0, d_shape_d_e1 = _model(m0, e1, actual)
    d_r1 = m0[..., None] * d_shape_d_e1 * (-repetition_time * e1[..., None])
    return np.stack(np.broadcast_arrays(d_m0, d_r1), axis=-1)


def _standard_errors(m0, r1, actual, repetition_time, sigma, residual_sum=None, covariance=None):
    """Standard errors of (R1, M0) from the Fisher information at (m0, r1).

    The noise is, in order of preference: ``covariance`` of the signals (..., n_flip, n_flip), the
    same SD ``sigma`` on every signal, or the residuals (more than two flip angles).
    """
    jacobian = _jacobian(m0, r1, actual, repetition_time)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if covariance is not None:
            covariance = np.broadcast_to(covariance, jacobian.shape[:-1] + (jacobian.shape[-2],))
            usable = np.all(np.isfinite(covariance), axis=(-2, -1)) & np.all(np.isfinite(jacobian), axis=(-2, -1))
            usable &= np.all(np.diagonal(covariance, axis1=-2, axis2=-1) > 0, axis=-1)
            identity = np.eye(covariance.shape[-1])
            safe_covariance = np.where(usable[..., None, None], covariance, identity)
            safe_jacobian = np.where(usable[..., None, None], jacobian, 1.0)
            fisher = np.einsum("...ki,...kj->...ij", safe_jacobian, np.linalg.solve(safe_covariance, safe_jacobian))
            f00, f01, f11 = fisher[..., 0, 0], fisher[..., 0, 1], fisher[..., 1, 1]
            determinant = np.where(usable, f00 * f11 - f01**2, np.nan)
            return np.sqrt(f00 / determinant), np.sqrt(f11 / determinant)
        d_m0, d_r1 = jacobian[..., 0], jacobian[..., 1]
        f00 = np.sum(d_m0 * d_m0, axis=-1)
        f01 = np.sum(d_m0 * d_r1, axis=-1)
        f11 = np.sum(d_r1 * d_r1, axis=-1)
        determinant = f00 * f11 - f01**2
        if sigma is not None:
            variance = np.asarray(sigma, dtype=float) ** 2
        elif residual_sum is not None and actual.shape[-1] > 2:
            variance = residual_sum / (actual.shape[-1] - 2)
        else:
            nan = np.full(np.shape(r1), np.nan)
            return nan, nan.copy()
        r1_se = np.sqrt(variance * f00 / determinant)
        m0_se = np.sqrt(variance * f11 / determinant)
    return r1_se, m0_se


def _from_e1(e1, m0, actual, repetition_time, signals, sigma, errors=True):
    valid = (e1 > 0) & (e1 < 1) & np.isfinite(m0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r1 = np.where(valid, -np.log(np.where(valid, e1, 0.5)) / repetition_time, np.nan)
    m0 = np.where(valid, m0, np.nan)
    if not errors:
        nan = np.full(r1.shape, np.nan)
        return R1Fit(r1, m0, nan, nan.copy())
    model, _, _ = _model(m0, np.exp(-repetition_time * r1), actual)
    residual_sum = np.sum((signals - model) ** 2, axis=-1)
    r1_se, m0_se = _standard_errors(m0, r1, actual, repetition_time, sigma, residual_sum)
    return R1Fit(r1, m0, r1_se, m0_se)


def despot1_crlb(m0, r1, flip_angles, repetition_time, sigma=None, *, b1=1.0, signal_covariance=None):
    """Cramér-Rao bounds (standard deviations) of R1 and M0 for Gaussian noise.

    With ``signal_covariance`` the signals are, e.g., the TE = 0 intercepts of a multi-echo fit
    (:func:`qmri_workflows.core.crlb.estatics_intercept_covariance`): for two flip angles the
    bound is then that of the whole multi-echo protocol (the intercepts and R2* are a one-to-one
    reparametrisation of M0, R1 and R2*).

    Parameters
    ----------
    m0, r1 : array_like
        True M0 and R1 (1/s).
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    repetition_time : float
        TR (s).
    sigma : array_like, optional
        Noise standard deviation of each signal (the same for all).
    b1 : array_like, optional
        Transmit field ratio.
    signal_covariance : array_like, shape (..., n_flip, n_flip), optional
        Covariance of the signals, instead of ``sigma``.

    Returns
    -------
    r1_sd, m0_sd : numpy.ndarray
    """
    if sigma is None and signal_covariance is None:
        raise ValueError("despot1_crlb needs the noise: sigma or signal_covariance")
    m0, r1 = np.broadcast_arrays(np.asarray(m0, dtype=float), np.asarray(r1, dtype=float))
    actual = np.asarray(b1, dtype=float)[..., None] * np.asarray(flip_angles, dtype=float)
    covariance = None if signal_covariance is None else np.asarray(signal_covariance, dtype=float)
    return _standard_errors(m0, r1, actual, float(repetition_time), sigma, covariance=covariance)


def despot1_two_angle(signals, flip_angles, repetition_time, *, b1=1.0, sigma=None, errors=True):
    """Exact two-angle DESPOT1 (one TR).

    Parameters
    ----------
    signals : array_like, shape (..., 2)
        TE = 0 signals at the two flip angles.
    flip_angles : array_like, shape (2,)
        Nominal flip angles (rad).
    repetition_time : float
        TR (s), common to both.
    b1 : array_like, optional
        Transmit field ratio (broadcasts with ``signals[..., 0]``).
    sigma : array_like, optional
        Noise standard deviation, for the standard errors (NaN without it).
    errors : bool, optional
        False skips the standard errors (NaN), e.g. for inner iterations.

    Returns
    -------
    R1Fit
        NaN where the signals admit no solution with 0 < E1 < 1.
    """
    signals, actual = _prepare(signals, flip_angles, repetition_time, b1)
    if signals.shape[-1] != 2:
        raise ValueError(f"despot1_two_angle needs exactly two flip angles, got {signals.shape[-1]}")
    with np.errstate(divide="ignore", invalid="ignore"):
        reduced = signals / np.sin(actual)
        q = reduced[..., 0] / reduced[..., 1]
        cos_a = np.cos(actual)
        e1 = (q - 1.0) / (q * cos_a[..., 0] - cos_a[..., 1])
        m0 = reduced[..., 0] * (1.0 - e1 * cos_a[..., 0]) / (1.0 - e1)
    return _from_e1(e1, m0, actual, repetition_time, signals, sigma, errors)


def _weighted_line(x, y, weights):
    sw = weights.sum(-1)
    swx = (weights * x).sum(-1)
    swy = (weights * y).sum(-1)
    swxx = (weights * x * x).sum(-1)
    swxy = (weights * x * y).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (sw * swxy - swx * swy) / (sw * swxx - swx**2)
        intercept = (swy - slope * swx) / sw
    return slope, intercept


def despot1_linear(
    signals, flip_angles, repetition_time, *, b1=1.0, weighted=True, n_iterations=4, sigma=None, errors=True
):
    """Linearised DESPOT1, ordinary or weighted (Chang 2008) least squares.

    Parameters
    ----------
    signals : array_like, shape (..., n_flip)
        TE = 0 signals, ``n_flip >= 2``.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    repetition_time : float
        TR (s).
    b1 : array_like, optional
        Transmit field ratio.
    weighted : bool, optional
        Iterate with the weights :math:`[\\sin a/(1 - E_1\\cos a)]^2` (default) or fit ordinary
        least squares.
    n_iterations : int, optional
        Re-weighting iterations.
    sigma : array_like, optional
        Noise standard deviation for the standard errors (else from the residuals with > 2 angles).
    errors : bool, optional
        False skips the standard errors (NaN).

    Returns
    -------
    R1Fit
        With two angles the line passes through both points: the exact two-angle solution.
    """
    signals, actual = _prepare(signals, flip_angles, repetition_time, b1)
    if signals.shape[-1] == 2:  # any line, weighted or not, passes through both points
        return despot1_two_angle(signals, flip_angles, repetition_time, b1=b1, sigma=sigma, errors=errors)
    x = signals / np.tan(actual)
    y = signals / np.sin(actual)
    slope, intercept = _weighted_line(x, y, np.ones_like(x))
    for _ in range(n_iterations if weighted else 0):
        e1 = np.clip(np.nan_to_num(slope, nan=0.9), 0.0, 1.0 - 1e-9)
        weights = (np.sin(actual) / (1.0 - e1[..., None] * np.cos(actual))) ** 2
        slope, intercept = _weighted_line(x, y, weights)
    with np.errstate(divide="ignore", invalid="ignore"):
        m0 = intercept / (1.0 - slope)
    return _from_e1(slope, m0, actual, repetition_time, signals, sigma, errors)


def despot1_nonlinear(signals, flip_angles, repetition_time, *, b1=1.0, n_iterations=30, sigma=None, errors=True):
    """Non-linear least-squares DESPOT1 (Levenberg-Marquardt on M0 and R1, vectorised).

    Parameters
    ----------
    signals, flip_angles, repetition_time, b1, sigma, errors
        As in :func:`despot1_linear`.
    n_iterations : int, optional
        Maximum Levenberg-Marquardt iterations (started from the weighted linear fit; stops when every
        step is below 1e-10 relative). With two angles the exact solution is returned directly.

    Returns
    -------
    R1Fit
    """
    signals, actual = _prepare(signals, flip_angles, repetition_time, b1)
    if signals.shape[-1] == 2:  # two data, two parameters: the least-squares fit is the exact solution
        return despot1_two_angle(signals, flip_angles, repetition_time, b1=b1, sigma=sigma, errors=errors)
    start = despot1_linear(signals, flip_angles, repetition_time, b1=b1, errors=False)
    m0 = np.nan_to_num(start.m0, nan=float(np.nanmax(signals, initial=1.0)))
    r1 = np.clip(np.nan_to_num(start.r1, nan=1.0), 1e-3, 1e3)
    actual = np.broadcast_to(actual, signals.shape)

    def cost_and_jacobian(m0, r1):
        e1 = np.exp(-repetition_time * r1)
        model, d_m0, d_shape_d_e1 = _model(m0, e1, actual)
        d_r1 = m0[..., None] * d_shape_d_e1 * (-repetition_time * e1[..., None])
        residual = signals - model
        return np.sum(residual**2, -1), residual, d_m0, d_r1

    cost, residual, d_m0, d_r1 = cost_and_jacobian(m0, r1)
    damping = np.full(m0.shape, 1e-3)
    for _ in range(n_iterations):
        a00 = np.sum(d_m0**2, -1)
        a01 = np.sum(d_m0 * d_r1, -1)
        a11 = np.sum(d_r1**2, -1)
        g0 = np.sum(d_m0 * residual, -1)
        g1 = np.sum(d_r1 * residual, -1)
        b00, b11 = a00 * (1 + damping), a11 * (1 + damping)
        with np.errstate(divide="ignore", invalid="ignore"):
            determinant = b00 * b11 - a01**2
            step_m0 = np.nan_to_num((b11 * g0 - a01 * g1) / determinant)
            step_r1 = np.nan_to_num((b00 * g1 - a01 * g0) / determinant)
        trial_m0, trial_r1 = m0 + step_m0, np.clip(r1 + step_r1, 1e-3, 1e3)
        trial_cost, trial_residual, trial_d_m0, trial_d_r1 = cost_and_jacobian(trial_m0, trial_r1)
        better = trial_cost < cost
        m0, r1 = np.where(better, trial_m0, m0), np.where(better, trial_r1, r1)
        cost = np.where(better, trial_cost, cost)
        residual = np.where(better[..., None], trial_residual, residual)
        d_m0 = np.where(better[..., None], trial_d_m0, d_m0)
        d_r1 = np.where(better[..., None], trial_d_r1, d_r1)
        damping = np.where(better, damping / 3.0, damping * 4.0)
        if np.all(np.abs(step_r1) <= 1e-10 * r1) and np.all(np.abs(step_m0) <= 1e-10 * np.abs(m0)):
            break
    invalid = ~np.isfinite(start.r1) & ~np.isfinite(start.m0)
    r1 = np.where(invalid, np.nan, r1)
    m0 = np.where(invalid, np.nan, m0)
    if not errors:
        return R1Fit(r1, m0, np.full(r1.shape, np.nan), np.full(r1.shape, np.nan))
    r1_se, m0_se = _standard_errors(m0, r1, actual, repetition_time, sigma, cost)
    return R1Fit(r1, m0, r1_se, m0_se)


def fit_r1(
    signals,
    flip_angles,
    repetition_time,
    *,
    b1=None,
    method="linear",
    spoiling=None,
    t2=DEFAULT_TISSUE_T2,
    n_spoiling_iterations=2,
    sigma=None,
    signal_covariance=None,
    mask=None,
    chunk_size=200_000,
    n_jobs=1,
):
    """DESPOT1 over a volume: B1-corrected and, optionally, corrected for imperfect RF spoiling.

    Parameters
    ----------
    signals : array_like, shape (..., n_flip)
        TE = 0 signals (e.g. ESTATICS intercepts) per flip angle.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    repetition_time : float
        TR (s).
    b1 : array_like, optional
        Transmit field ratio map (shape ``signals.shape[:-1]``); ``None`` means nominal (1).
    method : {"linear", "nonlinear", "two_angle"}, optional
        Weighted linearised fit (default), non-linear fit or exact two-angle solution.
    spoiling : SpoilingProtocol, optional
        Protocol of the acquisition; when given, the signals are divided by the EPG/Ernst ratio of
        :func:`.spoiling.spoiling_ratio` at the current T1 estimate, ``n_spoiling_iterations`` times.
    t2 : array_like, optional
        T2 (s) for the spoiling correction: a map (from R2) or a tissue value (default
        ``DEFAULT_TISSUE_T2``).
    n_spoiling_iterations : int, optional
        Fixed-point iterations of the spoiling correction (the ratio depends weakly on T1: one leaves
        up to 0.2 %, two < 0.005 % on the phantom's tissues at B1 0.8-1.2).
    sigma : array_like, optional
        Noise standard deviation of the signals, for the standard errors.
    signal_covariance : array_like, shape (..., n_flip, n_flip), optional
        Covariance of the signals (e.g. of the TE = 0 intercepts of a multi-echo fit), for the
        standard errors; wins over ``sigma``. The spoiling correction's division is carried into
        it. Without either, the standard error comes from the residuals (more than two flip
        angles) or is NaN.
    mask : array_like of bool, optional
        Voxels to fit; others get NaN.
    chunk_size : int, optional
        Voxels per chunk (memory ~ 1 kB per voxel).
    n_jobs : int, optional
        Threads fitting chunks concurrently.

    Returns
    -------
    R1Fit
        Maps of shape ``signals.shape[:-1]``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    estimator = {"two_angle": despot1_two_angle, "linear": despot1_linear, "nonlinear": despot1_nonlinear}[method]
    signals = np.asarray(signals, dtype=float)
    _prepare(signals.reshape(-1, signals.shape[-1])[:1] if signals.ndim else signals, flip_angles, repetition_time, 1.0)
    leading = signals.shape[:-1]
    b1_map = np.ones(leading) if b1 is None else np.broadcast_to(np.asarray(b1, dtype=float), leading)
    t2_map = np.broadcast_to(np.asarray(t2, dtype=float), leading)
    sigma_map = None if sigma is None else np.broadcast_to(np.asarray(sigma, dtype=float), leading)
    n_flip = signals.shape[-1]
    covariance_map = None
    if signal_covariance is not None:
        covariance_map = np.broadcast_to(np.asarray(signal_covariance, dtype=float), leading + (n_flip, n_flip))

    n_corrections = n_spoiling_iterations if spoiling is not None else 0

    def fit_chunk(chunk_signals, chunk_b1, chunk_t2, chunk_sigma, chunk_covariance):
        own_errors = chunk_covariance is None
        result = estimator(
            chunk_signals,
            flip_angles,
            repetition_time,
            b1=chunk_b1,
            sigma=chunk_sigma,
            errors=own_errors and n_corrections == 0,
        )
        ratio = np.ones_like(chunk_signals)
        for iteration in range(n_corrections):
            t1 = np.where(np.isfinite(result.r1) & (result.r1 > 0), 1.0 / result.r1, 1.0)
            ratio = spoiling_ratio(spoiling, t1, chunk_t2, chunk_b1)
            # the ratio is 0.9-1.05: the noise of the corrected signals stays ~sigma
            result = estimator(
                chunk_signals / ratio,
                flip_angles,
                repetition_time,
                b1=chunk_b1,
                sigma=chunk_sigma,
                errors=own_errors and iteration == n_corrections - 1,
            )
        if not own_errors:
            actual = np.asarray(chunk_b1, dtype=float)[..., None] * np.asarray(flip_angles, dtype=float)
            corrected_covariance = chunk_covariance / (ratio[..., :, None] * ratio[..., None, :])
            r1_se, m0_se = _standard_errors(
                result.m0, result.r1, actual, repetition_time, None, covariance=corrected_covariance
            )
            result = R1Fit(result.r1, result.m0, r1_se, m0_se)
        return tuple(result)

    outputs = apply_in_chunks(
        fit_chunk,
        [signals, b1_map, t2_map, sigma_map, covariance_map],
        leading_shape=leading,
        output_shapes=[(), (), (), ()],
        mask=mask,
        chunk_size=chunk_size,
        fill_value=np.nan,
        n_jobs=n_jobs,
    )
    return R1Fit(*outputs)
