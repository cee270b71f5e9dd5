"""Field maps in ``fmap``: the AFI pair and the double-angle pair (transmit field), and the head/body
RB1COR pair (receive field)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BIDSInputError
from .layout import entity
from .metadata import ANGLE_TOLERANCE, check_grids, sidecar_number

__all__ = ["AFIPair", "DAMPair", "ReceivePair", "afi_pair", "dam_pair", "receive_pair"]


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
