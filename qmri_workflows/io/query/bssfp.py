"""Phase-cycled bSSFP: which VFA files are bSSFP, and their series (one per flip angle).

Project convention (BIDS has no phase-cycling entity): a ``VFA`` collection with
``PulseSequenceType`` "bSSFP" and ``acq-bssfp<increment, 3 digits>``, the increment repeated in the
sidecar as ``PhaseCyclingIncrement`` (deg).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import BIDSInputError
from .layout import entity, split_parts
from .metadata import (
    ANGLE_TOLERANCE,
    TIME_TOLERANCE,
    check_grids,
    check_same,
    phase_scale,
    sidecar_number,
    sorted_by_flip_angle,
)

__all__ = ["BSSFPSeries", "bssfp_series", "says_bssfp", "sequence_kind"]

_SPOILED_SEQUENCE_TYPES = frozenset(
    {"spgr", "flash", "gre", "spoiled gre", "spoiled gradient echo", "t1ffe", "spoiled grass", "fast low angle shot"}
)
_BSSFP_SEQUENCE_TYPES = frozenset(
    {"bssfp", "ssfp", "truefisp", "fiesta", "balanced ssfp", "balanced ffe", "b-ffe", "bffe"}
)
_BSSFP_ACQ = re.compile(r"^bssfp(\d{3})$", re.IGNORECASE)


@dataclass(frozen=True)
class BSSFPSeries:
    """Phase-cycled bSSFP at one flip angle (magnitude/phase ordered by increasing increment)."""

    flip_angle: float
    repetition_time: float
    phase_increments: tuple
    magnitude: tuple
    phase: tuple | None
    phase_scale: float | None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def _sequence_key(ctx, bids_file):
    sequence = ctx.metadata(bids_file.path).get("PulseSequenceType")
    return sequence, (str(sequence).strip().lower() if sequence is not None else None)


def says_bssfp(ctx, bids_file):
    """Whether the acq- label or PulseSequenceType of a VFA file claims a bSSFP (even if they disagree)."""
    acquisition = entity(bids_file, "acquisition")
    return (
        bool(acquisition and _BSSFP_ACQ.match(acquisition)) or _sequence_key(ctx, bids_file)[1] in _BSSFP_SEQUENCE_TYPES
    )


def sequence_kind(ctx, bids_file):
    """'spoiled' or 'bssfp' for a VFA file, from its acq label and PulseSequenceType.

    Raises
    ------
    BIDSInputError
        When the acq- label and PulseSequenceType disagree, or the sequence is neither.
    """
    acquisition = entity(bids_file, "acquisition")
    sequence, sequence_key = _sequence_key(ctx, bids_file)
    if sequence_key in _BSSFP_SEQUENCE_TYPES:
        return "bssfp"
    if acquisition and _BSSFP_ACQ.match(acquisition):
        if sequence_key is not None:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: acq-{acquisition} marks a phase-cycled bSSFP image but "
                f'PulseSequenceType is {sequence!r}; set "PulseSequenceType": "bSSFP" in its sidecar'
            )
        return "bssfp"
    if sequence_key is None or sequence_key in _SPOILED_SEQUENCE_TYPES:
        return "spoiled"
    raise BIDSInputError(
        f"{ctx.name(bids_file.path)}: PulseSequenceType {sequence!r} is neither a spoiled gradient echo "
        '("SPGR") nor a balanced SSFP ("bSSFP"); fix the sidecar or move the file out of the dataset'
    )


def _increment(ctx, bids_file):
    acquisition = entity(bids_file, "acquisition")
    match = _BSSFP_ACQ.match(acquisition or "")
    from_sidecar = ctx.metadata(bids_file.path).get("PhaseCyclingIncrement")
    if match is None and from_sidecar is None:
        raise BIDSInputError(
            f"{ctx.name(bids_file.path)}: bSSFP image without its RF phase-cycling increment; name it "
            'acq-bssfp<increment, 3 digits> (e.g. acq-bssfp090) and add "PhaseCyclingIncrement" (deg)'
        )
    if from_sidecar is None:
        return float(match.group(1))
    try:
        value = float(from_sidecar)
    except (TypeError, ValueError):
        raise BIDSInputError(
            f"{ctx.name(bids_file.path)}: PhaseCyclingIncrement must be a number, got {from_sidecar!r}"
        ) from None
    if match is not None and abs(value - float(match.group(1))) > ANGLE_TOLERANCE:
        raise BIDSInputError(
            f"{ctx.name(bids_file.path)}: acq-{acquisition} says {int(match.group(1))} deg but the sidecar "
            f"PhaseCyclingIncrement is {value:g} deg; make them agree"
        )
    return value


def _by_increment(ctx, files, part):
    """{increment (deg): path} of one flip angle and part; refuse two images of one increment."""
    found = {}
    for bids_file in files:
        increment = _increment(ctx, bids_file)
        if increment in found:
            raise BIDSInputError(
                f"two bSSFP {part} images with increment {increment:g} deg at one flip angle: "
                f"{ctx.name(found[increment])} and {ctx.name(bids_file.path)}; keep one (move the other "
                "out of the dataset or fix its acq- label and PhaseCyclingIncrement)"
            )
        found[increment] = bids_file.path
    return dict(sorted(found.items()))


def _check_same_cycles(ctx, series):
    """Refuse flip angles with different phase cycles, or phase at some flip angles only.

    Band removal combines the cycles of each flip angle, and DESPOT2 then compares the flip
    angles: a cycle missing at one flip angle changes that flip angle's residual banding, so the
    flip angles would not be comparable.
    """
    reference = series[0]
    for other in series[1:]:
        if other.phase_increments != reference.phase_increments:
            missing = sorted(set(reference.phase_increments) ^ set(other.phase_increments))
            short = other if len(other.phase_increments) < len(reference.phase_increments) else reference
            raise BIDSInputError(
                f"bSSFP flip angles {reference.flip_angle:g} and {other.flip_angle:g} deg have different phase "
                f"cycles ({', '.join(f'{inc:g}' for inc in reference.phase_increments)} vs "
                f"{', '.join(f'{inc:g}' for inc in other.phase_increments)} deg; increment(s) "
                f"{', '.join(f'{inc:g}' for inc in missing)} missing at one of them, e.g. next to "
                f"{ctx.name(short.magnitude[0])}); every flip angle needs the same set: add the missing "
                "acq-bssfp<increment> images or remove the extra ones"
            )
        if (other.phase is None) != (reference.phase is None):
            without = other if other.phase is None else reference
            raise BIDSInputError(
                f"bSSFP phase images at some flip angles only: none for flip {without.flip_angle:g} deg "
                f"({ctx.name(without.magnitude[0])}); provide part-phase images for every flip angle or for none"
            )


def bssfp_series(ctx, files):
    """Check the bSSFP files of one subject/session and group them by flip angle.

    Parameters
    ----------
    ctx : QueryContext
    files : list of bids.layout.BIDSFile
        The VFA files :func:`sequence_kind` calls "bssfp".

    Returns
    -------
    tuple of BSSFPSeries
        Sorted by flip angle.

    Raises
    ------
    BIDSInputError
        For anything that makes the collection unusable (the message names the file and the fix).
    """
    for key, name in (("run", "run"), ("reconstruction", "rec"), ("echo", "echo")):
        labels = {entity(f, key) for f in files}
        if len(labels) > 1:
            raise BIDSInputError(
                f"bSSFP images differ in {name}- ({', '.join(sorted(ctx.name(f.path) for f in files)[:4])} ...); "
                "keep one bSSFP collection per subject/session with one image per increment, flip angle and part"
            )
    groups = {}
    for bids_file in files:
        groups.setdefault(entity(bids_file, "flip"), []).append(bids_file)
    series = []
    for group in groups.values():
        magnitude_files, phase_files = split_parts(ctx, group)
        magnitude = _by_increment(ctx, magnitude_files, "magnitude")
        if not magnitude:
            raise BIDSInputError(
                f"bSSFP phase images without magnitude: {', '.join(ctx.name(f.path) for f in phase_files)}"
            )
        phase = _by_increment(ctx, phase_files, "phase")
        if phase and set(phase) != set(magnitude):
            raise BIDSInputError(
                f"bSSFP phase increments {sorted(phase)} do not match magnitude increments {sorted(magnitude)} "
                f"(e.g. {ctx.name(next(iter(magnitude.values())))}); provide phase for every increment or none"
            )
        paths = list(magnitude.values())
        flips = {p: sidecar_number(ctx, p, "FlipAngle", what=" (required for bSSFP)") for p in paths}
        trs = {
            p: sidecar_number(
                ctx, p, "RepetitionTimeExcitation", fallback="RepetitionTime", what=" (required for bSSFP)"
            )
            for p in paths
        }
        flip_angle = check_same(
            ctx,
            flips,
            "FlipAngle",
            "the phase cycles of one bSSFP flip angle must share it; fix the sidecars",
            tolerance=ANGLE_TOLERANCE,
        )
        repetition_time = check_same(
            ctx, trs, "TR", "the phase cycles of one bSSFP series must share it", tolerance=TIME_TOLERANCE
        )
        phase_tuple = tuple(phase[inc] for inc in magnitude) if phase else None
        series.append(
            BSSFPSeries(
                flip_angle=flip_angle,
                repetition_time=repetition_time,
                phase_increments=tuple(magnitude),
                magnitude=tuple(paths),
                phase=phase_tuple,
                phase_scale=phase_scale(ctx, phase_tuple[0]) if phase_tuple else None,
                metadata=dict(ctx.metadata(paths[0])),
            )
        )
    series = sorted_by_flip_angle(ctx, series, "bSSFP")
    _check_same_cycles(ctx, series)
    check_grids(ctx, [p for s in series for p in (*s.magnitude, *(s.phase or ()))], "bSSFP")
    return tuple(series)
