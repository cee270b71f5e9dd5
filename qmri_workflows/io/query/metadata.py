"""Sidecar numbers, their tolerances, phase units, and header checks of a series' images."""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import BIDSInputError
from ..images import GRID_TOLERANCE_MM, looks_like_radians, same_grid
from ..integrity import check_image_file
from .layout import IMAGE_EXTENSIONS

__all__ = [
    "ANGLE_TOLERANCE",
    "FIELD_TOLERANCE",
    "TIME_TOLERANCE",
    "check_grids",
    "check_same",
    "load_header",
    "phase_scale",
    "phase_scale_from_values",
    "sidecar_name",
    "sidecar_number",
    "sorted_by_flip_angle",
]

LOGGER = logging.getLogger("qmri_workflows.io")

TIME_TOLERANCE = 1e-6  # s; sidecars store times with ~microsecond precision
ANGLE_TOLERANCE = 1e-3  # deg
FIELD_TOLERANCE = 1e-3  # T; one scanner reports one nominal field strength
_PHASE_RADIAN_TOLERANCE = 1e-3

# Integer phase encodings written by scanners / converters: (description, low, high, scale to rad).
# Because phase wraps, only the span matters: a full-range image covers most of [low, high].
_INTEGER_PHASE_ENCODINGS = (
    ("Siemens 12-bit phase, -4096..4095", -4096, 4096, math.pi / 4096),
    ("Siemens 12-bit phase, 0..4095", 0, 4096, 2 * math.pi / 4096),
    ("11-bit phase, -2048..2047", -2048, 2048, math.pi / 2048),
    ("milliradians (GE), -3142..3142", -3142, 3142, 1e-3),
    ("16-bit phase, -32768..32767", -32768, 32767, math.pi / 32768),
)

# Phase "Units" of a sidecar and their factors to radians.
_PHASE_UNIT_SCALES = {
    **dict.fromkeys(("rad", "radian", "radians"), 1.0),
    **dict.fromkeys(("deg", "degree", "degrees"), math.pi / 180),
}

_UNITS_HINT = {
    "EchoTime": "seconds",
    "FlipAngle": "degrees",
    "RepetitionTimeExcitation": "seconds",
    "PhaseCyclingIncrement": "degrees",
    "MagneticFieldStrength": "tesla",
}
_SANITY_LIMITS = {
    "EchoTime": (1.0, "s is implausible for a gradient echo: BIDS times are in seconds, not ms"),
    "RepetitionTimeExcitation": (10.0, "s is implausible for a gradient echo: BIDS times are in seconds, not ms"),
    "FlipAngle": (180.0, "deg is not a valid excitation flip angle (degrees, 0 < FA <= 180)"),
}


def sidecar_name(ctx, path):
    """Dataset-relative name of the JSON sidecar of image ``path``."""
    name = ctx.name(path)
    for ext in IMAGE_EXTENSIONS[::-1]:
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    return name + ".json"


def sidecar_number(ctx, path, key, *, fallback=None, required=True, what=""):
    """Read a positive finite number from the sidecar of ``path``, optionally from a fallback key.

    Parameters
    ----------
    ctx : QueryContext
    path : str
        Image whose merged sidecar is read.
    key : str
        Sidecar key; a one-element list counts as its element (dcm2niix writes some keys so).
    fallback : str, optional
        Key read when ``key`` is absent (e.g. ``RepetitionTime`` for ``RepetitionTimeExcitation``).
    required : bool, optional
        Raise when both keys are absent (else return None).
    what : str, optional
        Appended to the "has no" message, e.g. " (required for AFI)".

    Returns
    -------
    float or None

    Raises
    ------
    BIDSInputError
        For a missing (required) key, a non-number, a non-positive value or an implausible one
        (milliseconds where BIDS wants seconds).
    """
    metadata = ctx.metadata(path)
    value = metadata.get(key)
    used = key
    if value is None and fallback is not None:
        value, used = metadata.get(fallback), fallback
    if value is None:
        if not required:
            return None
        keys = f"'{key}'" + (f" (or '{fallback}')" if fallback else "")
        raise BIDSInputError(
            f"{ctx.name(path)}: the sidecar has no {keys}{what}; add it to "
            f"{sidecar_name(ctx, path)} ({_UNITS_HINT.get(key, '')})"
        )
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BIDSInputError(f"{ctx.name(path)}: '{used}' must be a number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise BIDSInputError(f"{ctx.name(path)}: '{used}' must be a positive number, got {value!r}")
    limit = _SANITY_LIMITS.get(key)
    if limit is not None and number > limit[0]:
        raise BIDSInputError(f"{ctx.name(path)}: '{used}' = {number:g} {limit[1]}")
    return number


def check_same(ctx, values, label, fix, *, tolerance):
    """The common value of ``values`` ({path: number or None}); raise if two differ.

    Parameters
    ----------
    ctx : QueryContext
    values : dict
        {path: number}; None values are ignored.
    label : str
        What the numbers are (for the message), e.g. "TR".
    fix : str
        How to fix a disagreement (for the message).
    tolerance : float
        Largest accepted absolute difference, in the numbers' unit (e.g. :data:`TIME_TOLERANCE`).

    Returns
    -------
    float or None
        The first value, None when all are None.
    """
    items = [(path, value) for path, value in values.items() if value is not None]
    if not items:
        return None
    reference_path, reference = items[0]
    for path, value in items[1:]:
        if abs(value - reference) > tolerance:
            raise BIDSInputError(
                f"inconsistent {label} within one series: {ctx.name(reference_path)} has {reference:g}, "
                f"{ctx.name(path)} has {value:g}; {fix}"
            )
    return reference


def load_header(path, shown=None):
    """nibabel image of ``path`` (data not read) that is whole and holds a single 3D volume.

    Every image the query returns passes through here, so a damaged file (empty, truncated,
    compressed otherwise than its name says, or shorter than its header promises; see
    :func:`~qmri_workflows.io.integrity.check_image_file`) makes its collection unusable before
    anything runs, instead of failing deep inside a workflow.

    ``shown`` is how messages name the file (e.g. relative to the dataset root); ``path`` if None.
    """
    image = check_image_file(path)
    shown = path if shown is None else shown
    shape = image.shape
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise BIDSInputError(
            f"{shown} has shape {shape}; one 3D volume per file is expected "
            "(split 4D series into one file per echo / flip angle / part)"
        )
    return image


def sorted_by_flip_angle(ctx, series, what):
    """``series`` (objects with ``flip_angle`` and ``magnitude``) sorted by flip angle, all distinct."""
    series = sorted(series, key=lambda s: s.flip_angle)
    for a, b in zip(series, series[1:]):
        if abs(a.flip_angle - b.flip_angle) <= ANGLE_TOLERANCE:
            raise BIDSInputError(
                f"two {what} flip- groups have the same FlipAngle {a.flip_angle:g} deg: {ctx.name(a.magnitude[0])} "
                f"and {ctx.name(b.magnitude[0])}; fix the FlipAngle in the sidecars or the flip- labels"
            )
    return series


def check_grids(ctx, paths, what):
    """All ``paths`` must be single 3D volumes on the same grid (headers only)."""
    reference = None
    for path in paths:
        image = load_header(path, ctx.name(path))
        shape = image.shape
        if reference is None:
            reference = (path, shape, image.affine)
            continue
        if not same_grid(shape, image.affine, reference[1], reference[2], atol=GRID_TOLERANCE_MM):
            difference = np.abs(image.affine - reference[2]).max()
            raise BIDSInputError(
                f"the {what} images are not on one voxel grid: {ctx.name(path)} (shape {shape[:3]}) "
                f"differs from {ctx.name(reference[0])} (shape {reference[1][:3]}; largest affine "
                f"difference {difference:.3g} mm, tolerance {GRID_TOLERANCE_MM} mm); re-export the "
                "series from the scanner together or resample them onto one grid"
            )


def phase_scale_from_values(minimum, maximum, *, integer_valued, name="phase image"):
    """Infer the factor that converts stored phase values to radians from their range.

    Parameters
    ----------
    minimum, maximum : float
        Range of the finite stored values.
    integer_valued : bool
        Whether all stored values are integers.
    name : str
        Used in messages.

    Returns
    -------
    scale : float
        1.0 for radians (range within [-pi, 2*pi] and no wider than 2*pi), else the factor of a known
        integer encoding (e.g. pi/4096 for Siemens -4096..4095) whose range the values nearly fill.
    description : str
        How the units were recognised.

    Raises
    ------
    BIDSInputError
        When the range fits no known encoding.
    """
    tol = _PHASE_RADIAN_TOLERANCE
    span = maximum - minimum
    if minimum >= -math.pi - tol and maximum <= 2 * math.pi + tol and span <= 2 * math.pi + tol:
        return 1.0, "radians"
    if integer_valued:
        candidates = []
        for description, low, high, scale in _INTEGER_PHASE_ENCODINGS:
            full = high - low
            inside = minimum >= low - 1 and maximum <= high + 1
            # a wrapped phase image fills most of its range; require 3/4 to rule out look-alikes
            if inside and span >= 0.75 * full:
                candidates.append((full, scale, description))
        if candidates:
            _, scale, description = min(candidates)
            return scale, description
    if minimum >= -180.0 - 0.5 and maximum <= 360.0 + 0.5 and 0.75 * 360.0 <= span <= 360.0 + 0.5:
        # most of one turn in degrees (as the integer encodings above): "rad" would be wrong advice
        advice = 'they look like degrees: add "Units": "deg" to its sidecar (or convert it to radians)'
    else:
        advice = 'convert it to radians or add "Units": "rad" to its sidecar'
    raise BIDSInputError(f"cannot tell the units of {name}: values span [{minimum:g}, {maximum:g}]; {advice}")


def phase_scale(ctx, path):
    """Phase scale of one phase image from its sidecar ``Units`` or, failing that, its values.

    A labelled image (``"rad"``, ``"deg"``) is checked against its values, so that a sidecar that
    contradicts them (scanner integers labelled "rad") is one error here, before any processing.
    """
    units = ctx.metadata(path).get("Units")
    unit = str(units).strip().lower() if units is not None else None
    if unit not in _PHASE_UNIT_SCALES and unit not in (None, "arbitrary", "a.u.", "au", ""):
        raise BIDSInputError(
            f'{ctx.name(path)}: unsupported phase "Units": {units!r} in {sidecar_name(ctx, path)}; '
            'phase must be in "rad" (or "deg"), or unlabelled scanner integers'
        )
    data = np.asanyarray(load_header(path, ctx.name(path)).dataobj)
    values = data[np.isfinite(data)] if data.dtype.kind == "f" else data.ravel()
    if values.size == 0:
        raise BIDSInputError(f"phase image {ctx.name(path)} holds no finite value")
    low, high = float(values.min()), float(values.max())
    integer_valued = data.dtype.kind in "iu" or bool(np.all(values == np.round(values)))
    if unit in _PHASE_UNIT_SCALES:
        scale = _PHASE_UNIT_SCALES[unit]
        if not looks_like_radians(low * scale, high * scale):
            try:
                _, found = phase_scale_from_values(low, high, integer_valued=integer_valued)
                advice = f'they look like {found}: give its sidecar the "Units" of its values'
                advice += ' ("arbitrary" for scanner integers)' if found != "radians" else ' ("rad")'
            except BIDSInputError:
                advice = "convert the image to wrapped phase in radians"
            raise BIDSInputError(
                f'phase image {ctx.name(path)}: its sidecar {sidecar_name(ctx, path)} says "Units": {units!r} '
                f"but its values span [{low:.4g}, {high:.4g}], not one turn of wrapped phase in those units; "
                f"{advice}"
            )
        return scale
    scale, description = phase_scale_from_values(
        low, high, integer_valued=integer_valued, name=f"phase image {ctx.name(path)}"
    )
    if scale != 1.0:
        ctx.notes.append(
            f"phase of {ctx.name(path)} (sidecar Units: {units if units is not None else 'absent'}) read as "
            f"{description}; multiplied by {scale:.6g} to get radians"
        )
        LOGGER.info(ctx.notes[-1])
    return scale
