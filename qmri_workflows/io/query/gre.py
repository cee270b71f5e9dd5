"""Multi-echo spoiled GRE: VFA (several flip angles), MEGRE (one) and MPM (PDw/T1w/MTw) echo series."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BIDSInputError
from .layout import by_echo, entity, single_collection, split_parts
from .metadata import (
    ANGLE_TOLERANCE,
    TIME_TOLERANCE,
    check_grids,
    check_same,
    phase_scale,
    sidecar_number,
    sorted_by_flip_angle,
)

__all__ = ["EchoSeries", "MPMSeries", "gre_series", "mpm_series"]


@dataclass(frozen=True)
class EchoSeries:
    """Multi-echo spoiled GRE at one flip angle.

    Attributes
    ----------
    magnitude : tuple of str
        Magnitude files ordered by echo.
    phase : tuple of str or None
        Phase files matching ``magnitude`` echo by echo, or None.
    echo_times : tuple of float
        Echo times (s), strictly increasing.
    flip_angle : float or None
        Nominal flip angle (deg); None only for a MEGRE without ``FlipAngle``.
    repetition_time : float or None
        Excitation repetition time (s); None only for a MEGRE without TR.
    phase_scale : float or None
        Multiply stored phase values by this to get radians (1.0 for radians); None without phase.
    metadata : dict
        Merged sidecar of the first magnitude echo.
    """

    magnitude: tuple
    phase: tuple | None
    echo_times: tuple
    flip_angle: float | None
    repetition_time: float | None
    phase_scale: float | None
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def gre_series(ctx, files, suffix):
    """Check the spoiled GRE files of one subject/session and group them by flip angle.

    Parameters
    ----------
    ctx : QueryContext
    files : list of bids.layout.BIDSFile
        All ``VFA`` files of the spoiled collection, or all ``MEGRE`` files.
    suffix : {"VFA", "MEGRE"}

    Returns
    -------
    tuple of EchoSeries
        Sorted by flip angle for VFA.

    Raises
    ------
    BIDSInputError
        For anything that makes the collection unusable (the message names the file and the fix).
    """
    single_collection(ctx, files, suffix)
    groups = {}
    for bids_file in files:
        groups.setdefault(entity(bids_file, "flip"), []).append(bids_file)
    if suffix == "MEGRE" and len(groups) > 1:
        raise BIDSInputError(
            f"MEGRE files carry several flip- labels ({sorted(map(str, groups))}); a multi-echo GRE at "
            "several flip angles is a VFA collection: rename them *_VFA"
        )
    require = suffix == "VFA"
    series = [
        _echo_series(ctx, group, suffix=suffix, require_flip=require, require_tr=require)
        for _, group in sorted(groups.items(), key=lambda item: str(item[0]))
    ]
    if suffix == "VFA":
        series = sorted_by_flip_angle(ctx, series, "VFA")
        check_same(
            ctx,
            {s.magnitude[0]: s.repetition_time for s in series},
            "TR",
            "the flip angles of a VFA collection must share one TR; fix the sidecars",
            tolerance=TIME_TOLERANCE,
        )
    check_grids(ctx, [p for s in series for p in (*s.magnitude, *(s.phase or ()))], suffix)
    return tuple(series)


def _echo_series(ctx, files, *, suffix, require_flip, require_tr):
    """Build one EchoSeries from the files of one flip angle."""
    magnitude_files, phase_files = split_parts(ctx, files)
    if not magnitude_files:
        names = ", ".join(ctx.name(f.path) for f in phase_files)
        raise BIDSInputError(f"phase images without magnitude images: {names}; add the part-mag echoes")
    magnitude = by_echo(ctx, magnitude_files, "magnitude")
    echo_times = {path: sidecar_number(ctx, path, "EchoTime") for path in magnitude.values()}
    items = list(magnitude.items())
    for (index_a, path_a), (index_b, path_b) in zip(items, items[1:]):
        te_a, te_b = echo_times[path_a], echo_times[path_b]
        if abs(te_a - te_b) <= TIME_TOLERANCE:
            raise BIDSInputError(
                f"duplicate echo time {te_a:g} s: {ctx.name(path_a)} and {ctx.name(path_b)}; "
                "each echo needs its own EchoTime (fix the sidecars or remove the duplicate)"
            )
        if te_b < te_a:
            raise BIDSInputError(
                f"echo times decrease with the echo index: {ctx.name(path_a)} (echo {index_a}) has "
                f"{te_a:g} s, {ctx.name(path_b)} (echo {index_b}) has {te_b:g} s; renumber the echo- entities"
            )

    flips = {
        path: sidecar_number(ctx, path, "FlipAngle", required=require_flip, what=f" (required for {suffix})")
        for path in magnitude.values()
    }
    flip_angle = check_same(
        ctx,
        flips,
        "FlipAngle",
        "all echoes of one flip angle must share it; fix the sidecars",
        tolerance=ANGLE_TOLERANCE,
    )
    trs = {
        path: sidecar_number(
            ctx,
            path,
            "RepetitionTimeExcitation",
            fallback="RepetitionTime",
            required=require_tr,
            what=f" (required for {suffix})",
        )
        for path in magnitude.values()
    }
    repetition_time = check_same(
        ctx, trs, "TR", "all echoes of one series must share it; fix the sidecars", tolerance=TIME_TOLERANCE
    )

    phase = None
    scale = None
    if phase_files:
        phase_by_echo = by_echo(ctx, phase_files, "phase")
        if set(phase_by_echo) != set(magnitude):
            raise BIDSInputError(
                f"phase echoes {sorted(phase_by_echo)} do not match magnitude echoes {sorted(magnitude)} "
                f"(magnitude: {ctx.name(next(iter(magnitude.values())))}, phase: "
                f"{ctx.name(next(iter(phase_by_echo.values())))}); provide a phase image for every "
                "magnitude echo or none"
            )
        for index, phase_path in phase_by_echo.items():
            magnitude_path = magnitude[index]
            te = sidecar_number(ctx, phase_path, "EchoTime", required=False)
            if te is not None and abs(te - echo_times[magnitude_path]) > TIME_TOLERANCE:
                raise BIDSInputError(
                    f"phase echo {ctx.name(phase_path)} has EchoTime {te:g} s but its magnitude "
                    f"{ctx.name(magnitude_path)} has {echo_times[magnitude_path]:g} s; fix the sidecars"
                )
        phase = tuple(phase_by_echo[index] for index in magnitude)
        scale = phase_scale(ctx, phase[0])

    first = next(iter(magnitude.values()))
    return EchoSeries(
        magnitude=tuple(magnitude.values()),
        phase=phase,
        echo_times=tuple(echo_times[path] for path in magnitude.values()),
        flip_angle=flip_angle,
        repetition_time=repetition_time,
        phase_scale=scale,
        metadata=dict(ctx.metadata(first)),
    )


@dataclass(frozen=True)
class MPMSeries:
    """A multi-parameter-mapping collection split into what the maps use.

    Attributes
    ----------
    mt_off : tuple of EchoSeries
        The ``mt-off`` contrasts (PDw, T1w) sorted by flip angle: the spoiled GRE at several flip
        angles that R2*, R1, PD and QSM read as they read a VFA collection.
    mt_on : EchoSeries or None
        The MT-weighted contrast (``mt-on``); None when absent or unusable.
    mt_problem : str or None
        Why a present ``mt-on`` contrast cannot be used (names the file and the fix); the ``mt-off``
        contrasts are usable all the same.
    """

    mt_off: tuple
    mt_on: EchoSeries | None = None
    mt_problem: str | None = None


def mpm_series(ctx, files):
    """Check an ``MPM`` collection (hMRI layout) and split it into its mt-off and mt-on contrasts.

    The BIDS ``MPM`` suffix requires the ``flip`` and ``mt`` entities; hMRI-style datasets also
    name the contrast with ``acq-PDw`` / ``acq-T1w`` / ``acq-MTw``. Each (acq, flip, mt) group is one
    multi-echo series; its echoes must be numbered 1 to n without gaps.

    Parameters
    ----------
    ctx : QueryContext
    files : list of IndexedFile
        All ``anat/*_MPM`` images of one subject/session.

    Returns
    -------
    MPMSeries

    Raises
    ------
    BIDSInputError
        When the mt-off contrasts are unusable (fewer than two flip angles, missing ``mt`` entity,
        missing echoes, other TRs ...). A broken mt-on contrast only sets ``mt_problem``.
    """
    for key, name in (("run", "run"), ("reconstruction", "rec")):
        labels = sorted({str(entity(f, key)) for f in files if entity(f, key) is not None})
        if labels:
            raise BIDSInputError(
                f"MPM images with {name}- labels ({', '.join(ctx.name(f.path) for f in files[:2])} ...); keep one "
                "MPM collection per subject/session (move the other runs to sourcedata/ or another dataset)"
            )
    groups = {}
    for bids_file in files:
        mt = entity(bids_file, "mt")
        if mt not in ("on", "off"):
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: an MPM image needs the mt-on or mt-off entity (BIDS requires it); "
                "rename it, e.g. *_acq-MTw_flip-1_mt-on_echo-1_part-mag_MPM"
            )
        if entity(bids_file, "flip") is None:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: an MPM image needs the flip- entity (BIDS requires it); rename it, "
                "e.g. *_acq-PDw_flip-1_mt-off_echo-1_part-mag_MPM"
            )
        key = (str(entity(bids_file, "acquisition") or ""), str(entity(bids_file, "flip")), mt)
        groups.setdefault(key, []).append(bids_file)

    def build(group):
        series = _echo_series(ctx, group, suffix="MPM", require_flip=True, require_tr=True)
        _check_echo_numbers(ctx, group)
        return series

    off_groups = [group for (_, _, mt), group in sorted(groups.items()) if mt == "off"]
    on_groups = [group for (_, _, mt), group in sorted(groups.items()) if mt == "on"]
    if not off_groups:
        raise BIDSInputError(
            f"MPM collection without mt-off images ({ctx.name(files[0].path)} ...): R1, PD and R2* need the "
            "PD- and T1-weighted contrasts (*_acq-PDw_flip-1_mt-off_*_MPM, *_acq-T1w_flip-2_mt-off_*_MPM)"
        )
    mt_off = sorted_by_flip_angle(ctx, [build(group) for group in off_groups], "MPM mt-off")
    check_same(
        ctx,
        {s.magnitude[0]: s.repetition_time for s in mt_off},
        "TR",
        "the PD- and T1-weighted (mt-off) contrasts of an MPM collection must share one TR; fix the sidecars",
        tolerance=TIME_TOLERANCE,
    )
    check_grids(ctx, [p for s in mt_off for p in (*s.magnitude, *(s.phase or ()))], "MPM mt-off")

    mt_on, problem = None, None
    try:
        if len(on_groups) > 1:
            listing = ", ".join(ctx.name(group[0].path) for group in on_groups)
            raise BIDSInputError(
                f"several MT-weighted (mt-on) series in one MPM collection ({listing}); MTsat takes one: keep "
                "one acq-/flip- group with mt-on (move the others out of the dataset)"
            )
        if on_groups:
            candidate = build(on_groups[0])
            check_grids(
                ctx,
                [mt_off[0].magnitude[0], *candidate.magnitude, *(candidate.phase or ())],
                "MPM (mt-on with mt-off)",
            )
            mt_on = candidate
    except BIDSInputError as error:
        problem = str(error)
    return MPMSeries(mt_off=tuple(mt_off), mt_on=mt_on, mt_problem=problem)


def _check_echo_numbers(ctx, files):
    """The echo- indices of one MPM series must run 1..n: a gap is an echo lost in the export."""
    numbers = sorted({int(entity(f, "echo")) for f in files if entity(f, "echo") is not None})
    if numbers and numbers != list(range(1, len(numbers) + 1)):
        missing = sorted(set(range(1, max(numbers) + 1)) - set(numbers))
        raise BIDSInputError(
            f"echo(es) {', '.join(map(str, missing))} missing from the MPM series of {ctx.name(files[0].path)} "
            f"(echoes found: {', '.join(map(str, numbers))}); export every echo, or renumber the echo- entities"
        )
