"""Regional statistics of quantitative maps: concentration (mean) and content (sum) per region.

The review (Fig 3, deep grey matter) asks for both iron *concentration* (the mean R2* or chi of a
region) and iron *content* (the region's sum, the "R2* mass"): atrophy raises the first and lowers
the second when the same iron sits in a smaller structure. :func:`region_statistics` gives both,
with ``content = sum(value) x voxel volume`` (map units x mm^3), i.e. ``mean x volume``.

Regions
-------
The package's regions (:data:`REGIONS`) are read off any segmentation through its label table
(:func:`regions_from_label_names`): FreeSurfer, FastSurfer and SynthSeg label maps use the FreeSurfer
colour-table names, the phantom its own names; both are mapped by name, case- and
punctuation-insensitive:

==============  ==========================================================================
region          label names (examples)
==============  ==========================================================================
csf             CSF, Left/Right-Lateral-Ventricle, Left/Right-Inf-Lat-Vent, 3rd/4th-Ventricle
cortex          Left/Right-Cerebral-Cortex, ctx-lh-* / ctx-rh-* (aparc), "cortical GM"
white_matter    Left/Right-Cerebral-White-Matter, wm-lh-* / wm-rh-*, "WM"
caudate         Left/Right-Caudate, "caudate"
putamen         Left/Right-Putamen, "putamen"
pallidum        Left/Right-Pallidum, "globus pallidus"
thalamus        Left/Right-Thalamus, Left/Right-Thalamus-Proper, "thalamus"
lesion          WM-hypointensities, Left/Right-WM-hypointensities, any name with "lesion"
==============  ==========================================================================

Everything else (cerebellum, brainstem, hippocampus, ...) is left out of these regions and listed
as unmapped. ``deep_grey`` (the four nuclei together) and ``nawm`` (white matter minus lesions minus
a perilesional margin, :func:`normal_appearing_white_matter`) are derived regions.

Without a segmentation
----------------------
:func:`tissue_classes_from_maps` splits the brain mask into three classes by one map (R1 when
present: CSF < grey < white matter; else R2*): ``csf``, ``grey_matter`` (cortex and deep grey
together) and ``white_matter`` (:data:`FALLBACK_REGIONS`). Deep grey nuclei would need a template
registered to the subject (e.g. with antspyx); that is not done yet, so without a segmentation there
are no nucleus rows.

Partial volume
--------------
Edge voxels mix a region with its neighbours; :func:`erode_mask` removes a margin (mm) before the
statistics. Erosion changes volume and content as well: the region's full volume is kept apart
(``region_volume_mm3``) so that atrophy stays visible.
"""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

__all__ = [
    "REGIONS",
    "DERIVED_REGIONS",
    "regions_from_label_names",
    "region_masks",
    "erode_mask",
    "dilate_mask",
    "normal_appearing_white_matter",
    "region_statistics",
    "regional_statistics",
    "STATISTICS",
    "tissue_classes_from_maps",
    "FALLBACK_REGIONS",
    "analysis_regions",
]

#: The package's regions, in table order.
REGIONS = ("csf", "cortex", "white_matter", "caudate", "putamen", "pallidum", "thalamus", "lesion")
#: Regions built from :data:`REGIONS`.
DERIVED_REGIONS = ("deep_grey", "nawm")
#: Columns of :func:`region_statistics`.
STATISTICS = ("voxels", "mean", "median", "sd", "volume_mm3", "content")

_NUCLEI = ("caudate", "putamen", "pallidum", "thalamus")

# Patterns on names reduced to lower-case letters and digits (hemisphere prefixes removed first).
_PATTERNS = (
    ("lesion", re.compile(r"lesion|^wmhypointensities$|^nonwmhypointensities$")),
    ("csf", re.compile(r"^(csf|lateralventricle|inflatvent|3rdventricle|4thventricle|5thventricle|ventricles?)$")),
    ("cortex", re.compile(r"^(cerebralcortex|cortex|corticalgm|corticalgreymatter|corticalgraymatter|ctx.*)$")),
    ("white_matter", re.compile(r"^(cerebralwhitematter|wm|whitematter|wm(lh|rh).*)$")),
    ("caudate", re.compile(r"^caudate(nucleus)?$")),
    ("putamen", re.compile(r"^putamen$")),
    ("pallidum", re.compile(r"^(pallidum|globuspallidus)$")),
    ("thalamus", re.compile(r"^thalamus(proper)?$")),
)
_HEMISPHERE = re.compile(r"^(left|right|lh|rh)")


def _reduce(name):
    reduced = re.sub(r"[^a-z0-9]", "", name.lower())
    # "ctx-lh-*" and "wm-lh-*" carry the hemisphere inside; other names start with it
    if reduced.startswith(("ctx", "wmlh", "wmrh")):
        return reduced
    return _HEMISPHERE.sub("", reduced)


def regions_from_label_names(label_names):
    """Map the labels of a segmentation onto the package's regions by their names.

    Parameters
    ----------
    label_names : dict of int -> str
        Label value -> name (the ``index`` and ``name`` columns of a ``_dseg.tsv``).

    Returns
    -------
    regions : dict of str -> tuple of int
        For each region of :data:`REGIONS` that has labels, its label values.
    unmapped : dict of int -> str
        Labels (other than 0 / background / unknown) that belong to none of the regions.
    """
    regions, unmapped = {}, {}
    for value, name in sorted(label_names.items()):
        reduced = _reduce(str(name))
        if int(value) == 0 or reduced in ("background", "unknown", ""):
            continue
        region = next((region for region, pattern in _PATTERNS if pattern.search(reduced)), None)
        if region is None:
            unmapped[int(value)] = str(name)
        else:
            regions.setdefault(region, []).append(int(value))
    ordered = {region: tuple(regions[region]) for region in REGIONS if region in regions}
    return ordered, unmapped


def region_masks(labels, regions, *, lesion_mask=None):
    """Boolean masks of the package's regions from a label image.

    Parameters
    ----------
    labels : ndarray of int
        Segmentation on the maps' grid.
    regions : dict of str -> tuple of int
        From :func:`regions_from_label_names`.
    lesion_mask : ndarray of bool, optional
        Lesions from a separate mask; they join the ``lesion`` region and are removed from every
        other region (a segmentation often labels lesions as white matter).

    Returns
    -------
    dict of str -> ndarray of bool
        Masks of the regions present, plus ``deep_grey`` when a nucleus is present.
    """
    labels = np.asarray(labels)
    masks = {region: np.isin(labels, values) for region, values in regions.items()}
    if lesion_mask is not None:
        lesion_mask = np.asarray(lesion_mask, dtype=bool)
        if lesion_mask.shape != labels.shape:
            raise ValueError(f"lesion mask shape {lesion_mask.shape} differs from the segmentation's {labels.shape}")
        for region in masks:
            masks[region] &= ~lesion_mask
        masks["lesion"] = masks.get("lesion", np.zeros(labels.shape, dtype=bool)) | lesion_mask
    nuclei = [masks[name] for name in _NUCLEI if name in masks]
    if nuclei:
        masks["deep_grey"] = np.logical_or.reduce(nuclei)
    return masks


def _ball(radius_mm, voxel_size):
    """Structuring element: voxels whose centre is within ``radius_mm`` (at least the 6 neighbours)."""
    voxel_size = np.asarray(voxel_size, dtype=float)
    half = np.maximum(np.floor(radius_mm / voxel_size), 1).astype(int)
    grid = np.meshgrid(*[np.arange(-h, h + 1) * v for h, v in zip(half, voxel_size)], indexing="ij")
    distance = np.sqrt(sum(g * g for g in grid))
    ball = distance <= max(radius_mm, float(voxel_size.min())) + 1e-6
    return ball


def erode_mask(mask, margin_mm, voxel_size):
    """Remove the voxels within ``margin_mm`` of the mask's outside (no change for 0).

    Parameters
    ----------
    mask : ndarray of bool
    margin_mm : float
        >= 0; values below the smallest voxel size still remove one voxel layer.
    voxel_size : sequence of 3 float
        mm.

    Returns
    -------
    ndarray of bool
    """
    mask = np.asarray(mask, dtype=bool)
    if margin_mm < 0:
        raise ValueError(f"an erosion margin must be >= 0 mm, got {margin_mm}")
    if margin_mm == 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, structure=_ball(margin_mm, voxel_size), border_value=0)


def dilate_mask(mask, margin_mm, voxel_size):
    """Add the voxels within ``margin_mm`` of the mask (no change for 0)."""
    mask = np.asarray(mask, dtype=bool)
    if margin_mm < 0:
        raise ValueError(f"a dilation margin must be >= 0 mm, got {margin_mm}")
    if margin_mm == 0:
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=_ball(margin_mm, voxel_size))


def normal_appearing_white_matter(white_matter, lesion_mask, margin_mm, voxel_size):
    """White matter minus the lesions and minus a perilesional margin.

    Perilesional white matter holds "transitional values" (review, early active lesions) and the
    partial volume of the lesion edge; a margin of a few mm keeps both out of NAWM.

    Parameters
    ----------
    white_matter, lesion_mask : ndarray of bool
    margin_mm : float
        Width of the perilesional margin (mm).
    voxel_size : sequence of 3 float

    Returns
    -------
    ndarray of bool
    """
    lesion_mask = np.asarray(lesion_mask, dtype=bool)
    return np.asarray(white_matter, dtype=bool) & ~dilate_mask(lesion_mask, margin_mm, voxel_size)


def region_statistics(values, mask, voxel_volume_mm3):
    """Statistics of one map in one region.

    Non-finite values (failed fits) are left out of every statistic; ``voxels`` counts the finite
    ones.

    Parameters
    ----------
    values : ndarray
        The map.
    mask : ndarray of bool
        The region, same shape.
    voxel_volume_mm3 : float

    Returns
    -------
    dict
        ``voxels``, ``mean``, ``median``, ``sd`` (sample SD, ddof = 1; NaN below two voxels),
        ``volume_mm3`` (finite voxels x voxel volume) and ``content`` (sum of the values x voxel
        volume: ``mean x volume_mm3``). Statistics are NaN for an empty region.
    """
    values = np.asarray(values)
    mask = np.asarray(mask, dtype=bool)
    if values.shape != mask.shape:
        raise ValueError(f"map shape {values.shape} differs from the region mask's {mask.shape}")
    inside = values[mask].astype(float)
    inside = inside[np.isfinite(inside)]
    count = inside.size
    nan = float("nan")
    return {
        "voxels": int(count),
        "mean": float(inside.mean()) if count else nan,
        "median": float(np.median(inside)) if count else nan,
        "sd": float(inside.std(ddof=1)) if count > 1 else nan,
        "volume_mm3": count * float(voxel_volume_mm3),
        "content": float(inside.sum()) * float(voxel_volume_mm3),
    }


def regional_statistics(maps, masks, voxel_size, *, erosion_mm=0.0):
    """Statistics of every map in every region.

    Parameters
    ----------
    maps : dict of str -> ndarray
        Map name (e.g. the BIDS suffix ``R2starmap``) -> map.
    masks : dict of str -> ndarray of bool
        Region name -> mask (:func:`region_masks`, plus ``nawm``).
    voxel_size : sequence of 3 float
        mm.
    erosion_mm : float, optional
        Margin removed from every region before the statistics (partial volume); 0 keeps the regions.

    Returns
    -------
    list of dict
        One row per (region, map): ``region``, ``map``, ``erosion_mm``, ``region_volume_mm3`` (the
        region before erosion) and the keys of :func:`region_statistics`.
    """
    voxel_volume = float(np.prod(voxel_size))
    rows = []
    for region, mask in masks.items():
        analysed = erode_mask(mask, erosion_mm, voxel_size)
        full_volume = int(np.count_nonzero(mask)) * voxel_volume
        for name, values in maps.items():
            row = {"region": region, "map": name, "erosion_mm": float(erosion_mm), "region_volume_mm3": full_volume}
            row.update(region_statistics(values, analysed, voxel_volume))
            rows.append(row)
    return rows


#: Regions of the segmentation-free fallback (:func:`tissue_classes_from_maps`).
FALLBACK_REGIONS = ("csf", "grey_matter", "white_matter")
# Map used by the fallback, in order of preference: its contrast orders CSF < GM < WM.
_FALLBACK_MAPS = ("R1map", "R2starmap")


def tissue_classes_from_maps(maps, brain_mask, *, n_iter=50):
    """Three tissue classes from one map inside the brain mask (1-D k-means, 3 clusters).

    Parameters
    ----------
    maps : dict of str -> ndarray
        BIDS suffix -> map; ``R1map`` is used when present, else ``R2starmap``.
    brain_mask : ndarray of bool
    n_iter : int, optional
        k-means iterations (converges in a few).

    Returns
    -------
    masks : dict of str -> ndarray of bool
        ``csf``, ``grey_matter``, ``white_matter`` (:data:`FALLBACK_REGIONS`).
    used : str
        The map the classes come from.

    Raises
    ------
    ValueError
        Without R1 or R2* maps, or with fewer than three distinct values in the brain.
    """
    used = next((name for name in _FALLBACK_MAPS if name in maps), None)
    if used is None:
        raise ValueError(f"tissue classes without a segmentation need one of {_FALLBACK_MAPS}; got {sorted(maps)}")
    values = np.asarray(maps[used], dtype=float)
    brain = np.asarray(brain_mask, dtype=bool) & np.isfinite(values)
    inside = values[brain]
    if np.unique(inside).size < 3:
        raise ValueError(f"{used} has fewer than three distinct values in the brain mask: no tissue classes")
    centres = np.quantile(inside, [0.1, 0.5, 0.9])
    for _ in range(n_iter):
        assignment = np.argmin(np.abs(inside[:, None] - centres), axis=1)
        updated = np.array(
            [inside[assignment == k].mean() if np.any(assignment == k) else centres[k] for k in range(3)]
        )
        if np.allclose(updated, centres):
            break
        centres = np.sort(updated)
    assignment = np.argmin(np.abs(inside[:, None] - centres), axis=1)
    masks = {}
    for k, region in enumerate(FALLBACK_REGIONS):
        mask = np.zeros(values.shape, dtype=bool)
        mask[brain] = assignment == k
        masks[region] = mask
    return masks, used


def analysis_regions(
    maps, voxel_size, *, brain_mask=None, labels=None, regions=None, lesion_mask=None, nawm_margin_mm=2.0
):
    """The regions of a subject's analysis: from a segmentation, else from tissue classes of the maps.

    The regional table and the visual report both use these masks, so the report's histograms show
    the voxels the table's numbers come from.

    Parameters
    ----------
    maps : dict of str -> ndarray
        Map name -> map (for the tissue classes when there is no segmentation).
    voxel_size : sequence of 3 float
        mm.
    brain_mask : ndarray of bool, optional
        Needed without a segmentation.
    labels : ndarray of int, optional
        Segmentation on the maps' grid.
    regions : dict of str -> tuple of int, optional
        Its labels per region (:func:`regions_from_label_names`); needed with ``labels``.
    lesion_mask : ndarray of bool, optional
        Lesions from a separate mask (they leave every other region).
    nawm_margin_mm : float, optional
        Perilesional margin left out of ``nawm``.

    Returns
    -------
    masks : dict of str -> ndarray of bool
        Region masks, with ``nawm`` when there is white matter.
    lesion_mask : ndarray of bool or None
        The lesions: the mask given, else the segmentation's lesion labels, else None.
    tissue_map : str or None
        The map the tissue classes come from (:func:`tissue_classes_from_maps`); None with a
        segmentation.
    """
    tissue_map = None
    if labels is not None:
        if regions is None:
            raise ValueError("a segmentation needs its regions (regions_from_label_names)")
        masks = region_masks(labels, regions, lesion_mask=lesion_mask)
        if lesion_mask is None and "lesion" in masks:
            lesion_mask = masks["lesion"]
    else:
        if brain_mask is None:
            raise ValueError("without a segmentation the analysis needs the brain mask for its tissue classes")
        masks, tissue_map = tissue_classes_from_maps(maps, brain_mask)
        if lesion_mask is not None:
            masks = {region: mask & ~lesion_mask for region, mask in masks.items()}
            masks["lesion"] = lesion_mask
    white_matter = masks.get("white_matter")
    if white_matter is not None:
        no_lesion = np.zeros(white_matter.shape, dtype=bool) if lesion_mask is None else lesion_mask
        masks["nawm"] = normal_appearing_white_matter(white_matter, no_lesion, nawm_margin_mm, voxel_size)
    return masks, lesion_mask, tissue_map
