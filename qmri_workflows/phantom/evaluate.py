"""Compare an estimated map with the phantom's ground truth, region by region.

Each brain region of the truth's ``dseg`` splits into its *interior* (the
``label-<abbreviation>_desc-interior_mask`` written by :mod:`qmri_workflows.phantom.dataset`: no
partial volume, away from edges) and its *edge* (the rest of the region). In the interior an
estimator should find the truth; the edge shows what partial volume, Gibbs ringing and intravoxel
dephasing of an oversampled simulation do to it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RegionError", "region_errors", "format_region_errors"]


@dataclass(frozen=True)
class RegionError:
    """Relative error ``estimate / truth - 1`` of one region, in its interior and at its edge.

    Attributes
    ----------
    name, abbreviation : str
        Row of ``dseg.tsv``.
    interior_voxels, edge_voxels : int
    interior_median_abs, edge_median_abs : float
        Median absolute relative error (NaN without voxels).
    interior_median, edge_median : float
        Median signed relative error (NaN without voxels).
    """

    name: str
    abbreviation: str
    interior_voxels: int
    interior_median_abs: float
    interior_median: float
    edge_voxels: int
    edge_median_abs: float
    edge_median: float


def _load(path):
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _medians(relative):
    if relative.size == 0:
        return 0, float("nan"), float("nan")
    return int(relative.size), float(np.median(np.abs(relative))), float(np.median(relative))


def region_errors(truth_root, estimate, *, subject, suffix="R2starmap", mask=None):
    """Median relative error of a map per brain region, in its interior mask and at its edge.

    Parameters
    ----------
    truth_root : str or Path
        ``derivatives/phantom`` of a phantom dataset.
    estimate : str, Path or ndarray
        The estimated map (file or array) on the grid of the truth.
    subject : str
        Subject label without ``sub-``.
    suffix : str, optional
        Truth map to compare with (``R2starmap``, ``R1map`` ...).
    mask : ndarray of bool, optional
        Voxels where the estimate is defined (e.g. the pipeline's brain mask); others are ignored.

    Returns
    -------
    list of RegionError
        One per region that has an interior mask, in ``dseg.tsv`` order.
    """
    anat = Path(truth_root) / f"sub-{subject}" / "anat"
    truth = _load(anat / f"sub-{subject}_{suffix}.nii.gz")
    estimate = _load(estimate) if isinstance(estimate, (str, Path)) else np.asarray(estimate, float)
    if estimate.shape != truth.shape:
        raise ValueError(
            f"the estimate has shape {estimate.shape}, the truth {suffix} {truth.shape}: compare maps on the same grid"
        )
    dseg = _load(anat / f"sub-{subject}_dseg.nii.gz").astype(int)
    valid = truth > 0
    if mask is not None:
        valid &= np.asarray(mask, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(valid, estimate / np.where(valid, truth, 1.0) - 1.0, np.nan)
    rows = []
    with open(anat / f"sub-{subject}_dseg.tsv", newline="") as handle:
        table = list(csv.DictReader(handle, delimiter="\t"))
    for row in table:
        interior_file = anat / f"sub-{subject}_label-{row['abbreviation']}_desc-interior_mask.nii.gz"
        if not interior_file.is_file():
            continue
        region = (dseg == int(row["index"])) & valid
        interior = (_load(interior_file) > 0) & region
        edge = region & ~interior
        rows.append(
            RegionError(row["name"], row["abbreviation"], *_medians(relative[interior]), *_medians(relative[edge]))
        )
    return rows


def format_region_errors(rows):
    """Plain-text table of :func:`region_errors` (percent)."""
    header = (
        f"{'region':28s} {'interior n':>10s} {'|err| med':>9s} {'err med':>8s}   "
        f"{'edge n':>7s} {'|err| med':>9s} {'err med':>8s}"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"{row.name:28s} {row.interior_voxels:10d} {row.interior_median_abs:9.2%} "
            f"{row.interior_median:+8.2%}   {row.edge_voxels:7d} {row.edge_median_abs:9.2%} "
            f"{row.edge_median:+8.2%}"
        )
    return "\n".join(lines)
