"""Dipole inversion: local field (ppm) to susceptibility (ppm).

All methods share the forward model of :mod:`qmri_workflows.core.dipole`,
``f = F^-1[D(k) F[chi]]`` with ``D(k) = 1/3 - (k.b)^2/|k|^2`` and ``b`` the B0 direction in voxel
axes (not assumed to be the z axis). They work on the mask's bounding box padded with zeros to fast
FFT lengths, in float32, and return a map that is 0 outside the mask. The mean of the result is not
measured (``D(0) = 0``): reference it afterwards
(:func:`~qmri_workflows.core.qsm.referencing.reference_to_region`).

* :func:`invert_tkd` -- truncated k-space division with the correction of its underestimation.
* :func:`invert_l2_gradient` -- closed-form Tikhonov solution with a gradient regulariser.
* :func:`invert_ilsqr` -- LSQR, then estimation and removal of the streaking component in the
  ill-conditioned cone (Li 2015).
* :func:`invert_tv_admm` -- total variation with a magnitude-weighted, linear or non-linear data
  term, solved by ADMM (FANSI-like), with free sources around the mask; the default of the pipeline.

References
----------
Shmueli K, de Zwart JA, van Gelderen P, et al. Magnetic susceptibility mapping of brain tissue in
vivo using MRI phase data. Magn Reson Med 2009;62:1510-1522.

Schweser F, Deistung A, Sommer K, Reichenbach JR. Toward online reconstruction of quantitative
susceptibility maps: superfast dipole inversion. Magn Reson Med 2013;69:1582-1594.

Bilgic B, Fan AP, Polimeni JR, et al. Fast quantitative susceptibility mapping with L1-regularization
and automatic parameter selection. Magn Reson Med 2014;72:1444-1459.

Li W, Wang N, Yu F, et al. A method for estimating and removing streaking artifacts in quantitative
susceptibility mapping. NeuroImage 2015;108:111-122.

Milovic C, Bilgic B, Zhao B, et al. Fast nonlinear susceptibility inversion with variational
regularization. Magn Reson Med 2018;80:814-821.

Liu Z, Kee Y, Zhou D, Wang Y, Spincemaille P. Preconditioned total field inversion (TFI) method for
quantitative susceptibility mapping. Magn Reson Med 2017;78:303-315.
"""

from __future__ import annotations

import numpy as np

from ._grid import (
    PaddedGrid,
    check_mask_volume,
    check_volume,
    edges_touching,
    forward_difference,
    forward_difference_adjoint,
    solve_lsqr,
)

__all__ = ["invert_tkd", "invert_l2_gradient", "invert_ilsqr", "invert_tv_admm"]

_DEFAULT_PAD = 12
#: ADMM iterations and data-split penalty of the TV inversion (see :func:`invert_tv_admm`).
TV_MAX_ITER = 50
DATA_PENALTY = 0.03


class _Problem:
    """Field, mask, weights and dipole kernel on the padded box around the mask."""

    def __init__(self, field, mask, voxel_size, b0_direction, pad, workers, weights=None):
        field = check_volume(field, "local_field")
        mask = check_mask_volume(mask, field.shape)
        if not np.all(np.isfinite(field[mask])):
            raise ValueError("local_field is not finite everywhere in the mask; exclude those voxels from the mask")
        self.mask = mask
        self.grid = PaddedGrid(mask, pad, voxel_size, workers)
        self.inside = self.grid.embed(mask) > 0
        self.field = self.grid.embed(np.where(mask, field, 0.0))
        self.kernel = self.grid.dipole(b0_direction)
        if weights is None:
            self.weights = self.inside.astype(np.float32)
        else:
            weights = check_volume(weights, "weights", field.shape)
            if np.any(weights[mask] < 0) or not np.all(np.isfinite(weights[mask])):
                raise ValueError("weights must be finite and non-negative in the mask")
            self.weights = self.grid.embed(np.where(mask, weights, 0.0))
            mean = float(self.weights[self.inside].mean())
            if mean <= 0:
                raise ValueError("weights are 0 everywhere in the mask")
            self.weights /= np.float32(mean)

    def apply_kernel(self, array):
        return self.grid.irfft(self.grid.rfft(array) * self.kernel)

    def result(self, chi):
        return self.grid.extract(chi.astype(np.float32)) * self.mask


def _tkd_inverse(kernel, threshold):
    """Truncated ``1 / D``: ``sign(D) / threshold`` where ``|D| < threshold`` (0 at ``D = 0``)."""
    magnitude = np.maximum(np.abs(kernel), np.float32(threshold))
    return (np.sign(kernel) / magnitude).astype(np.float32)


def invert_tkd(
    local_field,
    mask,
    voxel_size=(1.0, 1.0, 1.0),
    *,
    b0_direction=(0, 0, 1),
    threshold=0.19,
    correct_underestimation=True,
    pad=_DEFAULT_PAD,
    workers=-1,
):
    """Truncated k-space division.

    ``chi = F^-1[F[f] / D_t]`` with ``1 / D_t = sign(D) / max(|D|, t)`` (Shmueli 2009). Truncation
    shrinks the response to every source by ``c = mean_k D(k) / D_t(k)``, the point-spread
    function's value at its centre (Schweser 2013); with ``correct_underestimation`` the result is
    divided by ``c``.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local (background-removed) field in ppm of B0.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the local field is valid.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel-axis coordinates (from the image affine).
    threshold : float, optional
        Truncation threshold on ``|D|``.
    correct_underestimation : bool, optional
        Divide by the centre of the point-spread function.
    pad : int, optional
        Zero voxels around the mask's bounding box.
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    chi : ndarray, shape (X, Y, Z), float32
        Susceptibility in ppm, 0 outside the mask (mean not referenced).
    """
    problem = _Problem(local_field, mask, voxel_size, b0_direction, pad, workers)
    inverse = _tkd_inverse(problem.kernel, threshold)
    chi = problem.grid.irfft(problem.grid.rfft(problem.field) * inverse)
    if correct_underestimation:
        # Centre of the real, symmetric point-spread function F^-1[D / D_t].
        centre = float(problem.grid.irfft(problem.kernel * inverse)[0, 0, 0])
        chi /= np.float32(centre)
    return problem.result(chi)


def invert_l2_gradient(
    local_field,
    mask,
    voxel_size=(1.0, 1.0, 1.0),
    *,
    b0_direction=(0, 0, 1),
    regularization=0.005,
    pad=_DEFAULT_PAD,
    workers=-1,
):
    """Closed-form L2 inversion with a gradient regulariser (Bilgic 2014).

    ``chi = F^-1[ D F[f] / (D^2 + lambda sum_i |E_i|^2) ]`` minimises
    ``||D * chi - f||^2 + lambda ||grad chi||^2`` over the padded box (``E_i`` the forward
    differences in k-space, 1/mm).

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the local field is valid.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel-axis coordinates.
    regularization : float, optional
        ``lambda`` in mm^2 (0.005 had the lowest NRMSE of 0.005, 0.02, 0.05 on the test phantoms).
    pad : int, optional
        Zero voxels around the mask's bounding box.
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    chi : ndarray, shape (X, Y, Z), float32
        Susceptibility in ppm, 0 outside the mask.
    """
    problem = _Problem(local_field, mask, voxel_size, b0_direction, pad, workers)
    denominator = problem.kernel**2 + np.float32(regularization) * problem.grid.gradient_power()
    denominator[0, 0, 0] = 1.0
    chi = problem.grid.irfft(problem.grid.rfft(problem.field) * (problem.kernel / denominator))
    return problem.result(chi)


def _ramp(values, low, high):
    """1 below ``low``, 0 above ``high``, linear between (edge-free regions get weight 1)."""
    span = max(high - low, np.finfo(np.float32).tiny)
    return np.clip((high - values) / span, 0.0, 1.0).astype(np.float32)


def invert_ilsqr(
    local_field,
    mask,
    voxel_size=(1.0, 1.0, 1.0),
    *,
    b0_direction=(0, 0, 1),
    weights=None,
    tol=0.01,
    max_iter=50,
    cone_threshold=0.1,
    edge_percentiles=(70, 90),
    prior_threshold=0.19,
    pad=_DEFAULT_PAD,
    workers=-1,
):
    """iLSQR: LSQR inversion with estimation and removal of streaking artefacts (Li 2015).

    1. ``chi_LSQR``: LSQR on the weighted problem ``min ||W (D * chi - f)||`` (early stopping at
       ``tol`` regularises it).
    2. A streak-free structural prior: TKD with correction (``prior_threshold``).
    3. The streaking component lives in the ill-conditioned cone ``|D| < cone_threshold``; where
       the prior and the field's Laplacian show no edge, every gradient of ``chi_LSQR`` is
       artefact. ``chi_SA = M_ic x`` with ``x`` from LSQR on
       ``min || P_i grad_i(M_ic x) - P_i grad_i(chi_LSQR) ||`` (``P_i`` 1 in smooth regions,
       0 at edges: ramps between the ``edge_percentiles`` of the gradient magnitudes in the mask).
    4. ``chi = chi_LSQR - chi_SA``.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the local field is valid.
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel-axis coordinates.
    weights : ndarray, shape (X, Y, Z), optional
        Data weights (magnitude, or 1 / field noise SD), normalised to mean 1 in the mask.
    tol : float, optional
        LSQR stopping tolerance for both solves.
    max_iter : int, optional
        Maximum iterations of each LSQR solve.
    cone_threshold : float, optional
        ``|D|`` below which k-space counts as ill-conditioned.
    edge_percentiles : (float, float), optional
        Percentiles of the gradient magnitudes in the mask between which edge weights fall from 1
        to 0. Li 2015 used (40, 60) on brains; on the sparse phantoms of the tests (70, 90) removed
        a third more streaking, because the prior's own streaks then count as edges less often.
    prior_threshold : float, optional
        TKD threshold of the structural prior.
    pad : int, optional
        Zero voxels around the mask's bounding box.
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    chi : ndarray, shape (X, Y, Z), float32
        Susceptibility in ppm, 0 outside the mask.
    """
    problem = _Problem(local_field, mask, voxel_size, b0_direction, pad, workers, weights)
    grid, kernel, weight = problem.grid, problem.kernel, problem.weights
    shape, n = grid.shape, int(np.prod(grid.shape))

    def forward(x):
        return (weight * problem.apply_kernel(x.reshape(shape).astype(np.float32))).ravel()

    def adjoint(y):
        return problem.apply_kernel(weight * y.reshape(shape).astype(np.float32)).ravel()

    data = (weight * problem.field).ravel().astype(np.float64)
    chi_lsqr = solve_lsqr(forward, adjoint, n, data, tol, max_iter).reshape(shape).astype(np.float32)

    prior = grid.irfft(grid.rfft(problem.field) * _tkd_inverse(kernel, prior_threshold))
    low, high = edge_percentiles
    laplacian = -forward_difference_adjoint(forward_difference(problem.field, grid.voxel_size), grid.voxel_size)
    magnitude = np.abs(laplacian)
    laplacian_weight = _ramp(magnitude, *np.percentile(magnitude[problem.inside], [low, high]))
    edge_weights = []
    touching_edges = edges_touching(problem.inside)
    for axis, component in enumerate(forward_difference(prior, grid.voxel_size)):
        touching = touching_edges[axis]
        magnitude = np.abs(component)
        thresholds = np.percentile(magnitude[touching], [low, high])
        edge_laplacian_weight = 0.5 * (laplacian_weight + np.roll(laplacian_weight, -1, axis))
        edge_weights.append(_ramp(magnitude, *thresholds) * edge_laplacian_weight * touching)
    edge_weights = np.stack(edge_weights)
    cone = (np.abs(kernel) < cone_threshold).astype(np.float32)

    def project(x):
        return grid.irfft(grid.rfft(x) * cone)

    def streak_forward(x):
        return (
            edge_weights * forward_difference(project(x.reshape(shape).astype(np.float32)), grid.voxel_size)
        ).ravel()

    def streak_adjoint(y):
        y = y.reshape((3,) + shape).astype(np.float32)
        return project(forward_difference_adjoint(edge_weights * y, grid.voxel_size)).ravel()

    target = (edge_weights * forward_difference(chi_lsqr, grid.voxel_size)).ravel()
    streaking = solve_lsqr(streak_forward, streak_adjoint, n, target.astype(np.float64), tol, max_iter)
    streaking = project(streaking.reshape(shape).astype(np.float32))
    return problem.result(chi_lsqr - streaking)


def _shrink(components, threshold, out):
    """Soft thresholding of each gradient component (anisotropic total variation) into ``out``.

    ``threshold`` is a scalar or an array broadcastable to ``components`` (one threshold per edge).
    Each component is the difference across one edge between two voxels, and ``|difference|`` is
    the same whichever way an axis is stored. Isotropic TV, which groups the three forward
    differences of a voxel, is not: on the 4 mm example the map of LPS-stored images differed from
    that of the same images stored RAS by 12-14 % NRMSE (0 % now; with the same accuracy on the
    2 mm phantom, 35-39 % NRMSE for LBV and PDF).
    """
    np.abs(components, out=out)
    np.subtract(out, threshold, out=out)
    np.maximum(out, 0.0, out=out)
    np.copysign(out, components, out=out)
    return out


def invert_tv_admm(
    local_field,
    mask,
    voxel_size=(1.0, 1.0, 1.0),
    *,
    b0_direction=(0, 0, 1),
    weights=None,
    regularization=2e-4,
    outside_regularization=0.0,
    data_term="nonlinear",
    phase_scale=None,
    gradient_penalty=None,
    data_penalty=DATA_PENALTY,
    max_iter=TV_MAX_ITER,
    tol=1e-3,
    pad=_DEFAULT_PAD,
    workers=-1,
):
    """Total-variation inversion by ADMM (FANSI-like), weighted by magnitude or noise.

    Minimises ``alpha ||grad chi||_1 + data(D * chi)``, the total variation being the sum of the
    absolute differences across every edge between neighbouring voxels (anisotropic: the map then
    does not depend on the direction in which each axis is stored, see :func:`_shrink`), with the
    data term

    * ``linear``: ``1/2 ||W (D * chi - f)||^2``,
    * ``nonlinear``: ``||W (exp(i k D * chi) - exp(i k f))||^2 / (2 k^2)``, with ``k`` the
      ``phase_scale`` (rad/ppm): the phase the field was measured as. It equals the linear term for
      small residuals and down-weights residuals of the order of pi / k, where the phase was
      unreliable (Milovic 2018).

    The splitting ``z = grad chi`` and ``z_d = D * chi`` makes every step cheap: chi in closed form
    in k-space, ``z`` by soft thresholding, ``z_d`` voxel by voxel (closed form, or a few Newton
    steps for the non-linear term).

    Chi is solved on the whole padded box, but the data term holds only in the mask and, by
    default, the total variation only there too (``outside_regularization`` 0): the box around the
    mask holds free sources. Their field inside the mask is harmonic, so they take up any harmonic
    error of the background removal: background it left, and the harmonic part of the local field
    that it removed as background (the field that sources near the mask's edge, such as the superior
    sagittal sinus, put inside the mask; LBV and V-SHARP remove all of it, PDF part of it). The
    inside then keeps the sources that explain the rest with the least total variation, which
    recovers that field (the idea of total field inversion, Liu 2017, applied after background
    removal). On the 2 mm phantom of ``tests/phantom/test_qsm_phantom.py`` (LBV, 100 iterations)
    this lowers the chi NRMSE from 53 % (the same total variation outside as inside) to 35 %, and
    the local field the inside explains is within 26 % of the true one, against 60 % for LBV's.

    Parameters
    ----------
    local_field : ndarray, shape (X, Y, Z)
        Local field in ppm.
    mask : ndarray of bool, shape (X, Y, Z)
        Region where the local field is valid (the data term is 0 elsewhere).
    voxel_size : sequence of 3 float, optional
        Voxel size in mm.
    b0_direction : sequence of 3 float, optional
        Main-field direction in voxel-axis coordinates.
    weights : ndarray, shape (X, Y, Z), optional
        Data weights: magnitude (e.g. the root-sum-of-squares over echoes) or 1 / field noise SD;
        normalised to mean 1 in the mask. Uniform in the mask by default.
    regularization : float, optional
        ``alpha``, weight of the total variation (ppm mm, for weights of mean 1). The sum of
        absolute differences is up to sqrt(3) times the gradient's length, so this is below the
        isotropic TV's usual weight (3e-4 here before): 2e-4 gives 34.5 / 38.5 / 59.7 % chi NRMSE
        after LBV / PDF / V-SHARP on the 2 mm phantom (3e-4: 35.9 / 38.9 / 60.3 %).
    outside_regularization : float, optional
        Weight of the total variation outside the mask, as a fraction of ``regularization``: 0
        (free sources outside the mask) or 1 (the same everywhere, as FANSI).
    data_term : {'nonlinear', 'linear'}, optional
        Data term; the non-linear one needs ``phase_scale``.
    phase_scale : float, optional
        Radians per ppm of the phase behind the field, ``2 pi gamma_bar B0 TE`` with TE the
        effective echo time of the field (e.g. about 16 rad/ppm at 3 T and 20 ms).
    gradient_penalty : float, optional
        ADMM penalty of the gradient split; ``100 * regularization`` by default (as FANSI).
    data_penalty : float, optional
        ADMM penalty of the data split (for weights of mean 1). The free sources outside the mask
        converge faster with a small one (0.1: chi NRMSE 35 % after 100 iterations on the 2 mm
        phantom; 1: 41 %).
    max_iter : int, optional
        Maximum ADMM iterations.
    tol : float, optional
        Stop when the relative change of chi in the mask between iterations falls below this.
    pad : int, optional
        Zero voxels around the mask's bounding box.
    workers : int, optional
        Threads for :mod:`scipy.fft`.

    Returns
    -------
    chi : ndarray, shape (X, Y, Z), float32
        Susceptibility in ppm, 0 outside the mask.
    """
    if data_term not in ("nonlinear", "linear"):
        raise ValueError(f"data_term must be 'nonlinear' or 'linear', got {data_term!r}")
    if data_term == "nonlinear":
        if phase_scale is None or not np.isfinite(phase_scale) or phase_scale <= 0:
            raise ValueError(
                "the nonlinear data term needs phase_scale = 2 pi gamma_bar B0 TE in "
                "rad/ppm (e.g. 16 at 3 T, TE 20 ms), or pass data_term='linear'"
            )
    if not np.isfinite(outside_regularization) or outside_regularization < 0:
        raise ValueError(f"outside_regularization must be a non-negative number, got {outside_regularization!r}")
    problem = _Problem(local_field, mask, voxel_size, b0_direction, pad, workers, weights)
    grid, kernel = problem.grid, problem.kernel
    voxel_size = grid.voxel_size
    alpha = np.float32(regularization)
    mu_gradient = np.float32(100 * regularization if gradient_penalty is None else gradient_penalty)
    if outside_regularization == 1:
        threshold = alpha / mu_gradient
    else:
        outside = np.float32(outside_regularization) * alpha / mu_gradient
        # an edge is regularised as inside when either of its voxels is
        threshold = np.where(edges_touching(problem.inside), alpha / mu_gradient, outside).astype(np.float32)
    mu_data = np.float32(data_penalty)
    denominator = mu_gradient * grid.gradient_power() + mu_data * kernel**2
    denominator[0, 0, 0] = 1.0
    gradient_factor = (mu_gradient / denominator).astype(np.complex64)
    data_factor = (mu_data * kernel / denominator).astype(np.complex64)
    del denominator

    # The data split is only constrained inside the mask (zero weight elsewhere): handle those
    # voxels as flat vectors; outside, z_d equals the previous D chi and the dual stays 0.
    inside = problem.inside
    field = problem.field[inside]
    weight_squared = problem.weights[inside] ** 2
    data_split = field.copy()
    data_dual = np.zeros_like(field)
    chi = np.zeros(grid.shape, dtype=np.float32)
    gradient = np.empty((3,) + grid.shape, dtype=np.float32)
    gradient_split = np.zeros_like(gradient)
    gradient_dual = np.zeros_like(gradient)
    model = np.zeros(grid.shape, dtype=np.float32)
    scale = np.float32(phase_scale) if data_term == "nonlinear" else None
    for _ in range(max_iter):
        np.subtract(gradient_split, gradient_dual, out=gradient)
        model[inside] = data_split - data_dual
        spectrum = grid.rfft(forward_difference_adjoint(gradient, voxel_size)) * gradient_factor
        spectrum += grid.rfft(model) * data_factor
        previous = chi
        chi = grid.irfft(spectrum).astype(np.float32, copy=False)
        # The spectrum of chi is already at hand: rfft(irfft(X)) = X for X Hermitian-consistent,
        # as a sum of real arrays' spectra times real factors is.
        spectrum *= kernel
        model = grid.irfft(spectrum).astype(np.float32, copy=False)
        del spectrum
        forward_difference(chi, voxel_size, out=gradient)
        gradient += gradient_dual
        _shrink(gradient, threshold, out=gradient_split)
        # gradient now holds grad(chi) + dual: the dual update is its excess over the split.
        np.subtract(gradient, gradient_split, out=gradient_dual)
        target = model[inside] + data_dual
        if data_term == "linear":
            data_split = (weight_squared * field + mu_data * target) / (weight_squared + mu_data)
        else:
            # Newton steps on W^2 (1 - cos k (z - f)) / k^2 + mu/2 (z - target)^2, per voxel,
            # from the linear solution.
            data_split = (weight_squared * field + mu_data * target) / (weight_squared + mu_data)
            for _newton in range(3):
                residual = scale * (data_split - field)
                slope = weight_squared * np.sin(residual) / scale + mu_data * (data_split - target)
                curvature = weight_squared * np.maximum(np.cos(residual), 0.0) + mu_data
                data_split -= slope / curvature
        data_dual = target - data_split
        inside_now = chi[inside]
        change = np.linalg.norm(inside_now - previous[inside]) / max(float(np.linalg.norm(inside_now)), 1e-12)
        if change < tol:
            break
    return problem.result(chi)
