"""Field maps in ``fmap``: the AFI pair, the double-angle pair and the Siemens ``tfl_b1map``
(transmit field), and the head/body RB1COR pair (receive field)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BIDSInputError
from .layout import entity
from .metadata import ANGLE_TOLERANCE, check_grids, load_header, sidecar_number

__all__ = [
    "TFL_HEAD_FRACTION",
    "TFL_MIN_PREP_ANGLE",
    "TFL_RATIO_RANGE",
    "AFIPair",
    "DAMPair",
    "ReceivePair",
    "TFLMap",
    "afi_pair",
    "dam_pair",
    "receive_pair",
    "tfl_map",
]


@dataclass(frozen=True)
class AFIPair:
    """Actual flip-angle imaging pair (TR1 < TR2, s; flip angle in deg)."""

    tr1_file: str
    tr2_file: str
    tr1: float
    tr2: float
    flip_angle: float


@dataclass(frozen=True)
class DAMPair:
    """Double-angle pair: the images at the smaller and the larger nominal flip angle (deg), one TR (s)."""

    flip1_file: str
    flip2_file: str
    flip_angles: tuple
    repetition_time: float


@dataclass(frozen=True)
class TFLMap:
    """Siemens ``tfl_b1map``: the flip-angle map (``acq-famp``: 10 x the actual preparation angle,
    deg) and the nominal preparation angle it is read against.

    Attributes
    ----------
    famp_file : str
    anat_file : str or None
        The anatomical reference (``acq-anat``), listed as a source only.
    prep_angle : float
        Nominal preparation (saturation) flip angle (deg).
    angle_source : str
        Where ``prep_angle`` comes from: ``"--tb1tfl-prep-angle"`` or ``"sidecar FlipAngle"``.
    median_ratio : float
        Median of famp / (10 x ``prep_angle``) in the head (the scale check).
    """

    famp_file: str
    anat_file: str | None
    prep_angle: float
    angle_source: str
    median_ratio: float

    @property
    def scale_text(self):
        """How the values are read, for the plan and the sidecars."""
        return f"Siemens tfl_b1map (famp / 10 / {self.prep_angle:g} deg, angle from {self.angle_source})"


@dataclass(frozen=True)
class ReceivePair:
    """Receive-field mapping pair: the same low-resolution scan with the head and the body coil."""

    head_file: str
    body_file: str


def _one_per_label(ctx, files, labels, suffix):
    """{label: path} for files whose acq label is in ``labels``; refuse duplicates."""
    found = {}
    for bids_file in files:
        acquisition = entity(bids_file, "acquisition")
        if acquisition not in labels:
            continue
        if acquisition in found:
            raise BIDSInputError(
                f"two {suffix} images with acq-{acquisition}: {ctx.name(found[acquisition])} and "
                f"{ctx.name(bids_file.path)}; keep one"
            )
        found[acquisition] = bids_file.path
    return found


def afi_pair(ctx, files):
    """The AFI pair among the ``TB1AFI`` files of one subject/session (None without files).

    Raises
    ------
    BIDSInputError
        For an incomplete pair, missing TR/flip angle, different flip angles, TR2 <= TR1, or images
        off one grid.
    """
    if not files:
        return None
    found = _one_per_label(ctx, files, ("tr1", "tr2"), "TB1AFI")
    if set(found) != {"tr1", "tr2"}:
        names = ", ".join(ctx.name(f.path) for f in files)
        raise BIDSInputError(f"incomplete AFI pair ({names}): need fmap/*_acq-tr1_TB1AFI and fmap/*_acq-tr2_TB1AFI")
    tr1_file, tr2_file = found["tr1"], found["tr2"]
    tr1, tr2 = (
        sidecar_number(ctx, path, "RepetitionTimeExcitation", fallback="RepetitionTime", what=" (required for AFI)")
        for path in (tr1_file, tr2_file)
    )
    flip1, flip2 = (sidecar_number(ctx, path, "FlipAngle", what=" (required for AFI)") for path in (tr1_file, tr2_file))
    if abs(flip1 - flip2) > ANGLE_TOLERANCE:
        raise BIDSInputError(
            f"AFI pair with different flip angles: {ctx.name(tr1_file)} has {flip1:g} deg, {ctx.name(tr2_file)} "
            f"has {flip2:g} deg; both images of an AFI acquisition share one flip angle: fix the sidecars"
        )
    if tr2 <= tr1:
        raise BIDSInputError(
            f"AFI pair with TR2 <= TR1: {ctx.name(tr1_file)} has {tr1:g} s, {ctx.name(tr2_file)} has {tr2:g} s; "
            "acq-tr1 must be the image acquired after the shorter TR (swap the acq- labels if they are reversed)"
        )
    check_grids(ctx, [tr1_file, tr2_file], "AFI")
    return AFIPair(tr1_file=tr1_file, tr2_file=tr2_file, tr1=tr1, tr2=tr2, flip_angle=flip1)


def dam_pair(ctx, files):
    """The double-angle pair among the ``TB1DAM`` files of one subject/session (None without files).

    The two images are told apart by their sidecars' ``FlipAngle`` (the ``flip-`` labels only
    number them); the smaller angle comes first.

    Raises
    ------
    BIDSInputError
        For other than two images, a missing FlipAngle or TR, equal flip angles, different TRs, or
        images off one grid.
    """
    if not files:
        return None
    names = ", ".join(ctx.name(f.path) for f in files)
    if len(files) != 2:
        raise BIDSInputError(
            f"a double-angle B1+ map needs two fmap/*_flip-<n>_TB1DAM images, found {len(files)} ({names}); keep "
            "the pair of one acquisition"
        )
    what = " (required for the double-angle method)"
    angles = {f.path: sidecar_number(ctx, f.path, "FlipAngle", what=what) for f in files}
    first, second = sorted(angles, key=angles.get)
    if angles[second] - angles[first] <= ANGLE_TOLERANCE:
        raise BIDSInputError(
            f"double-angle pair with one flip angle ({names}: {angles[first]:g} deg); the two images need different "
            "nominal flip angles (usually a and 2a): fix the FlipAngle of their sidecars"
        )
    if angles[second] >= 180.0:
        raise BIDSInputError(
            f"{ctx.name(second)}: FlipAngle {angles[second]:g} deg; the double-angle method needs flip angles below 180"
        )
    trs = {
        path: sidecar_number(ctx, path, "RepetitionTimeExcitation", fallback="RepetitionTime", what=what)
        for path in (first, second)
    }
    if abs(trs[first] - trs[second]) > 1e-6 * max(trs.values()):
        raise BIDSInputError(
            f"double-angle pair with different repetition times ({ctx.name(first)}: {trs[first]:g} s, "
            f"{ctx.name(second)}: {trs[second]:g} s); both images of the method share one TR"
        )
    check_grids(ctx, [first, second], "double-angle")
    return DAMPair(
        flip1_file=first,
        flip2_file=second,
        flip_angles=(angles[first], angles[second]),
        repetition_time=trs[first],
    )


#: Smallest sidecar FlipAngle (deg) read as the preparation angle of a tfl_b1map: VB software writes
#: it (e.g. 60 or 80), VE/XA the readout angle of the FLASH (e.g. 8 or 10), far below.
TFL_MIN_PREP_ANGLE = 30.0
#: Plausible median B1+ (actual / nominal) in the head; outside it the famp scale or the angle is wrong.
TFL_RATIO_RANGE = (0.3, 2.0)
#: The head of a tfl_b1map (its scale check here, its fold check when it is read): the reference
#: image above this fraction of its 99th percentile (the famp's background holds arccos of noise,
#: whose median reads about as high as a plausible B1+, and can pass any limit).
TFL_HEAD_FRACTION = 0.1


def tfl_map(ctx, files, prep_angle=None):
    """The Siemens ``tfl_b1map`` among the ``TB1TFL`` files of one subject/session (None without files).

    Parameters
    ----------
    ctx : QueryContext
    files : list of BIDSFile
        The ``fmap/*_TB1TFL`` images: ``acq-famp`` (required) and ``acq-anat`` (optional).
    prep_angle : float, optional
        Nominal preparation angle (deg) given on the command line (``--tb1tfl-prep-angle``); it
        wins over the sidecar.

    Returns
    -------
    TFLMap or None

    Raises
    ------
    BIDSInputError
        Without an ``acq-famp`` image, with two of a kind, when the preparation angle is not known
        (the sidecar's FlipAngle is missing or a readout angle, below :data:`TFL_MIN_PREP_ANGLE`,
        and no ``prep_angle``), or when the median ratio in the head is outside
        :data:`TFL_RATIO_RANGE` (famp in degrees or as a ratio already, or the wrong angle).
    """
    if not files:
        return None
    found = _one_per_label(ctx, files, ("anat", "famp"), "TB1TFL")
    names = ", ".join(ctx.name(f.path) for f in files)
    if "famp" not in found:
        raise BIDSInputError(
            f"Siemens tfl_b1map without its flip-angle map ({names}): need fmap/*_acq-famp_TB1TFL "
            "(the acq-anat image alone is only the reference)"
        )
    famp_file, anat_file = found["famp"], found.get("anat")
    if prep_angle is not None:
        angle, angle_source = float(prep_angle), "--tb1tfl-prep-angle"
    else:
        sidecar_angle = sidecar_number(ctx, famp_file, "FlipAngle", required=False)
        if sidecar_angle is None or sidecar_angle < TFL_MIN_PREP_ANGLE:
            stated = "no FlipAngle" if sidecar_angle is None else f"FlipAngle {sidecar_angle:g} deg"
            raise BIDSInputError(
                f"{ctx.name(famp_file)}: the sidecar has {stated}, which is not the nominal preparation angle of "
                "the Siemens tfl_b1map (VE/XA software writes the readout flip angle there; the preparation angle, "
                "commonly 80 or 90 deg, is not in the sidecar): give it with --tb1tfl-prep-angle DEG (check the "
                "scanner protocol); without it this B1+ map is not used"
            )
        angle, angle_source = sidecar_angle, "sidecar FlipAngle"
    median = _tfl_median_ratio(ctx, famp_file, anat_file, angle)
    low, high = TFL_RATIO_RANGE
    if not low <= median <= high:
        raise BIDSInputError(
            f"{ctx.name(famp_file)}: median famp / (10 x {angle:g} deg) in the head is {median:.3g}, not a plausible "
            f"B1+ ({low:g}-{high:g} of nominal); a Siemens famp holds 10 x the actual preparation angle in degrees: "
            "is it stored already in degrees or as a ratio, or is the preparation angle "
            f"({angle:g} deg, from {angle_source}) wrong? Check the scanner protocol"
            + (" and give the angle with --tb1tfl-prep-angle DEG" if angle_source != "--tb1tfl-prep-angle" else "")
        )
    return TFLMap(
        famp_file=famp_file, anat_file=anat_file, prep_angle=angle, angle_source=angle_source, median_ratio=median
    )


def _tfl_median_ratio(ctx, famp_file, anat_file, prep_angle):
    """Median of famp / (10 x ``prep_angle``) in the head: where the reference image has signal
    when it is on the famp's grid, else wherever the famp is positive."""
    # imported here: the query is loaded by --help, which must not pay for scipy
    from ...core.relaxometry import trusted_voxels

    famp = np.asarray(load_header(famp_file, ctx.name(famp_file)).dataobj, dtype=float)
    inside = np.isfinite(famp) & (famp > 0)
    if anat_file is not None:
        anat = load_header(anat_file, ctx.name(anat_file))
        if anat.shape[:3] == famp.shape[:3]:
            inside &= trusted_voxels(np.asarray(anat.dataobj, dtype=float), TFL_HEAD_FRACTION)
    if not inside.any():
        raise BIDSInputError(f"{ctx.name(famp_file)} holds no positive value in the head; is it a flip-angle map?")
    return float(np.median(famp[inside])) / (10.0 * prep_angle)


def receive_pair(ctx, files):
    """The head/body coil pair among the ``RB1COR`` files (PDw preferred; None without files).

    Raises
    ------
    BIDSInputError
        For an incomplete or ambiguous pair, duplicates, or images off one grid.
    """
    if not files:
        return None
    heads, bodies = {}, {}
    for bids_file in files:
        acquisition = entity(bids_file, "acquisition") or ""
        for prefix, target in (("head", heads), ("body", bodies)):
            if acquisition.lower().startswith(prefix):
                contrast = acquisition[len(prefix) :]
                if contrast in target:
                    raise BIDSInputError(
                        f"two RB1COR images with acq-{acquisition}: {ctx.name(target[contrast])} and "
                        f"{ctx.name(bids_file.path)}; keep one"
                    )
                target[contrast] = bids_file.path
    contrasts = sorted(set(heads) & set(bodies))
    names = ", ".join(ctx.name(f.path) for f in files)
    if not contrasts:
        raise BIDSInputError(
            f"incomplete receive-field pair ({names}): need fmap/*_acq-head<contrast>_RB1COR and "
            "fmap/*_acq-body<contrast>_RB1COR with the same <contrast>"
        )
    if len(contrasts) > 1:
        if "PDw" not in contrasts:
            raise BIDSInputError(f"several receive-field pairs ({names}) and none for PDw; keep one head/body pair")
        contrasts = ["PDw"]
    contrast = contrasts[0]
    check_grids(ctx, [heads[contrast], bodies[contrast]], "RB1COR")
    return ReceivePair(head_file=heads[contrast], body_file=bodies[contrast])
