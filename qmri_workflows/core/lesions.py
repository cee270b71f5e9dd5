"""Lesion-wise analysis: connected lesions, core and rim, contrasts against NAWM, stage.

Each connected lesion (6-connected voxels of the lesion mask) is split into a *rim* (the lesion
voxels within ``rim_mm`` of its edge) and a *core* (the rest); a lesion too small to keep a core has
no rim assessment. Every map's mean in the lesion, core and rim is compared with the lesion's
reference, the median of the normal-appearing white matter (NAWM) around it: absolute contrast
``lesion - NAWM`` and, for relaxation-rate maps, relative contrast ``(lesion - NAWM) / NAWM``.

Local reference
---------------
The reference is the NAWM within :data:`LOCAL_REFERENCE_MM` of the lesion's edge (the NAWM mask
already leaves out a perilesional margin), not the whole NAWM: what varies over centimetres, such
as the residual background field of QSM after background removal and residual B1+ / receive-field
errors of R1 and PD, is then the same in lesion and reference, as when a reader compares a lesion
with the white matter around it. (On the App's 2 mm phantom maps, the whole-NAWM reference put the
chi contrast of the white-matter lesions 40-110 ppb off, mostly too low: more than the stages
differ by; the local one puts it within 15 ppb, 28 ppb for the rim lesions.) A lesion
with fewer than 20 NAWM voxels around it (against cortex or ventricles) uses the whole NAWM. The
standard error of a contrast, ``<map>_contrast_error``, comes from the reference's voxel spread
(noise and tissue texture, robust SD) and the numbers of lesion and reference voxels.

Paramagnetic rim
----------------
Iron-laden microglia at the edge of chronic active lesions raise chi and R2* there (Table 1 of the
review: "increased R2* and QSM at the periphery"). Partial volume mixes the edge of *any* lesion
with the NAWM around it, so a rim value between core and NAWM says nothing; a paramagnetic rim is a
rim value *above both* the core and NAWM. The rim score of a map is ``rim - max(core, NAWM)`` on
medians: a lesion's central vein (the "central vein sign") is paramagnetic and, in a core of a
few voxels, lifts the core's mean chi to the level of the rim; it fills only a few voxels, so the
medians ignore it, while an iron rim lines the whole edge. A score is significant when it exceeds
twice its standard error (robust SDs of rim and core).

Iron raises chi *and* R2*; myelin, the other main source of R2*, is diamagnetic, and myelin loss
raises chi while it lowers R2* (late active lesions). A paramagnetic rim is therefore a rim where
both maps rise (both scores > 0) and at least one rise is significant. With only one of the two
maps, its significant rim decides alone (R2* alone is the weaker sign).

Stage (Table 1 of the review)
-----------------------------
* **cortical**: most of the tissue around the lesion (a one-voxel shell, CSF left out) is cortex.
* **chronic active**: a paramagnetic rim.
* With a gadolinium-enhancement mask: enhancing lesions are active, the others chronic
  (chronic inactive without a rim).
* Otherwise the susceptibility rise per unit of demyelination tells the stages apart:
  ``q = (chi_lesion - chi_NAWM) / |relative R1 contrast|`` in ppb per percent of R1 loss. Edema and
  myelin breakdown lower R1 at every stage, but chi rises only once myelin debris is cleared and iron
  released: not yet in early active lesions ("no QSM changes"), strongly in late active ones ("QSM
  increase"), and it stays raised, then fades, in chronic inactive ones ("high QSM values ... which
  gradually become similar to NAWM"). Partial volume dilutes the chi and R1 contrasts of a small
  lesion by the same factor, so their ratio does not depend on the lesion's size. The two limits,
  :data:`NO_SUSCEPTIBILITY_RISE` and :data:`STRONG_SUSCEPTIBILITY_RISE`, split "no", "moderate" and
  "strong" rise: early active < 0.1 <= chronic inactive < 0.8 <= late active. The evidence gives
  the chi contrast with its standard error, so that a user sees when noise could move ``q`` across
  a limit (a test of significance would instead call every imprecise rise "none").
  Without R1, the R2* contrast takes its place (same direction, similar size in lesions).
* Without chi (no QSM) and without gadolinium, a white-matter lesion without an R2* rim cannot be
  staged: ``"white matter lesion (stage undetermined)"``.

Origin of the limits: the two ``q`` limits are physically motivated orders of magnitude (a rise
of tens of ppb over an R1 loss of 10-30 % is "strong", one ppb per ten percent is "none"), the
significance level of two standard errors is the usual one (about 2 % false alarms per test for
normal errors), the robust-statistics constants are those of a normal distribution, and the reach
of the local reference is set by the centimetre scale of residual background fields; none is
fitted to one dataset. The evidence column of every lesion lists the numbers that led to its stage
so that a user can judge them.

References
----------
Chen W, Gauthier SA, Gupta A, et al. Quantitative susceptibility mapping of multiple sclerosis
lesions at various ages. Radiology 2014;271:183-192.

Absinta M, Sati P, Masuzzo F, et al. Association of chronic active multiple sclerosis lesions with
disability in vivo. JAMA Neurol 2019;76:1474-1483.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from .regions import dilate_mask, erode_mask

__all__ = [
    "label_lesions",
    "lesion_shells",
    "analyse_lesions",
    "stage_lesion",
    "LESION_STAGES",
    "UNDETERMINED",
    "NO_SUSCEPTIBILITY_RISE",
    "STRONG_SUSCEPTIBILITY_RISE",
    "RELATIVE_CONTRAST_MAPS",
    "LOCAL_REFERENCE_MM",
]

LESION_STAGES = ("early active", "late active", "chronic active", "chronic inactive", "cortical")
UNDETERMINED = "white matter lesion (stage undetermined)"
#: Susceptibility rise (ppb per percent of R1 loss) below which chi has not changed (early active).
NO_SUSCEPTIBILITY_RISE = 0.1
#: Susceptibility rise (ppb per percent of R1 loss) above which it is strong (late active).
STRONG_SUSCEPTIBILITY_RISE = 0.8
#: Maps whose relative contrast (lesion / NAWM - 1) is meaningful: rates and times, PD.
RELATIVE_CONTRAST_MAPS = ("R1map", "R2map", "R2starmap", "T1map", "T2map", "T2starmap", "PDmap")
_CHI, _R1, _R2STAR = "Chimap", "R1map", "R2starmap"
# A rim score counts when it exceeds this many standard errors: the usual two (about 2 % one-sided
# false alarms for normal errors).
_SIGNIFICANCE = 2.0
# Cortical lesion: share of cortex in the tissue around the lesion.
_CORTICAL_SHARE = 0.5
#: Reach (mm from the lesion edge) of the NAWM that serves as each lesion's reference. The NAWM
#: mask already leaves out a perilesional margin (2 mm by default), so this is a band of about
#: 4 mm, two voxel layers at 2 mm: close enough that what varies over centimetres (the residual
#: background field of QSM, B1+ and receive-field residuals of R1 and PD) is the same in lesion and
#: reference, as a reader compares a lesion with the white matter around it.
LOCAL_REFERENCE_MM = 6.0
# Fewer local NAWM voxels than this (a lesion against cortex or ventricles): the whole NAWM is the
# reference; 20 voxels put the median's standard error near a quarter of the voxel SD.
_MIN_REFERENCE_VOXELS = 20


def label_lesions(lesion_mask, *, min_voxels=1):
    """Connected lesions (6-connectivity), numbered by decreasing size.

    Parameters
    ----------
    lesion_mask : ndarray of bool
    min_voxels : int, optional
        Smaller components are dropped.

    Returns
    -------
    labels : ndarray of int32
        0 outside lesions, 1..n inside.
    count : int
    """
    components, count = ndimage.label(np.asarray(lesion_mask, dtype=bool))
    sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
    order = [i + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_voxels]
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[order] = np.arange(1, len(order) + 1)
    return relabel[components], len(order)


def lesion_shells(lesion, rim_mm, voxel_size):
    """Core and rim of one lesion.

    Returns
    -------
    core, rim : ndarray of bool
        The rim holds the lesion voxels within ``rim_mm`` (at least one voxel layer) of the edge.
        Both are empty when erosion leaves no core (the lesion is too small to tell them apart).
    """
    lesion = np.asarray(lesion, dtype=bool)
    core = erode_mask(lesion, rim_mm, voxel_size)
    if not core.any():
        empty = np.zeros_like(lesion)
        return empty, empty
    return core, lesion & ~core


def _mean_and_error(values, mask):
    inside = values[mask]
    inside = inside[np.isfinite(inside)].astype(float)
    if inside.size == 0:
        return math.nan, math.nan
    error = inside.std(ddof=1) / math.sqrt(inside.size) if inside.size > 1 else math.nan
    return float(inside.mean()), float(error)


def _reference(values, mask):
    """Median, robust SD (1.4826 x MAD, the SD of normal data) and finite voxel count over ``mask``."""
    inside = values[mask]
    inside = inside[np.isfinite(inside)].astype(float)
    if inside.size == 0:
        return math.nan, math.nan, 0
    median = float(np.median(inside))
    return median, 1.4826 * float(np.median(np.abs(inside - median))), int(inside.size)


def _median_and_error(values, mask):
    """Median of ``values`` over ``mask`` and its standard error (NaN for fewer than 2 voxels).

    The error is that of the median of normal data, sqrt(pi / 2) sigma / sqrt(n), with sigma
    estimated robustly as 1.4826 x the median absolute deviation (both the textbook constants of a
    normal distribution), so that a vein's few voxels inflate neither the value nor its error.
    """
    median, sigma, count = _reference(values, mask)
    if count < 2:
        return median, math.nan
    return median, math.sqrt(math.pi / 2) * sigma / math.sqrt(count)


def _rim_score(values, core, rim, nawm_median):
    """``rim - max(core, NAWM)`` on medians and whether it exceeds twice its standard error.

    Medians, not means: a lesion's central vein (the "central vein sign" of MS lesions) is
    paramagnetic (deoxyhaemoglobin) and crosses core and rim. In a 2 mm core of a few voxels its
    partial volume lifts the core's *mean* chi to the level of an iron rim, hiding the rim; it fills
    a few voxels only, so the medians of core and rim ignore it, while an iron rim lines the whole
    edge and moves the rim's median.
    """
    rim_median, rim_error = _median_and_error(values, rim)
    core_median, core_error = _median_and_error(values, core)
    reference = max(core_median, nawm_median)
    score = rim_median - reference
    # the core's error matters only when the core is the reference
    errors = [rim_error] + ([core_error] if core_median >= nawm_median else [])
    error = math.sqrt(sum(e * e for e in errors if math.isfinite(e)))
    return score, bool(score > _SIGNIFICANCE * error)


def stage_lesion(features, *, enhancing=None):
    """Stage of one lesion from its features (see the module notes).

    Parameters
    ----------
    features : dict
        A row of :func:`analyse_lesions` (``cortex_share``, ``<map>_contrast``,
        ``<map>_relative_contrast``, ``<map>_rim_score``, ``<map>_rim``).
    enhancing : bool or None
        Gadolinium enhancement, when a mask was given.

    Returns
    -------
    stage : str
        One of :data:`LESION_STAGES` or :data:`UNDETERMINED`.
    evidence : str
        The features that led to it.
    """
    evidence = []
    share = features.get("cortex_share", math.nan)
    if math.isfinite(share) and share >= _CORTICAL_SHARE:
        return "cortical", f"cortex is {share:.0%} of the surrounding tissue (>= {_CORTICAL_SHARE:.0%})"
    if math.isfinite(share):
        evidence.append(f"cortex {share:.0%} of the surrounding tissue")
    rim = _paramagnetic_rim(features)
    if rim is None:
        evidence.append("no rim assessment (lesion too small for core and rim)")
    else:
        found, reason = rim
        evidence.append(reason)
        if found:
            if enhancing:
                evidence.append("enhancing, but a paramagnetic rim marks chronic activity")
            return "chronic active", "; ".join(evidence)
    rise = _susceptibility_rise(features, evidence)
    if enhancing is not None:
        if not enhancing:
            evidence.append("not enhancing")
            return "chronic inactive", "; ".join(evidence)
        evidence.append("enhancing")
        if rise is None:
            return UNDETERMINED, "; ".join(evidence + ["active; needs chi (QSM) to tell early from late"])
        return ("early active" if rise < NO_SUSCEPTIBILITY_RISE else "late active"), "; ".join(evidence)
    if rise is None:
        return UNDETERMINED, "; ".join(evidence + ["needs chi (QSM) or a gadolinium mask"])
    if rise < NO_SUSCEPTIBILITY_RISE:
        return "early active", "; ".join(evidence + [f"no susceptibility rise (< {NO_SUSCEPTIBILITY_RISE})"])
    if rise >= STRONG_SUSCEPTIBILITY_RISE:
        return "late active", "; ".join(evidence + [f"strong susceptibility rise (>= {STRONG_SUSCEPTIBILITY_RISE})"])
    return "chronic inactive", "; ".join(evidence + ["moderate susceptibility rise"])


def _paramagnetic_rim(features):
    """Whether the lesion has a paramagnetic (iron) rim, and why; None without a rim assessment.

    With chi and R2*: both rim scores > 0 and at least one significant (iron raises both; see the
    module notes). With one of them: its significant rim.
    """
    scores = {
        name: (features[f"{name}_rim_score"], bool(features[f"{name}_rim"]))
        for name in (_CHI, _R2STAR)
        if f"{name}_rim" in features
    }
    if not scores:
        return None
    units = {_CHI: " ppm", _R2STAR: " 1/s"}
    described = ", ".join(
        f"{name} rim {score:+.3g}{units[name]} vs core and NAWM{' (significant)' if significant else ''}"
        for name, (score, significant) in scores.items()
    )
    rises = all(score > 0 for score, _ in scores.values())
    if rises and any(significant for _, significant in scores.values()):
        both = " (iron raises both)" if len(scores) == 2 else ""
        return True, f"{described}: paramagnetic rim{both}"
    if len(scores) == 2 and any(significant for _, significant in scores.values()):
        return False, f"no paramagnetic rim ({described}: chi and R2* do not both rise, as iron would make them)"
    return False, f"no paramagnetic rim ({described})"


def _susceptibility_rise(features, evidence):
    """Chi rise per percent of R1 (else R2*) loss, in ppb per percent; None without chi."""
    chi = features.get(f"{_CHI}_contrast")
    if chi is None or not math.isfinite(chi):
        return None
    for name in (_R1, _R2STAR):
        loss = features.get(f"{name}_relative_contrast")
        if loss is not None and math.isfinite(loss):
            break
    else:
        evidence.append("no R1 or R2* to scale the chi contrast")
        return None
    if loss >= 0:
        evidence.append(f"{name} not lower than in NAWM ({100 * loss:+.1f} %): no demyelination to scale chi by")
        return None
    rise = 1000 * chi / (100 * abs(loss))
    error = features.get(f"{_CHI}_contrast_error", math.nan)
    uncertainty = f" (+/- {1000 * error:.1f})" if math.isfinite(error) else ""
    evidence.append(
        f"chi {1000 * chi:+.1f}{uncertainty} ppb and {name} {100 * loss:+.1f} % vs NAWM: {rise:.2f} ppb per % loss"
    )
    return rise


def analyse_lesions(
    maps,
    lesion_mask,
    nawm,
    voxel_size,
    *,
    cortex=None,
    white_matter=None,
    enhancing=None,
    rim_mm=1.0,
    min_voxels=1,
    reference_mm=LOCAL_REFERENCE_MM,
):
    """Features and stage of every connected lesion.

    Parameters
    ----------
    maps : dict of str -> ndarray
        BIDS suffix (``R1map``, ``R2starmap``, ``Chimap``, ...) -> map.
    lesion_mask : ndarray of bool
    nawm : ndarray of bool
        Normal-appearing white matter (:func:`~.regions.normal_appearing_white_matter`).
    voxel_size : sequence of 3 float
        mm.
    cortex, white_matter : ndarray of bool, optional
        For the cortical / white-matter location of each lesion (``cortex_share``); white matter
        defaults to ``nawm``. Without ``cortex`` no lesion is called cortical.
    enhancing : ndarray of bool, optional
        Gadolinium-enhancement mask: a lesion enhances when any of its voxels does.
    rim_mm : float, optional
        Rim thickness (at least one voxel layer).
    min_voxels : int, optional
        Smaller lesions are left out.
    reference_mm : float or None, optional
        Reach (mm from the lesion's edge) of the NAWM that is each lesion's reference (module
        notes); None or 0: the whole NAWM for every lesion.

    Returns
    -------
    labels : ndarray of int32
        Lesion numbers (:func:`label_lesions`).
    rows : list of dict
        One per lesion: ``lesion``, ``voxels``, ``volume_mm3``, ``centre_i/j/k`` (voxel
        coordinates), ``core_voxels``, ``rim_voxels``, ``reference_voxels`` (NAWM voxels of the
        reference), ``cortex_share``, ``enhancing``; per map ``<map>_mean``, ``<map>_core``,
        ``<map>_rim_mean``, ``<map>_nawm`` (median of the reference NAWM), ``<map>_contrast``,
        ``<map>_contrast_error`` (its standard error), ``<map>_relative_contrast`` (rates), and for
        Chimap and R2starmap ``<map>_rim_score`` (on medians) and ``<map>_rim`` (bool, significant);
        ``stage`` and ``evidence``.
    """
    lesion_mask = np.asarray(lesion_mask, dtype=bool)
    nawm = np.asarray(nawm, dtype=bool)
    for name, values in maps.items():
        if np.shape(values) != lesion_mask.shape:
            raise ValueError(f"{name} has shape {np.shape(values)}, the lesion mask {lesion_mask.shape}")
    if not nawm.any():
        raise ValueError("normal-appearing white matter is empty: lesion contrasts need a NAWM reference")
    voxel_volume = float(np.prod(voxel_size))
    # the median: NAWM voxels at the edge of white matter carry partial volume with cortex and CSF
    whole_nawm = {name: _reference(np.asarray(values), nawm) for name, values in maps.items()}
    white_matter = nawm if white_matter is None else np.asarray(white_matter, dtype=bool)
    labels, count = label_lesions(lesion_mask, min_voxels=min_voxels)
    boxes = ndimage.find_objects(labels)
    # room around each lesion for the surrounding shell and the local NAWM reference
    pad = 2 + int(math.ceil((reference_mm or 0.0) / float(np.min(voxel_size))))
    rows = []
    for number in range(1, count + 1):
        box = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in boxes[number - 1])
        lesion = labels[box] == number
        local_nawm = None
        if reference_mm:
            local_nawm = dilate_mask(lesion, reference_mm, voxel_size) & nawm[box]
            if np.count_nonzero(local_nawm) < _MIN_REFERENCE_VOXELS:
                local_nawm = None
        core, rim = lesion_shells(lesion, rim_mm, voxel_size)
        row = {
            "lesion": number,
            "voxels": int(lesion.sum()),
            "volume_mm3": int(lesion.sum()) * voxel_volume,
        }
        centre = np.argwhere(lesion).mean(0) + [s.start for s in box]
        row.update({"centre_i": float(centre[0]), "centre_j": float(centre[1]), "centre_k": float(centre[2])})
        row.update({"core_voxels": int(core.sum()), "rim_voxels": int(rim.sum())})
        row["reference_voxels"] = int(np.count_nonzero(nawm if local_nawm is None else local_nawm))
        shell = dilate_mask(lesion, float(np.min(voxel_size)), voxel_size) & ~lesion_mask[box]
        share = math.nan
        if cortex is not None:
            in_cortex = int(np.count_nonzero(shell & np.asarray(cortex, dtype=bool)[box]))
            in_wm = int(np.count_nonzero(shell & white_matter[box]))
            share = in_cortex / (in_cortex + in_wm) if in_cortex + in_wm else math.nan
        row["cortex_share"] = share
        enhances = None if enhancing is None else bool(np.asarray(enhancing, dtype=bool)[box][lesion].any())
        row["enhancing"] = enhances
        for name, values in maps.items():
            local = np.asarray(values)[box]
            reference, spread, reference_count = (
                whole_nawm[name] if local_nawm is None else _reference(local, local_nawm)
            )
            mean = _mean_and_error(local, lesion)[0]
            finite = int(np.count_nonzero(np.isfinite(local[lesion])))
            row[f"{name}_mean"] = mean
            row[f"{name}_core"] = _mean_and_error(local, core)[0] if core.any() else math.nan
            row[f"{name}_rim_mean"] = _mean_and_error(local, rim)[0] if rim.any() else math.nan
            row[f"{name}_nawm"] = reference
            row[f"{name}_contrast"] = mean - reference
            # lesion mean (spread / sqrt(n)) minus reference median (sqrt(pi / 2) spread / sqrt(m))
            row[f"{name}_contrast_error"] = (
                spread * math.sqrt(1 / finite + (math.pi / 2) / reference_count)
                if finite and reference_count
                else math.nan
            )
            if name in RELATIVE_CONTRAST_MAPS:
                row[f"{name}_relative_contrast"] = (mean - reference) / reference if reference else math.nan
            if name in (_CHI, _R2STAR) and core.any():
                score, is_rim = _rim_score(local, core, rim, reference)
                row[f"{name}_rim_score"] = score
                row[f"{name}_rim"] = is_rim
        row["stage"], row["evidence"] = stage_lesion(row, enhancing=enhances)
        rows.append(row)
    return labels, rows
