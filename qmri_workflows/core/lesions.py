"""Lesion-wise analysis: connected lesions, core and rim, contrasts against NAWM, stage.

Each connected lesion (6-connected voxels of the lesion mask) is split into a *rim* (the lesion
voxels within ``rim_mm`` of its edge) and a *core* (the rest); a lesion too small to keep a core has
no rim assessment. Every map's mean in the lesion, core and rim is compared with normal-appearing
white matter (NAWM, its median): absolute contrast ``lesion - NAWM`` and, for relaxation-rate maps, relative
contrast ``(lesion - NAWM) / NAWM``.

Paramagnetic rim
----------------
Iron-laden microglia at the edge of chronic active lesions raise chi and R2* there (Table 1 of the
review). Partial volume mixes the edge of *any* lesion with the NAWM around it, so a rim value
between core and NAWM says nothing; a paramagnetic rim is a rim value *above both* the core and
NAWM. The rim score of a map is ``rim - max(core, NAWM)``; it counts as a rim when it exceeds twice
its standard error (from the voxel SDs of rim and core). Chi decides when a Chimap exists (the
clinical paramagnetic-rim-lesion sign is a QSM sign); R2* alone decides otherwise (weaker: iron and
myelin both raise R2*).

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
  "strong" rise: early active < 0.1 <= chronic inactive < 0.8 <= late active.
  Without R1, the R2* contrast takes its place (same direction, similar size in lesions).
* Without chi (no QSM) and without gadolinium, a white-matter lesion without an R2* rim cannot be
  staged: ``"white matter lesion (stage undetermined)"``.

The limits are physically motivated orders of magnitude, not fitted to one dataset; the evidence
column of every lesion lists the numbers that led to its stage so that a user can judge them.

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
# A rim score counts when it exceeds this many standard errors.
_RIM_SIGNIFICANCE = 2.0
# Cortical lesion: share of cortex in the tissue around the lesion.
_CORTICAL_SHARE = 0.5


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


def _finite_median(values):
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def _rim_score(values, core, rim, nawm_mean):
    """``rim - max(core, NAWM)`` and whether it exceeds twice its standard error."""
    rim_mean, rim_error = _mean_and_error(values, rim)
    core_mean, core_error = _mean_and_error(values, core)
    reference = max(core_mean, nawm_mean)
    score = rim_mean - reference
    # the core's error matters only when the core is the reference
    errors = [rim_error] + ([core_error] if core_mean >= nawm_mean else [])
    error = math.sqrt(sum(e * e for e in errors if math.isfinite(e)))
    return score, bool(score > _RIM_SIGNIFICANCE * error)


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
    rim_map = _CHI if f"{_CHI}_rim" in features else (_R2STAR if f"{_R2STAR}_rim" in features else None)
    if rim_map is not None:
        score = features[f"{rim_map}_rim_score"]
        unit = " ppm" if rim_map == _CHI else ""
        if features[f"{rim_map}_rim"]:
            evidence.append(f"{rim_map} rim above core and NAWM by {score:.3g}{unit} (significant): paramagnetic rim")
            if enhancing:
                evidence.append("enhancing, but a paramagnetic rim marks chronic activity")
            return "chronic active", "; ".join(evidence)
        evidence.append(f"no paramagnetic rim ({rim_map} rim score {score:.3g}{unit})")
    else:
        evidence.append("no rim assessment (lesion too small for core and rim)")
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
    evidence.append(f"chi {1000 * chi:+.1f} ppb and {name} {100 * loss:+.1f} % vs NAWM: {rise:.2f} ppb per % loss")
    return rise


def analyse_lesions(
    maps, lesion_mask, nawm, voxel_size, *, cortex=None, white_matter=None, enhancing=None, rim_mm=1.0, min_voxels=1
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

    Returns
    -------
    labels : ndarray of int32
        Lesion numbers (:func:`label_lesions`).
    rows : list of dict
        One per lesion: ``lesion``, ``voxels``, ``volume_mm3``, ``centre_i/j/k`` (voxel
        coordinates), ``core_voxels``, ``rim_voxels``, ``cortex_share``, ``enhancing``; per map
        ``<map>_mean``, ``<map>_core``, ``<map>_rim_mean``, ``<map>_nawm`` (median over NAWM),
        ``<map>_contrast``, ``<map>_relative_contrast`` (rates), and for Chimap and R2starmap
        ``<map>_rim_score`` and ``<map>_rim`` (bool); ``stage`` and ``evidence``.
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
    nawm_means = {name: _finite_median(np.asarray(values)[nawm]) for name, values in maps.items()}
    white_matter = nawm if white_matter is None else np.asarray(white_matter, dtype=bool)
    labels, count = label_lesions(lesion_mask, min_voxels=min_voxels)
    boxes = ndimage.find_objects(labels)
    rows = []
    for number in range(1, count + 1):
        # a box around the lesion, with room for the surrounding shell
        box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in boxes[number - 1])
        lesion = labels[box] == number
        core, rim = lesion_shells(lesion, rim_mm, voxel_size)
        row = {
            "lesion": number,
            "voxels": int(lesion.sum()),
            "volume_mm3": int(lesion.sum()) * voxel_volume,
        }
        centre = np.argwhere(lesion).mean(0) + [s.start for s in box]
        row.update({"centre_i": float(centre[0]), "centre_j": float(centre[1]), "centre_k": float(centre[2])})
        row.update({"core_voxels": int(core.sum()), "rim_voxels": int(rim.sum())})
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
            mean = _mean_and_error(local, lesion)[0]
            reference = nawm_means[name]
            row[f"{name}_mean"] = mean
            row[f"{name}_core"] = _mean_and_error(local, core)[0] if core.any() else math.nan
            row[f"{name}_rim_mean"] = _mean_and_error(local, rim)[0] if rim.any() else math.nan
            row[f"{name}_nawm"] = reference
            row[f"{name}_contrast"] = mean - reference
            if name in RELATIVE_CONTRAST_MAPS:
                row[f"{name}_relative_contrast"] = (mean - reference) / reference if reference else math.nan
            if name in (_CHI, _R2STAR) and core.any():
                score, is_rim = _rim_score(local, core, rim, reference)
                row[f"{name}_rim_score"] = score
                row[f"{name}_rim"] = is_rim
        row["stage"], row["evidence"] = stage_lesion(row, enhancing=enhances)
        rows.append(row)
    return labels, rows
