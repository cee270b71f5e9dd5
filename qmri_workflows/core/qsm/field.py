"""Total field from multi-echo phase: weighted linear fit and non-linear complex fit.

The signal model is ``S_n = |S_n| exp(i (phi_0 + 2 pi f TE_n))`` with the field ``f`` in Hz and the
phase offset ``phi_0`` (radians) of the transmit/receive chain. Noise on the complex signal of SD
``sigma`` gives a phase SD of ``sigma / |S_n|``, hence the weights ``|S_n|^2``.

References
----------
Liu T, Wisnieff C, Lou M, et al. Nonlinear formulation of the magnetic field to source relationship
for robust quantitative susceptibility mapping. Magn Reson Med 2013;69:467-476.

Robinson SD et al. NMR Biomed 2017;30:e3601.
"""

from __future__ import annotations

import numpy as np

from ._grid import check_mask_volume
from .phase import wrap_phase

__all__ = ["fit_field_linear", "fit_field_complex"]


def _check_echoes(data, echo_times, name):
    data = np.asarray(data)
    if data.ndim < 2:
        raise ValueError(f"{name} must have echoes on the last axis, got shape {data.shape}")
    echo_times = np.asarray(echo_times, dtype=np.float64)
    if echo_times.shape != (data.shape[-1],):
        raise ValueError(
            f"echo_times must have {data.shape[-1]} values (one per echo of {name}), got shape {echo_times.shape}"
        )
    if data.shape[-1] < 2:
        raise ValueError(f"a field fit needs at least 2 echoes, {name} has {data.shape[-1]}")
    if np.any(np.diff(echo_times) <= 0) or echo_times[0] < 0:
        raise ValueError(f"echo_times must be non-negative and increase strictly (seconds), got {echo_times.tolist()}")
    return data, echo_times


def _select(data, mask):
    if mask is None:
        return data.reshape(-1, data.shape[-1]), None
    mask = check_mask_volume(mask, data.shape[:-1]) if data.ndim == 4 else np.asarray(mask, bool)
    if mask.shape != data.shape[:-1]:
        raise ValueError(f"mask must have the shape {data.shape[:-1]}, got {mask.shape}")
    return data[mask], mask


def _scatter(values, mask, shape):
    if mask is None:
        return values.reshape(shape)
    full = np.zeros(shape, dtype=values.dtype)
    full[mask] = values
    return full


def fit_field_linear(unwrapped_phase, echo_times, *, magnitude=None, mask=None, noise_sd=None, fit_offset=True):
    """Weighted linear fit of unwrapped phase against echo time.

    With ``fit_offset`` (default) the line ``phi_n = phi_0 + 2 pi f TE_n`` is fitted with weights
    ``|S_n|^2`` (inverse phase variances). Without it the line goes through the origin; this is the
    same as averaging the per-echo frequencies ``phi_n / (2 pi TE_n)`` with weights
    ``|S_n|^2 TE_n^2``.

    Parameters
    ----------
    unwrapped_phase : ndarray, shape (..., N)
        Unwrapped phase in radians, echoes last (e.g. from
        :func:`~qmri_workflows.core.qsm.phase.unwrap_echoes`).
    echo_times : sequence of N float
        Echo times in seconds.
    magnitude : ndarray, shape (..., N), optional
        Magnitude per echo; uniform weights without it.
    mask : ndarray of bool, shape (...), optional
        Voxels to fit; others are 0.
    noise_sd : float, optional
        SD of the noise on the real and imaginary parts of the signal, in magnitude units; without
        it (or without ``magnitude``) the phase noise is estimated per voxel from the fit residuals
        (needs at least 3 echoes, or 2 without offset; NaN otherwise).
    fit_offset : bool, optional
        Fit the phase offset ``phi_0``.

    Returns
    -------
    field : ndarray, shape (...)
        Field in Hz.
    offset : ndarray, shape (...)
        Phase offset in radians (0 if not fitted).
    field_sd : ndarray, shape (...)
        Noise SD of the field in Hz.
    """
    phase, echo_times = _check_echoes(unwrapped_phase, echo_times, "unwrapped_phase")
    voxels, mask = _select(phase, mask)
    voxels = voxels.astype(np.float64, copy=False)
    if magnitude is None:
        weights = np.ones_like(voxels)
        noise_sd = None
    else:
        magnitude = np.asarray(magnitude)
        if magnitude.shape != phase.shape:
            raise ValueError(f"magnitude must have the shape of the phase {phase.shape}, got {magnitude.shape}")
        weights = _select(magnitude, mask)[0].astype(np.float64) ** 2
    t = echo_times
    s0 = weights.sum(-1)
    s1 = weights @ t
    s2 = weights @ (t * t)
    sy = (weights * voxels).sum(-1)
    sty = (weights * voxels) @ t
    tiny = np.finfo(float).tiny
    if fit_offset:
        determinant = s0 * s2 - s1 * s1
        safe = np.where(determinant > 0, determinant, np.inf)
        slope = (s0 * sty - s1 * sy) / safe
        offset = (s2 * sy - s1 * sty) / safe
        slope_variance_factor = s0 / safe
        dof = phase.shape[-1] - 2
    else:
        slope = sty / np.maximum(s2, tiny)
        offset = np.zeros_like(slope)
        slope_variance_factor = 1.0 / np.maximum(s2, tiny)
        dof = phase.shape[-1] - 1
    if noise_sd is None:
        residual = voxels - offset[:, None] - slope[:, None] * t
        if dof > 0:
            # Weights are proportional to inverse variances: their scale is estimated here.
            scale = (weights * residual**2).sum(-1) / dof
        else:
            scale = np.full_like(slope, np.nan)
    else:
        scale = float(noise_sd) ** 2
    field_sd = np.sqrt(scale * slope_variance_factor) / (2 * np.pi)
    shape = phase.shape[:-1]
    return (
        _scatter(slope / (2 * np.pi), mask, shape),
        _scatter(offset, mask, shape),
        _scatter(np.broadcast_to(field_sd, slope.shape), mask, shape),
    )


def fit_field_complex(signal, echo_times, *, mask=None, initial_field=None, noise_sd=None, n_iter=10):
    """Non-linear fit of the complex multi-echo signal for field and phase offset.

    Minimises ``sum_n |S_n - |S_n| exp(i (phi_0 + 2 pi f TE_n))|^2`` per voxel by Gauss-Newton; the
    wrapped phase residual enters through ``sin`` and ``cos``, so no unwrapping is needed and noisy
    echoes (small ``|S_n|``) count little.

    Parameters
    ----------
    signal : ndarray of complex, shape (..., N)
        Complex signal per echo (coil-combined), echoes last.
    echo_times : sequence of N float
        Echo times in seconds.
    mask : ndarray of bool, shape (...), optional
        Voxels to fit; others are 0.
    initial_field : ndarray, shape (...), optional
        Starting field in Hz (e.g. from :func:`fit_field_linear` on temporally unwrapped phase).
        Without it the start is the phase of ``sum_n S_{n+1} conj(S_n)`` over the first echo
        spacing, so the result is then only known modulo ``1 / (TE_2 - TE_1)`` Hz (unwrap it in
        space, or give a start).
    noise_sd : float, optional
        SD of the noise on the real and imaginary parts; estimated per voxel from the residuals
        without it (needs at least 3 echoes).
    n_iter : int, optional
        Gauss-Newton iterations.

    Returns
    -------
    field : ndarray, shape (...)
        Field in Hz.
    offset : ndarray, shape (...)
        Phase offset in radians, wrapped to ``[-pi, pi)``.
    field_sd : ndarray, shape (...)
        Noise SD of the field in Hz (Gauss-Newton covariance).
    """
    signal, echo_times = _check_echoes(signal, echo_times, "signal")
    if not np.iscomplexobj(signal):
        raise ValueError(
            "signal must be complex (magnitude * exp(1j * phase)); for unwrapped phase use fit_field_linear"
        )
    voxels, mask = _select(signal, mask)
    voxels = voxels.astype(np.complex128, copy=False)
    weights = np.abs(voxels) ** 2
    measured = np.angle(voxels)
    t = echo_times
    if initial_field is None:
        spacing = t[1] - t[0]
        uniform = np.allclose(np.diff(t), spacing, rtol=1e-3)
        pairs = voxels[:, 1:] * np.conj(voxels[:, :-1]) if uniform else voxels[:, 1:2] * np.conj(voxels[:, :1])
        omega = np.angle(pairs.sum(-1)) / spacing
    else:
        initial_field = np.asarray(initial_field, dtype=np.float64)
        omega = 2 * np.pi * (initial_field[mask] if mask is not None else initial_field.ravel())
    offset = np.angle((voxels * np.exp(-1j * np.outer(omega, t))).sum(-1))
    s0 = weights.sum(-1)
    s1 = weights @ t
    s2 = weights @ (t * t)
    determinant = s0 * s2 - s1 * s1
    safe = np.where(determinant > 0, determinant, np.inf)
    for _ in range(n_iter):
        residual = wrap_phase(measured - offset[:, None] - np.outer(omega, t))
        gradient_offset = (weights * np.sin(residual)).sum(-1)
        gradient_omega = (weights * np.sin(residual)) @ t
        # The Gauss-Newton Hessian of the small-residual limit is the weighted-line normal matrix.
        offset = offset + (s2 * gradient_offset - s1 * gradient_omega) / safe
        omega = omega + (s0 * gradient_omega - s1 * gradient_offset) / safe
    residual = wrap_phase(measured - offset[:, None] - np.outer(omega, t))
    if noise_sd is None:
        dof = len(t) - 2
        scale = (2 * weights * (1 - np.cos(residual))).sum(-1) / dof if dof > 0 else np.full_like(omega, np.nan)
    else:
        scale = float(noise_sd) ** 2
    field_sd = np.sqrt(scale * s0 / safe) / (2 * np.pi)
    shape = signal.shape[:-1]
    return (
        _scatter(omega / (2 * np.pi), mask, shape),
        _scatter(wrap_phase(offset), mask, shape),
        _scatter(np.broadcast_to(field_sd, omega.shape), mask, shape),
    )
