r"""Proton density (PD, percent water) from the apparent M0 of a relaxometry fit.

The apparent equilibrium magnetisation of an R1 fit on T2*-decay-corrected (TE = 0, ESTATICS)
intercepts is :math:`M_0(x) = G\,f(x)\,PD(x)`: PD times the receive sensitivity :math:`f` of the coil
times a global gain :math:`G`. Two steps remove :math:`f` and :math:`G`:

1. **Receive sensitivity.**

   * With an ``RB1COR`` pair (Papp 2016): the same low-resolution PD-weighted image acquired with the
     head coil and with the body coil; the body coil is nearly uniform, so
     :math:`f \propto \mathrm{smooth}(S_{head}) / \mathrm{smooth}(S_{body})` (the tissue contrast, common to
     both, cancels). :func:`receive_sensitivity` forms this ratio of smoothed images by normalised
     convolution: it equals the Gaussian-smoothed voxel ratio weighted by the body-coil signal, so
     low-signal voxels (bone, air, sinuses) count little and are left out below a threshold; holes
     and the region outside the head are filled smoothly. The body coil is not exactly flat (at 3 T a
     few percent, centre-bright): that residual stays in the PD map, as on a scanner.
   * Without a pair: :func:`receive_bias_from_r1` uses the empirical linear relation between the
     inverse water content and R1 in brain tissue (Fatouros 1991; Volz 2012; Baudrexel 2016),
     :math:`1/PD = A + B\,R_1`. With :math:`\kappa = B/A` and a smooth log-field
     :math:`\log f = p(x)` (a polynomial of low degree in the voxel position),

     .. math:: \log M_0 + \log(1 + \kappa R_1) = p(x) + \mathrm{const}

     holds in white and grey matter. For each :math:`\kappa` the polynomial is fitted by robust
     (Tukey biweight) least squares; :math:`\kappa` is chosen where the residual spread of 90 % of
     the voxels (trimmed RMS) is smallest, since only the right :math:`\kappa` leaves no tissue
     contrast in the left-hand side.
     **Assumptions**: (i) the receive field is smooth enough for a polynomial of the given degree;
     (ii) one linear 1/PD-R1 relation holds in most brain-tissue voxels (deep grey matter, whose
     iron raises R1, and lesions deviate and are down-weighted as outliers, but if they dominate a
     region they bias the field there); (iii) R1 is itself free of transmit bias (B1-corrected); (iv)
     the field is identifiable only up to a constant, which the calibration fixes. The estimate is
     less accurate than a body-coil pair (see the tests for figures on the phantom).

2. **Calibration in percent water** (:func:`calibrate_pd`): the corrected M0 is scaled so that a
   reference region has its nominal water content: cerebrospinal fluid 100 % or white matter 69 %
   (Tofts 2003; the hMRI default). The region is found from R1 alone (:func:`classify_by_r1`,
   three-class k-means on log R1 inside the brain mask), then refined on the mean R1 of each voxel's
   3x3x3 neighbourhood (voxels whose neighbourhood lies wholly in the mask): white matter is the
   highest-R1 class, and its voxels within 3 % of the mode of that local R1 (partial volume with
   grey matter and lesions fall outside); CSF is the lowest-R1 class, and its purest 2 % (lowest
   local R1, since partial volume with tissue raises R1: deep in the ventricles). Selecting on the
   voxel's own R1 would, with noise, pick the voxels whose noise lowered R1 and so raised M0 (the
   two estimates are anti-correlated); the neighbourhood mean is 5 times less noisy and nearly
   independent of the voxel's own M0. In MS the normal-appearing
   white matter holds more water than 69 % (the phantom's patient: 71 %), which biases a
   white-matter calibration by the same ratio; CSF is the unbiased choice when the ventricles are
   large enough to hold pure voxels.

References
----------
.. [1] Papp D, Callaghan MF, Meyer H, Buckley C, Weiskopf N. Correction of inter-scan motion
   artifacts in quantitative R1 mapping by accounting for receive coil sensitivity effects. Magn Reson
   Med 2016;76:1478-1485.
.. [2] Volz S, Nöth U, Deichmann R. Correction of systematic errors in quantitative proton density
   mapping. Magn Reson Med 2012;68:74-85.
.. [3] Baudrexel S, Reitz SC, Hof S, et al. Quantitative T1 and proton density mapping with direct
   calculation of radiofrequency coil transmit and receive profiles from two-point variable flip
   angle data. NMR Biomed 2016;29:349-360.
.. [4] Fatouros PP, Marmarou A, Kraus KA, Inao S, Schwarzmaier H-J. In vivo brain water
   determination by T1 measurements. Magn Reson Med 1991;17:402-413.
.. [5] Tofts P. Quantitative MRI of the Brain. Wiley 2003, chapter 4 (PD of white matter 69 %).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import ndimage, optimize

from ..masking import _LogPolynomial, robust_linear_fit, sample_voxels
from ..smoothing import normalised_convolution

__all__ = [
    "PD_REFERENCES",
    "PDCalibration",
    "ReceiveBias",
    "calibrate_pd",
    "classify_by_r1",
    "pd_reference_region",
    "receive_bias_from_r1",
    "receive_sensitivity",
]

#: Nominal water content (percent) of each calibration reference.
PD_REFERENCES = {"csf": 100.0, "wm": 69.0}

#: Class labels of :func:`classify_by_r1`.
CSF, GREY, WHITE = 1, 2, 3

_MIN_REFERENCE_VOXELS = 20
#: Share of tissue voxels whose residual decides the 1/PD-R1 slope (the rest: lesions, iron-rich nuclei).
_KAPPA_TRIM = 0.9
#: White-matter reference: voxels within this relative distance of the R1 mode of the class.
_WM_WINDOW = 0.03
#: CSF reference: voxels of the class below this percentile of its R1 (partial volume raises R1; at
#: 2 mm the phantom's lowest 2 % of CSF-class voxels hold 99.3 % water, its lowest quarter 94 %).
_CSF_PERCENTILE = 2.0


def _histogram_mode(values, n_bins=100):
    """Centre of the most populated bin of a lightly smoothed histogram."""
    low, high = np.percentile(values, [0.5, 99.5])
    counts, edges = np.histogram(values, bins=n_bins, range=(low, high))
    counts = np.convolve(counts, np.ones(5) / 5.0, mode="same")
    peak = int(np.argmax(counts))
    return 0.5 * (edges[peak] + edges[peak + 1])


def receive_sensitivity(
    head, body, *, mask=None, voxel_size=(1.0, 1.0, 1.0), smoothing_fwhm=12.0, min_signal_fraction=0.1
):
    """Relative receive sensitivity of the head coil from an RB1COR head/body pair (same grid).

    Parameters
    ----------
    head, body : array_like, 3-D
        Magnitudes acquired with the head and with the body coil (identical protocol and grid).
    mask : array_like of bool, optional
        Voxels allowed into the estimate (e.g. a head or brain mask); low-signal voxels are always
        left out.
    voxel_size : sequence of float, optional
        Voxel size (mm).
    smoothing_fwhm : float, optional
        Gaussian FWHM (mm) of the smoothing of both images (hMRI: 12 mm).
    min_signal_fraction : float, optional
        Voxels whose body- or head-coil signal is below this fraction of its 99th percentile are
        left out (noise, bone, air).

    Returns
    -------
    numpy.ndarray
        Sensitivity (ratio), finite everywhere, median 1 over the voxels used.

    Raises
    ------
    ValueError
        If the images differ in shape or no voxel has signal in both.
    """
    head = np.asarray(head, dtype=float)
    body = np.asarray(body, dtype=float)
    if head.shape != body.shape:
        raise ValueError(
            f"the head- and body-coil RB1COR images must share a grid, got shapes {head.shape} and {body.shape}"
        )
    valid = np.isfinite(head) & np.isfinite(body)
    for image in (head, body):
        values = image[valid]
        level = np.percentile(values, 99) if values.size else 0.0
        valid &= image > min_signal_fraction * level
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    if not np.any(valid):
        raise ValueError(
            "no voxel has signal in both RB1COR images: check that the head- and body-coil images "
            "cover the head and are not empty"
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(valid, head / body, np.nan)
    # weights = body signal: the weighted smoothed ratio is smooth(head) / smooth(body) over valid voxels
    sensitivity = normalised_convolution(ratio, np.where(valid, body, 0.0), voxel_size, smoothing_fwhm)
    return sensitivity / np.median(sensitivity[valid])


def classify_by_r1(r1, mask, *, n_iter=30):
    """Three tissue classes (CSF, grey, white matter) by k-means on log R1 inside a brain mask.

    Parameters
    ----------
    r1 : array_like
        R1 map (1/s), B1-corrected.
    mask : array_like of bool
        Brain mask (intracranial, CSF included).
    n_iter : int, optional
        k-means iterations.

    Returns
    -------
    labels : numpy.ndarray of int8
        0 outside the mask or where R1 is not positive, else :data:`CSF` (1), :data:`GREY` (2) or
        :data:`WHITE` (3), in increasing order of R1.
    centres : numpy.ndarray, shape (3,)
        Class centres (R1, 1/s).
    """
    r1 = np.asarray(r1, dtype=float)
    usable = np.asarray(mask, dtype=bool) & np.isfinite(r1) & (r1 > 0)
    if np.count_nonzero(usable) < 3 * _MIN_REFERENCE_VOXELS:
        raise ValueError(
            f"only {np.count_nonzero(usable)} voxels of the brain mask have a positive R1: check that "
            "the mask and the R1 map belong to the same subject and grid"
        )
    values = np.log(r1[usable])
    centres = np.percentile(values, [5.0, 50.0, 90.0])
    assignment = np.zeros(values.size, dtype=int)
    for _ in range(int(n_iter)):
        boundaries = 0.5 * (centres[1:] + centres[:-1])
        assignment = np.searchsorted(boundaries, values)
        updated = np.array(
            [values[assignment == k].mean() if np.any(assignment == k) else centres[k] for k in range(3)]
        )
        if np.allclose(updated, centres, atol=1e-6):
            break
        centres = np.sort(updated)
    labels = np.zeros(r1.shape, dtype=np.int8)
    labels[usable] = assignment + 1
    return labels, np.exp(centres)


def pd_reference_region(r1, mask, reference):
    """Voxels of the calibration reference found from R1 (see the module docstring).

    Parameters
    ----------
    r1 : array_like
        R1 map (1/s).
    mask : array_like of bool
        Brain mask.
    reference : {"csf", "wm"}

    Returns
    -------
    numpy.ndarray of bool
    """
    if reference not in PD_REFERENCES:
        raise ValueError(f"the PD calibration reference must be one of {sorted(PD_REFERENCES)}, got {reference!r}")
    r1 = np.asarray(r1, dtype=float)
    labels, _ = classify_by_r1(r1, mask)
    # select on the 3x3x3 mean R1: its noise is ~5 x lower and barely correlated with the voxel's own
    # M0 (a voxel's R1 and M0 errors are anti-correlated, so selecting on its own low R1 picks high M0)
    usable = labels > 0
    counts = ndimage.uniform_filter(usable.astype(float), 3)
    with np.errstate(divide="ignore", invalid="ignore"):
        local_r1 = ndimage.uniform_filter(np.where(usable, r1, 0.0), 3) / counts
    if reference == "wm":
        white = (labels == WHITE) & (counts > 0.99)
        region = white
        if np.count_nonzero(white) >= _MIN_REFERENCE_VOXELS:
            mode = _histogram_mode(local_r1[white])
            region = white & (np.abs(local_r1 / mode - 1.0) <= _WM_WINDOW)
    else:
        csf = (labels == CSF) & (counts > 0.99)
        region = csf & (local_r1 <= np.percentile(local_r1[csf], _CSF_PERCENTILE)) if np.any(csf) else csf
    if np.count_nonzero(region) < _MIN_REFERENCE_VOXELS:
        raise ValueError(
            f"the {reference.upper()} reference region holds only {np.count_nonzero(region)} voxels: "
            "use the other reference (--pd-calibration) or check the brain mask"
        )
    return region


class ReceiveBias(NamedTuple):
    """Receive field estimated from the 1/PD-R1 relation: the field (median 1 over the tissue used),
    the fitted ratio ``kappa = B/A`` (s) of the relation ``1/PD = A + B R1``, and the tissue voxels."""

    field: np.ndarray
    kappa: float
    tissue: np.ndarray


def receive_bias_from_r1(
    m0, r1, mask, *, voxel_size=(1.0, 1.0, 1.0), degree=3, kappa_range=(0.0, 4.0), max_samples=20_000, seed=0
):
    """Smooth receive field from the linear 1/PD-R1 relation of brain tissue (no body-coil pair).

    Parameters
    ----------
    m0 : array_like
        Apparent M0 (receive field included).
    r1 : array_like
        B1-corrected R1 map (1/s).
    mask : array_like of bool
        Brain mask; its grey and white matter (:func:`classify_by_r1`) enter the fit.
    voxel_size : sequence of float, optional
        Voxel size (mm).
    degree : int, optional
        Total degree of the polynomial log-field.
    kappa_range : (float, float), optional
        Search interval of ``kappa = B/A`` (s); brain tissue at 3 T gives about 0.5-1 s.
    max_samples : int, optional
        Voxels (random subset) used in the fit.
    seed : int, optional
        Seed of the subset.

    Returns
    -------
    ReceiveBias
    """
    m0 = np.asarray(m0, dtype=float)
    r1 = np.asarray(r1, dtype=float)
    labels, _ = classify_by_r1(r1, mask)
    tissue = ((labels == GREY) | (labels == WHITE)) & np.isfinite(m0) & (m0 > 0)
    indices = np.flatnonzero(tissue)
    if indices.size < 20 * (degree + 1) ** 3:
        raise ValueError(
            f"only {indices.size} grey/white-matter voxels for the receive-field fit: give an RB1COR "
            "pair or turn the receive correction off (--no-receive-correction)"
        )
    indices, positions = sample_voxels(indices, m0.shape, voxel_size, max_samples=max_samples, seed=seed)
    model = _LogPolynomial.around(positions, degree)
    design = model.design(positions)
    log_m0 = np.log(m0.ravel()[indices])
    sample_r1 = r1.ravel()[indices]

    def spread(kappa):
        # trimmed, not biweighted: the biweight could drop a whole tissue class as outliers and
        # make any kappa look good; 90 % of the voxels must fit one line
        target = log_m0 + np.log1p(kappa * sample_r1)
        residual = target - design @ robust_linear_fit(design, target)[0]
        residual = np.abs(residual - np.median(residual))
        kept = residual <= np.percentile(residual, 100.0 * _KAPPA_TRIM)
        return float(np.sqrt(np.mean(residual[kept] ** 2)))

    # coarse grid first: the spread may have shallow local minima
    grid = np.linspace(kappa_range[0], kappa_range[1], 9)
    best = int(np.argmin([spread(k) for k in grid]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    kappa = float(optimize.minimize_scalar(spread, bounds=(low, high), method="bounded").x)
    model.coefficients = robust_linear_fit(design, log_m0 + np.log1p(kappa * sample_r1))[0]
    log_field = model.evaluate_grid(m0.shape, voxel_size)
    field = np.exp(log_field - np.median(log_field[tissue]))
    return ReceiveBias(field, kappa, tissue)


class PDCalibration(NamedTuple):
    """Calibrated PD (percent water; NaN outside the mask), the factor applied to the receive-corrected
    M0, and the reference region."""

    pd: np.ndarray
    scale: float
    reference_region: np.ndarray


def calibrate_pd(m0, r1, mask, *, receive=None, reference="csf", reference_pd=None):
    """PD in percent water: M0 divided by the receive sensitivity, scaled on a reference region.

    Parameters
    ----------
    m0 : array_like
        Apparent M0 (T2*-decay corrected, B1 corrected).
    r1 : array_like
        R1 map (1/s), for finding the reference region.
    mask : array_like of bool
        Brain mask.
    receive : array_like, optional
        Receive sensitivity on the same grid (any scale); ``None``: no receive correction.
    reference : {"csf", "wm"}, optional
        Calibration reference.
    reference_pd : float, optional
        Water content (percent) of the reference; default :data:`PD_REFERENCES` (CSF 100, WM 69).

    Returns
    -------
    PDCalibration
    """
    if reference not in PD_REFERENCES:
        raise ValueError(f"the PD calibration reference must be one of {sorted(PD_REFERENCES)}, got {reference!r}")
    target = PD_REFERENCES[reference] if reference_pd is None else float(reference_pd)
    mask = np.asarray(mask, dtype=bool)
    m0 = np.asarray(m0, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        corrected = m0 if receive is None else m0 / np.asarray(receive, dtype=float)
    region = pd_reference_region(r1, mask & np.isfinite(corrected), reference)
    level = np.median(corrected[region])
    if not (np.isfinite(level) and level > 0):
        raise ValueError(f"the M0 of the {reference.upper()} reference region is not positive: check the M0 map")
    scale = target / level
    pd = np.where(mask, corrected * scale, np.nan)
    return PDCalibration(pd, float(scale), region)
