r"""Transmit field (B1+) from variable-flip-angle data alone, without a B1 map (UNICORT-like).

An R1 fit that assumes the nominal flip angles where the actual ones are :math:`B_1` times larger
returns, in the small-angle regime, :math:`R_1^{app} = R_1 (\hat B_1/B_1)^2` (DESPOT1 in the
small-angle regime, Helms 2008): the transmit field appears in the R1 map as a smooth multiplicative
bias. As in UNICORT (Weiskopf 2011), which runs SPM's bias-corrected segmentation on the R1 map,
:func:`estimate_b1_from_vfa` models the log of the apparent R1 inside the brain as

.. math:: \log R_1^{app}(x) = \mu_{k(x)} + \beta(x) + \varepsilon,

a mixture of three tissue classes :math:`k` (CSF, grey, white matter; Gaussian in log R1, each with
its own mean and spread) plus a smooth field :math:`\beta` (polynomial of low degree in the voxel
position), fitted by expectation-maximisation (Wells 1996; Van Leemput 1999): class posteriors,
then class means and spreads, then the polynomial by weighted least squares of the residuals. The
B1 estimate is updated as :math:`\hat B_1 \leftarrow \hat B_1 e^{-\beta/2}`, the R1 map is refitted with
the exact Ernst equation and the new :math:`\hat B_1`, and the loop repeats (the square root is
only a first-order inversion; the outer iterations remove the rest).

Assumptions (what the estimate relies on)
-----------------------------------------
* B1+ is smooth: a polynomial of the given total degree in log B1 represents it over the brain
  (at 3 T the field varies on the scale of the head; degree 4 leaves well under 1 %).
* R1 is piecewise constant: each tissue class has one R1 across the brain, so any low-frequency
  variation of the apparent R1 within a class is transmit bias. Real tissue violates this mildly
  (R1 of white matter varies by a few percent between tracts; deep grey nuclei carry iron;
  lesions): such deviations are absorbed by the class spread, and large smooth ones (a
  frontal-occipital R1 gradient) would be mistaken for B1.
* Scale: smoothness cannot tell a uniform flip-angle error from a uniform R1 change, so the mean
  of the field over the mask is fixed to ``mean_b1`` (1 by default: the scanner's transmitter
  calibration sets the average flip angle over the head to the nominal one). A wrong calibration
  leaves a uniform R1 error of about twice the relative B1 offset.
* The R1 fit itself is ideal-spoiling DESPOT1 (:func:`.despot1.fit_r1`); any imperfect-spoiling
  bias that varies smoothly with B1 is partly absorbed into the estimate.

References
----------
.. [1] Weiskopf N, Lutti A, Helms G, Novak M, Ashburner J, Hutton C. Unified segmentation based
   correction of R1 brain maps for RF transmit field inhomogeneities (UNICORT). NeuroImage
   2011;54:2116-2124.
.. [2] Wells WM, Grimson WEL, Kikinis R, Jolesz FA. Adaptive segmentation of MRI data. IEEE Trans Med
   Imaging 1996;15:429-442.
.. [3] Palma G, Tedeschi E, Borrelli P, et al. A novel multiparametric approach to 3D quantitative
   MRI of the brain. PLoS One 2015;10:e0134963 (an iterative, map-free alternative).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage

from ..masking import _exponents, _LogPolynomial, sample_voxels, weighted_least_squares
from .despot1 import fit_r1

__all__ = ["B1Estimate", "estimate_b1_from_vfa"]

_N_CLASSES = 3
#: Share of the brain voxels (least locally variable apparent R1) that enter the mixture fit.
_HOMOGENEOUS_FRACTION = 0.4


class B1Estimate(NamedTuple):
    """Map-free transmit field (ratio, 1 = nominal; finite everywhere), the R1 map (1/s) fitted with it
    (NaN outside the mask; None unless asked for) and the class means (R1, 1/s) of the last iteration."""

    b1: np.ndarray
    r1: np.ndarray
    class_r1: np.ndarray


def _mixture_field(values, design, *, n_iter):
    """EM of a 3-class Gaussian mixture in ``values`` plus a smooth field ``design @ coefficients``."""
    means = np.percentile(values, [10.0, 50.0, 90.0])
    spreads = np.full(_N_CLASSES, np.std(values) / _N_CLASSES)
    priors = np.full(_N_CLASSES, 1.0 / _N_CLASSES)
    field = np.zeros(values.size)
    coefficients = np.zeros(design.shape[1])
    for _ in range(int(n_iter)):
        residual = (values - field)[:, None] - means[None, :]
        log_p = np.log(priors) - np.log(spreads) - 0.5 * (residual / spreads) ** 2
        log_p -= log_p.max(axis=1, keepdims=True)
        posterior = np.exp(log_p)
        posterior /= posterior.sum(axis=1, keepdims=True)
        totals = posterior.sum(axis=0) + 1e-12
        corrected = values - field
        means = (posterior * corrected[:, None]).sum(axis=0) / totals
        spreads = np.sqrt((posterior * (corrected[:, None] - means) ** 2).sum(axis=0) / totals)
        spreads = np.maximum(spreads, 1e-3)
        priors = totals / totals.sum()
        precision = posterior / spreads**2
        weights = precision.sum(axis=1)
        target = values - (precision * means).sum(axis=1) / weights
        coefficients = weighted_least_squares(design, target, weights)
        field = design @ coefficients
        # the constant is shared by the field and the class means: keep it in the means
        offset = np.average(field, weights=weights)
        field -= offset
        coefficients[0] -= offset
    return coefficients, np.exp(np.sort(means))


def _homogeneous_voxels(signals, flip_angles, repetition_time, mask, method, *, fraction=_HOMOGENEOUS_FRACTION):
    """Mask voxels whose 3x3x3 neighbourhood has the least spread of log apparent R1.

    The transmit field barely changes over three voxels, so a large local spread marks a tissue
    boundary: partial-volume voxels, which belong to no class, are left out of the mixture fit.
    """
    r1 = fit_r1(signals, flip_angles, repetition_time, method=method, mask=mask).r1
    usable = mask & np.isfinite(r1) & (r1 > 0)
    values = np.where(usable, np.log(np.where(usable, r1, 1.0)), 0.0)
    weight = ndimage.uniform_filter(usable.astype(float), 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = ndimage.uniform_filter(values, 3) / weight
        variance = ndimage.uniform_filter(values**2, 3) / weight - mean**2
    # the neighbourhood must be mostly usable: mask edges are boundaries too
    candidates = usable & (weight > 0.9)
    if not np.any(candidates):
        return usable
    return candidates & (variance <= np.percentile(variance[candidates], 100.0 * fraction))


def estimate_b1_from_vfa(
    signals,
    flip_angles,
    repetition_time,
    mask,
    *,
    voxel_size=(1.0, 1.0, 1.0),
    degree=4,
    mean_b1=1.0,
    n_outer=6,
    n_em=25,
    max_samples=20_000,
    seed=0,
    fit_map=True,
):
    """Smooth B1+ ratio map from VFA signals alone (see the module docstring for the assumptions).

    Parameters
    ----------
    signals : array_like, shape (X, Y, Z, n_flip)
        TE = 0 signals (ESTATICS intercepts) or single-echo magnitudes, one per flip angle.
    flip_angles : array_like, shape (n_flip,)
        Nominal flip angles (rad).
    repetition_time : float
        TR (s).
    mask : array_like of bool, shape (X, Y, Z)
        Brain mask (CSF may be included).
    voxel_size : sequence of float, optional
        Voxel size (mm).
    degree : int, optional
        Total degree of the polynomial log-field.
    mean_b1 : float, optional
        Mean of the field over the mask (the scale the data cannot give).
    n_outer : int, optional
        Refits of R1 with the updated field: the polynomial degree rises from 1 to ``degree`` over
        the first ones (coarse to fine), the rest use ``degree``.
    n_em : int, optional
        EM iterations per refit.
    max_samples : int, optional
        Voxels (random subset) used by the EM.
    seed : int, optional
        Seed of the subset.
    fit_map : bool, optional
        Also refit the R1 map with the estimate (``B1Estimate.r1``; None when False).

    Returns
    -------
    B1Estimate
    """
    signals = np.asarray(signals, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    if signals.ndim != 4 or signals.shape[:3] != mask.shape:
        raise ValueError(
            f"signals must have shape mask.shape + (n_flip,), got {signals.shape} for a mask of shape {mask.shape}"
        )
    if not mean_b1 > 0:
        raise ValueError(f"mean_b1 must be positive, got {mean_b1!r}")
    shape = mask.shape
    method = "two_angle" if signals.shape[-1] == 2 else "linear"
    indices = np.flatnonzero(_homogeneous_voxels(signals, flip_angles, repetition_time, mask, method))
    if indices.size < 20 * (degree + 1) ** 3:
        raise ValueError(
            f"only {indices.size} brain voxels for the map-free B1 estimate: check the brain mask "
            "(the estimate needs most of the brain)"
        )
    indices, positions = sample_voxels(indices, shape, voxel_size, max_samples=max_samples, seed=seed)
    class_r1 = np.full(_N_CLASSES, np.nan)
    sample_signals = signals.reshape(-1, signals.shape[-1])[indices]
    # the loop works on the sampled voxels only; the whole grid is evaluated once at the end
    sample_log_b1 = np.zeros(indices.size)
    models = []
    # coarse to fine: a low-degree field first, while tissue classes and field are still confounded
    schedule = list(range(1, int(degree) + 1)) + [int(degree)] * max(int(n_outer) - int(degree), 0)
    for current_degree in schedule:
        model = _LogPolynomial.around(positions, current_degree)
        design = model.design(positions)
        sample_b1 = mean_b1 * np.exp(sample_log_b1 - np.log(np.mean(np.exp(sample_log_b1))))
        sample_r1 = fit_r1(sample_signals, flip_angles, repetition_time, b1=sample_b1, method=method).r1
        usable = np.isfinite(sample_r1) & (sample_r1 > 0)
        coefficients, class_r1 = _mixture_field(np.log(sample_r1[usable]), design[usable], n_iter=n_em)
        # R1 fitted with flip angles too small by B1/estimate is too low by (B1/estimate)^2
        model.coefficients = -coefficients / 2.0
        sample_log_b1 = sample_log_b1 + design @ model.coefficients
        models.append(model)
    # every model shares centre and scale: their sum is one polynomial of the highest degree
    combined = _LogPolynomial.around(positions, max(schedule))
    position_of = {exponent: k for k, exponent in enumerate(_exponents(combined.degree))}
    for model in models:
        for exponent, coefficient in zip(_exponents(model.degree), model.coefficients):
            combined.coefficients[position_of[exponent]] += coefficient
    log_b1 = combined.evaluate_grid(shape, voxel_size)
    log_b1 -= np.log(np.mean(np.exp(log_b1[mask])) / mean_b1)
    b1 = np.exp(log_b1)
    r1 = fit_r1(signals, flip_angles, repetition_time, b1=b1, method=method, mask=mask).r1 if fit_map else None
    return B1Estimate(b1, r1, class_r1)
