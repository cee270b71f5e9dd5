"""Field maps in ``fmap``: the AFI pair (transmit field) and the head/body RB1COR pair (receive field)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import BIDSInputError
from .layout import entity
from .metadata import ANGLE_TOLERANCE, check_grids, sidecar_number

__all__ = ["AFIPair", "ReceivePair", "afi_pair", "receive_pair"]


@dataclass(frozen=True)
class AFIPair:
    """Actual flip-angle imaging pair (TR1 < TR2, s; flip angle in deg)."""

    tr1_file: str
    tr2_file: str
    tr1: float
    tr2: float
    flip_angle: float


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
