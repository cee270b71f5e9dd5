"""Bring an image recorded on another grid onto the grid of the maps.

B1+ maps, receive-sensitivity maps and label images usually come with their own field of view, voxel
size and orientation. :func:`resample_to_reference` takes every voxel centre of the reference (map)
grid through the two affines (reference voxel -> world mm -> source voxel) and samples the source
there with :func:`scipy.ndimage.affine_transform`, which walks the grid without building coordinate
arrays. Any pair of affines works: shifted, rotated, oblique, flipped, other voxel size or shape.

Kinds
-----
``"linear"``
    Trilinear interpolation (spline order 1, no prefilter), for smooth fields such as B1+ and
    receive sensitivity. Output float32.
    Non-finite source voxels (NaN, +-Inf) count as missing: a reference voxel gets the interpolation
    of its finite neighbours divided by their share of the interpolation weight (normalised
    convolution), and NaN when finite neighbours carry less than half the weight. A masked-out
    voxel in a B1+ map therefore neither spreads NaN over its neighbourhood nor gets filled from
    further than one source voxel away.
``"nearest"``
    Nearest neighbour, for labels and masks. Output keeps the source dtype and holds only values
    present in the source (or 0 outside its field of view).
``"majority"``
    For labels and masks from a finer grid: each reference voxel takes the most frequent label among
    ``ceil(step)`` points per axis spread evenly over its footprint, ``step`` being the reference
    voxel's edge measured in source voxels; ties go to the smallest label. Along axes where the
    source is not finer, one point (the centre) is used, so for a source that is nowhere finer this
    is ``"nearest"``.

Field of view
-------------
A source image covers the box of its voxels (outermost voxel centres +- half a voxel). Reference
voxels whose centre lies outside get NaN (``"linear"``) or 0, i.e. background (``"nearest"``,
``"majority"``; a majority sub-point outside votes 0). In the outermost half voxel, linear
interpolation repeats the edge voxel: nothing is extrapolated beyond the last voxel centre.

No reference voxel covered at all raises :class:`~qmri_workflows.io.errors.BIDSInputError` (the images
cannot belong together: wrong session or broken header). Less than ``min_coverage`` (default
:data:`MIN_COVERAGE`) of the reference voxels covered issues a :class:`PartialCoverageWarning` and
goes on: a field map with a smaller field of view than the anatomical scan (e.g. stopping above the
neck, where the map grid holds only air and tissue nobody reads) is common and harmless, and the
uncovered voxels are NaN, which the maps computed from them show plainly.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
from scipy import ndimage

from .errors import BIDSInputError
from .images import read_image, same_grid, volume_data

__all__ = ["KINDS", "MIN_COVERAGE", "PartialCoverageWarning", "load_on_grid", "resample_to_reference"]

KINDS = ("linear", "nearest", "majority")
"""Resampling kinds: ``"linear"`` for smooth fields, ``"nearest"``/``"majority"`` for labels."""

MIN_COVERAGE = 0.5
"""Share of reference voxels the source must cover before :class:`PartialCoverageWarning` is issued."""

_EDGE_TOLERANCE = 1e-3
"""Slack (source voxels) at the field-of-view edge: absorbs affines rounded to float32 in headers."""

_MIN_FINITE_WEIGHT = 0.5
"""Least share of linear interpolation weight on finite source voxels for a finite result."""


class PartialCoverageWarning(UserWarning):
    """The source image covers only part of the reference grid (uncovered voxels are NaN or 0)."""


def resample_to_reference(source, reference, *, kind="linear", name=None, min_coverage=MIN_COVERAGE):
    """Resample an image onto the grid of a reference image, through world coordinates.

    Parameters
    ----------
    source : nibabel image or str or Path
        Image to resample: 3D, or 4D holding a single volume.
    reference : nibabel image or str or Path
        Image whose grid (shape and affine) the result takes; its data are not read.
    kind : {"linear", "nearest", "majority"}, optional
        ``"linear"`` for smooth fields (B1+, receive sensitivity), ``"nearest"`` or ``"majority"`` for
        labels and masks (see the module docstring).
    name : str, optional
        How error messages name the source (default: its file name).
    min_coverage : float, optional
        Share of reference voxels the source must cover; below it a :class:`PartialCoverageWarning`
        is issued.

    Returns
    -------
    nibabel.Nifti1Image
        On the reference grid: float32 for ``"linear"``, the source dtype for the label kinds. When
        the grids already match (:func:`qmri_workflows.io.images.same_grid`) the data are returned
        as loaded, without interpolation.

    Raises
    ------
    BIDSInputError
        If a file cannot be read, the source is not a single 3D volume or holds no finite value, or
        its field of view does not cover any reference voxel.
    ValueError
        For an unknown ``kind``.
    """
    import nibabel as nib

    if kind not in KINDS:
        raise ValueError(f"unknown resampling kind {kind!r}; use one of {KINDS}")
    source_image, source_name = _as_image(source, name)
    reference_image, reference_name = _as_image(reference, None)
    data = volume_data(source_image, source_name, dtype=np.float32 if kind == "linear" else None)
    target_shape = tuple(reference_image.shape[:3])
    if not same_grid(data.shape, source_image.affine, target_shape, reference_image.affine):
        data = _resample_array(
            data,
            source_image.affine,
            target_shape,
            reference_image.affine,
            kind=kind,
            min_coverage=min_coverage,
            names=(source_name, reference_name),
        )
    if data.dtype == bool:  # NIfTI has no boolean type
        data = data.astype(np.uint8)
    return nib.Nifti1Image(data, reference_image.affine, dtype=data.dtype)


def load_on_grid(path, reference, *, kind="linear", dtype=np.float32, min_coverage=MIN_COVERAGE):
    """Load one volume onto a reference grid (interpolating only when the grids differ).

    The checks of :func:`qmri_workflows.io.images.load_volume` apply (readable, one 3D volume, some
    finite value); a file already on the reference grid is returned exactly as ``load_volume``
    returns it.

    Parameters
    ----------
    path : str or Path
        NIfTI file to load.
    reference : nibabel image or str or Path
        Image giving the target grid.
    kind : {"linear", "nearest", "majority"}, optional
        See :func:`resample_to_reference`.
    dtype : numpy dtype, optional
        dtype of the returned array; must be floating for ``"linear"`` (NaN marks voxels outside the
        source field of view).
    min_coverage : float, optional
        See :func:`resample_to_reference`.

    Returns
    -------
    ndarray, shape of the reference grid

    Raises
    ------
    BIDSInputError
        As :func:`resample_to_reference`.
    ValueError
        For an unknown ``kind`` or a non-floating ``dtype`` with ``"linear"``.
    """
    if kind == "linear" and np.dtype(dtype).kind != "f":
        raise ValueError(f"linear resampling yields NaN outside the field of view; use a float dtype, not {dtype}")
    source_image = read_image(path)
    reference_image, _ = _as_image(reference, None)
    if same_grid(source_image.shape, source_image.affine, reference_image.shape, reference_image.affine):
        return volume_data(source_image, path, dtype=dtype)
    resampled = resample_to_reference(
        source_image, reference_image, kind=kind, name=str(path), min_coverage=min_coverage
    )
    return np.asarray(resampled.dataobj).astype(dtype, copy=False)


def _as_image(image_or_path, name):
    if isinstance(image_or_path, str) or hasattr(image_or_path, "__fspath__"):
        return read_image(image_or_path), name or str(image_or_path)
    return image_or_path, name or image_or_path.get_filename() or "the in-memory image"


def _resample_array(data, source_affine, target_shape, target_affine, *, kind, min_coverage, names):
    """Sample ``data`` at the reference voxel centres (see the module docstring for the rules)."""
    # reference voxel index -> world mm -> source voxel index
    voxel_map = np.linalg.solve(
        np.asarray(source_affine, dtype=np.float64), np.asarray(target_affine, dtype=np.float64)
    )
    matrix, offset = voxel_map[:3, :3], voxel_map[:3, 3]
    inside = _inside_source(matrix, offset, target_shape, data.shape)
    coverage = inside.mean()
    if coverage == 0:
        raise BIDSInputError(
            f"image {names[0]} does not overlap the grid of {names[1]}: it spans "
            f"{_world_box(data.shape, source_affine)} mm in world coordinates, the reference "
            f"{_world_box(target_shape, target_affine)} mm. Check that both come from the same session "
            "and that their headers (qform/sform) are intact; re-convert the DICOMs (dcm2niix) if not"
        )
    if coverage < min_coverage:
        warnings.warn(
            f"image {names[0]} covers only {100 * coverage:.0f}% of the voxels of {names[1]}; the rest "
            f"is {'NaN' if kind == 'linear' else '0'}. Check that its field of view contains the brain",
            PartialCoverageWarning,
            stacklevel=3,
        )
    if kind == "linear":
        resampled = _linear(data, matrix, offset, target_shape)
        resampled[~inside] = np.nan
        return resampled
    points_per_axis = np.ones(3, dtype=int)
    if kind == "majority":
        # length of each reference voxel edge in source voxels; the slack keeps equal sizes at 1
        points_per_axis = np.maximum(1, np.ceil(np.linalg.norm(matrix, axis=0) - 1e-3)).astype(int)
    if np.all(points_per_axis == 1):
        resampled = _nearest(data, matrix, offset, target_shape)
    else:
        resampled = _majority(data, matrix, offset, target_shape, points_per_axis)
    resampled[~inside] = 0
    return resampled


def _inside_source(matrix, offset, target_shape, source_shape):
    """Which reference voxel centres map into the box of the source voxels."""
    inside = np.ones(target_shape, dtype=bool)
    indices = np.ix_(*(np.arange(n, dtype=np.float32) for n in target_shape))
    for axis in range(3):
        coordinate = (
            np.float32(offset[axis])
            + np.float32(matrix[axis, 0]) * indices[0]
            + np.float32(matrix[axis, 1]) * indices[1]
            + np.float32(matrix[axis, 2]) * indices[2]
        )
        inside &= coordinate >= -0.5 - _EDGE_TOLERANCE
        inside &= coordinate <= source_shape[axis] - 0.5 + _EDGE_TOLERANCE
    return inside


def _sample(data, matrix, offset, target_shape, *, order, output):
    # mode "nearest" repeats the edge voxel in the outermost half voxel; beyond it the caller masks
    return ndimage.affine_transform(
        data, matrix, offset, output_shape=target_shape, output=output, order=order, mode="nearest", prefilter=False
    )


def _linear(data, matrix, offset, target_shape):
    finite = np.isfinite(data)
    if finite.all():
        return _sample(data, matrix, offset, target_shape, order=1, output=np.float32)
    values = _sample(
        np.where(finite, data, 0).astype(np.float32), matrix, offset, target_shape, order=1, output=np.float32
    )
    weights = _sample(finite.astype(np.float32), matrix, offset, target_shape, order=1, output=np.float32)
    enough = weights >= _MIN_FINITE_WEIGHT
    resampled = np.full(target_shape, np.nan, dtype=np.float32)
    resampled[enough] = values[enough] / weights[enough]
    return resampled


def _nearest(data, matrix, offset, target_shape):
    labels = data.astype(np.uint8) if data.dtype == bool else data
    return _sample(labels, matrix, offset, target_shape, order=0, output=labels.dtype).astype(data.dtype)


def _majority(data, matrix, offset, target_shape, points_per_axis):
    """Most frequent label over a sub-grid of points in each reference voxel (ties: smallest label)."""
    # sub-point positions in reference voxel units, centred on the voxel centre
    positions = [(np.arange(n) + 0.5) / n - 0.5 for n in points_per_axis]
    sub_points = list(itertools.product(*positions))
    votes = np.empty((len(sub_points),) + tuple(target_shape), dtype=data.dtype)
    for vote, sub_point in zip(votes, sub_points):
        sub_offset = offset + matrix @ np.asarray(sub_point)
        vote[...] = _nearest(data, matrix, sub_offset, target_shape)
        vote[~_inside_source(matrix, sub_offset, target_shape, data.shape)] = 0
    return _most_frequent(votes)


def _most_frequent(votes):
    """Mode along axis 0, the smallest value winning ties, without a per-label loop."""
    ordered = np.sort(votes, axis=0)
    position = np.arange(ordered.shape[0]).reshape((-1,) + (1,) * (ordered.ndim - 1))
    starts_run = np.ones(ordered.shape, dtype=bool)
    starts_run[1:] = ordered[1:] != ordered[:-1]
    run_start = np.maximum.accumulate(np.where(starts_run, position, 0), axis=0)
    # the first position where a run reaches the longest length belongs to the smallest modal label
    longest = np.argmax(position - run_start, axis=0)
    return np.take_along_axis(ordered, longest[np.newaxis], axis=0)[0]


def _world_box(shape, affine):
    corners = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape[:3]])))
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return " x ".join(f"[{low:.0f}, {high:.0f}]" for low, high in zip(world.min(0), world.max(0)))
