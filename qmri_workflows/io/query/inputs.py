"""One subject's qMRI inputs: what :func:`collect_inputs` returns and how it checks each collection."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BIDSInputError
from .bssfp import bssfp_series, says_bssfp, sequence_kind
from .derivatives import checked_file, find_derivatives
from .fieldmaps import AFIPair, DAMPair, ReceivePair, TFLMap, afi_pair, dam_pair, receive_pair, tfl_map
from .gre import gre_series, mpm_series
from .layout import QueryContext, select_images, strip_prefix, subject_images, subject_sessions
from .metadata import FIELD_TOLERANCE, check_same, sidecar_number
from .problems import (
    AFI,
    BSSFP,
    COLLECTIONS,
    DAM,
    DERIVATIVE_COLLECTIONS,
    GRE,
    MT,
    RECEIVE,
    TB1MAP,
    TFL,
    CollectionProblem,
)

__all__ = ["UNSUPPORTED_TRANSMIT_SUFFIXES", "SubjectInputs", "collect_inputs"]

UNSUPPORTED_TRANSMIT_SUFFIXES = ("TB1EPI", "TB1RFM", "TB1SRGE")
"""Raw ``fmap`` transmit-field collections the package cannot process yet (it reads ``TB1AFI`` and
``TB1DAM`` pairs, the Siemens ``TB1TFL`` map and pre-computed ``TB1map`` images); they are listed in
:attr:`SubjectInputs.unsupported_transmit` so R1 can say why it runs without B1+."""

LOGGER = logging.getLogger("qmri_workflows.io")


@dataclass(frozen=True)
class SubjectInputs:
    """Everything the pipeline can use for one subject (and session).

    Attributes
    ----------
    subject, session : str, str or None
        Labels without ``sub-``/``ses-``.
    gre : tuple of EchoSeries
        Spoiled multi-echo GRE sorted by flip angle; empty if absent or unusable. For an ``MPM``
        collection: its mt-off contrasts (PDw, T1w).
    gre_suffix : {"VFA", "MPM", "MEGRE"} or None
    mt : EchoSeries or None
        The MT-weighted (``mt-on``) contrast of an ``MPM`` collection.
    bssfp : tuple of BSSFPSeries
    afi : AFIPair or None
    dam : DAMPair or None
        Double-angle pair (``TB1DAM``).
    tfl : TFLMap or None
        Siemens ``tfl_b1map`` (``TB1TFL``) with its nominal preparation angle.
    receive : ReceivePair or None
    field_strength : float or None
        MagneticFieldStrength (T) shared by the usable collections.
    notes : tuple of str
        Things worth knowing that need no action (phase rescaling, ignored files).
    problems : tuple of CollectionProblem
        One per collection that is present but unusable (left out of the fields above).
    derivatives : dict
        {collection: DerivativeFile} for :data:`TB1MAP`, :data:`DSEG`, :data:`LESION_MASK`,
        :data:`BRAIN_MASK` found in the ``--derivatives`` datasets (a TB1map also in the raw
        ``fmap``: its ``origin`` says which).
    unsupported_transmit : tuple of str
        Dataset-relative names of raw transmit-field images of a kind the package cannot process
        (:data:`UNSUPPORTED_TRANSMIT_SUFFIXES`: EPI, TFL ...); a note says so.
    """

    subject: str
    session: str | None
    gre: tuple = ()
    gre_suffix: str | None = None
    mt: object = None
    bssfp: tuple = ()
    afi: AFIPair | None = None
    dam: DAMPair | None = None
    tfl: TFLMap | None = None
    receive: ReceivePair | None = None
    field_strength: float | None = None
    notes: tuple = ()
    problems: tuple = ()
    derivatives: dict = field(default_factory=dict, hash=False)
    unsupported_transmit: tuple = ()

    def has(self, collection):
        """Whether ``collection`` (e.g. :data:`GRE`, :data:`TB1MAP`) is present and usable."""
        _known(collection)
        if collection in DERIVATIVE_COLLECTIONS:
            return collection in self.derivatives
        value = {
            GRE: self.gre,
            MT: self.mt,
            BSSFP: self.bssfp,
            AFI: self.afi,
            DAM: self.dam,
            TFL: self.tfl,
            RECEIVE: self.receive,
        }[collection]
        return bool(value)

    def problem(self, collection):
        """The :class:`CollectionProblem` of ``collection``, or None if it has none."""
        _known(collection)
        return next((p for p in self.problems if p.collection == collection), None)

    def describe(self):
        """Human-readable summary (one line per collection, then the problems)."""
        label = f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")
        lines = [f"{label}:"]
        if self.gre:
            lines.append(f"  {self.gre_suffix}: {len(self.gre)} flip angle(s)")
            for series in self.gre:
                flip = "n/a" if series.flip_angle is None else f"{series.flip_angle:g} deg"
                tr = "n/a" if series.repetition_time is None else f"{series.repetition_time * 1e3:g} ms"
                tes = ", ".join(f"{te * 1e3:g}" for te in series.echo_times)
                phase = "with phase" if series.phase else "magnitude only"
                lines.append(f"    flip {flip}, TR {tr}, {len(series.echo_times)} echo(es) TE [{tes}] ms, {phase}")
        else:
            lines.append("  no multi-echo GRE (VFA/MPM/MEGRE)")
        if self.mt:
            lines.append(
                f"  MT-weighted (MPM mt-on): flip {self.mt.flip_angle:g} deg, TR {self.mt.repetition_time * 1e3:g} ms, "
                f"{len(self.mt.echo_times)} echo(es)"
            )
        for series in self.bssfp:
            increments = ", ".join(f"{inc:g}" for inc in series.phase_increments)
            lines.append(
                f"  bSSFP: flip {series.flip_angle:g} deg, TR {series.repetition_time * 1e3:g} ms, "
                f"phase increments [{increments}] deg" + (", with phase" if series.phase else "")
            )
        if self.afi:
            lines.append(
                f"  AFI: flip {self.afi.flip_angle:g} deg, TR1 {self.afi.tr1 * 1e3:g} ms, TR2 {self.afi.tr2 * 1e3:g} ms"
            )
        if self.dam:
            angles = "/".join(f"{angle:g}" for angle in self.dam.flip_angles)
            lines.append(f"  double-angle pair: flip {angles} deg, TR {self.dam.repetition_time * 1e3:g} ms")
        if self.tfl:
            lines.append(f"  {self.tfl.scale_text}")
        if self.receive:
            lines.append("  receive field: head/body coil pair")
        for collection, found in self.derivatives.items():
            lines.append(f"  {collection} (derivative): {found.path}")
        if self.field_strength:
            lines.append(f"  field strength {self.field_strength:g} T")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.extend(f"  {problem.collection} unusable: {problem.message}" for problem in self.problems)
        return "\n".join(lines)


def _known(collection):
    if collection not in COLLECTIONS:
        raise ValueError(f"unknown input collection {collection!r}; choose from {', '.join(COLLECTIONS)}")


def collect_inputs(layout, subject, session=None, *, derivatives=(), tb1tfl_prep_angle=None):
    """Collect and check one subject's qMRI inputs, each collection on its own.

    Parameters
    ----------
    layout : bids.BIDSLayout
        From :func:`open_layout`.
    subject : str
        Subject label (``sub-`` prefix optional).
    session : str, optional
        Session label (``ses-`` prefix optional); required if the subject has sessions.
    derivatives : sequence of bids.BIDSLayout, optional
        From :func:`open_derivatives`; searched for a TB1map, a segmentation, a lesion mask and a
        brain mask of the same subject and session.
    tb1tfl_prep_angle : float, optional
        Nominal preparation angle (deg) of a Siemens ``tfl_b1map`` (``--tb1tfl-prep-angle``); without
        it the sidecar's ``FlipAngle`` is used when it is one (see :func:`~.fieldmaps.tfl_map`).

    Returns
    -------
    SubjectInputs
        GRE series sorted by flip angle (``gre_suffix`` "VFA" if spoiled VFA files exist, else "MPM"
        for an ``MPM`` collection, whose mt-on contrast goes to ``mt``, else "MEGRE", else None),
        bSSFP series, AFI and receive pairs, derivative inputs, field strength, notes
        (e.g. phase rescaling), and one :class:`CollectionProblem` per collection that is present but
        unusable (missing or inconsistent metadata, images off the series' grid, incomplete pairs,
        another scanner's field strength ...), which is then left out. A subject without any GRE or
        bSSFP image gets a :data:`GRE` problem saying so.

    Raises
    ------
    BIDSInputError
        Only when the subject or session is absent, or the subject has sessions and none is given.
    """
    subject = strip_prefix(subject, "sub-")
    session = strip_prefix(session, "ses-") if session is not None else None
    _check_subject(layout, subject, session)
    images = subject_images(layout, subject, session)
    ctx = QueryContext(layout, images)
    problems = {}

    def attempt(collection, build, *args):
        """``build(*args)``, or None with the problem recorded if it raises BIDSInputError."""
        try:
            return build(*args)
        except BIDSInputError as error:
            problems.setdefault(collection, CollectionProblem(collection, str(error)))
            return None

    spoiled, bssfp_files = [], []
    for bids_file in select_images(images, suffix="VFA", datatype="anat"):
        kind = attempt(BSSFP if says_bssfp(ctx, bids_file) else GRE, sequence_kind, ctx, bids_file)
        if kind is not None:
            (bssfp_files if kind == "bssfp" else spoiled).append(bids_file)
    megre_files = select_images(images, suffix="MEGRE", datatype="anat")
    mpm_files = select_images(images, suffix="MPM", datatype="anat")

    collected = dict.fromkeys((GRE, BSSFP, AFI, DAM, TFL, RECEIVE))
    gre_suffix = None
    mt_series = None
    ignored = [name for name, found in (("MPM", mpm_files), ("MEGRE", megre_files)) if found]
    if mpm_files and not spoiled and GRE not in problems:
        gre_suffix = "MPM"
        mpm = attempt(GRE, mpm_series, ctx, mpm_files)
        if mpm is not None:
            collected[GRE] = mpm.mt_off
            mt_series = mpm.mt_on
            if mpm.mt_problem:
                problems[MT] = CollectionProblem(MT, mpm.mt_problem)
        if megre_files:
            ctx.notes.append(f"MEGRE images ignored ({ctx.name(megre_files[0].path)} ...): the MPM collection is used")
            LOGGER.warning(ctx.notes[-1])
    elif spoiled or GRE in problems:
        gre_suffix = "VFA"
        if GRE not in problems:
            collected[GRE] = attempt(GRE, gre_series, ctx, spoiled, "VFA")
        if megre_files or mpm_files:
            ignored_listing = " and ".join(ignored)
            first = (mpm_files or megre_files)[0]
            ctx.notes.append(
                f"{ignored_listing} images ignored ({ctx.name(first.path)} ...): the VFA collection is used"
                + (
                    f" (it is unusable: fix it, or move it out of the dataset to use the {ignored[0]})"
                    if GRE in problems
                    else ""
                )
            )
            LOGGER.warning(ctx.notes[-1])
    elif megre_files:
        gre_suffix = "MEGRE"
        collected[GRE] = attempt(GRE, gre_series, ctx, megre_files, "MEGRE")
    if bssfp_files and BSSFP not in problems:
        collected[BSSFP] = attempt(BSSFP, bssfp_series, ctx, bssfp_files)
    collected[AFI] = attempt(AFI, afi_pair, ctx, select_images(images, suffix="TB1AFI", datatype="fmap"))
    collected[DAM] = attempt(DAM, dam_pair, ctx, select_images(images, suffix="TB1DAM", datatype="fmap"))
    collected[TFL] = attempt(
        TFL, tfl_map, ctx, select_images(images, suffix="TB1TFL", datatype="fmap"), tb1tfl_prep_angle
    )
    collected[RECEIVE] = attempt(RECEIVE, receive_pair, ctx, select_images(images, suffix="RB1COR", datatype="fmap"))
    field_strength = _field_strength(ctx, collected, problems)
    unsupported_transmit = tuple(
        ctx.name(bids_file.path)
        for bids_file in select_images(images, suffix=list(UNSUPPORTED_TRANSMIT_SUFFIXES), datatype="fmap")
    )
    if unsupported_transmit:
        ctx.notes.append(
            f"transmit-field images of a kind this version cannot process ({', '.join(unsupported_transmit[:3])}"
            + (" ..." if len(unsupported_transmit) > 3 else "")
            + "): only an AFI pair (fmap/*_acq-tr1_TB1AFI, *_acq-tr2_TB1AFI), a double-angle pair "
            "(fmap/*_flip-<n>_TB1DAM), a Siemens tfl_b1map (fmap/*_acq-famp_TB1TFL) or a TB1map (fmap/*_TB1map, "
            "or given with --derivatives) corrects R1 for B1+"
        )
        LOGGER.warning(ctx.notes[-1])

    if not collected[GRE] and not collected[BSSFP] and GRE not in problems and BSSFP not in problems:
        listing = ", ".join(sorted({f.filename for f in images}))[:500] or "no images"
        problems[GRE] = CollectionProblem(
            GRE,
            (
                f"no qMRI inputs for sub-{subject}" + (f" ses-{session}" if session else "") + f" in {ctx.root}: "
                "expected anat/*_VFA, anat/*_MPM or anat/*_MEGRE images (see the documentation, 'Raw BIDS layout'); "
                f"found: {listing}"
            ),
            missing=True,
        )

    found = {}
    if derivatives:
        found, derivative_problems, derivative_notes = find_derivatives(derivatives, subject, session)
        problems.update((problem.collection, problem) for problem in derivative_problems)
        ctx.notes.extend(derivative_notes)
    _raw_tb1map(ctx, select_images(images, suffix="TB1map", datatype="fmap"), found, problems)

    return SubjectInputs(
        subject=subject,
        session=session,
        gre=collected[GRE] or (),
        gre_suffix=gre_suffix if collected[GRE] else None,
        mt=mt_series if collected[GRE] else None,
        bssfp=collected[BSSFP] or (),
        afi=collected[AFI],
        dam=collected[DAM],
        tfl=collected[TFL],
        receive=collected[RECEIVE],
        field_strength=field_strength,
        notes=tuple(ctx.notes),
        problems=tuple(problems[c] for c in COLLECTIONS if c in problems),
        derivatives=found,
        unsupported_transmit=unsupported_transmit,
    )


def _raw_tb1map(ctx, files, found, problems):
    """A pre-computed ``fmap/*_TB1map`` of the raw dataset (a scanner's or a site's B1+ map), checked
    like one given with ``--derivatives``, which wins over it; ``found`` and ``problems`` are
    updated in place."""
    if not files:
        return
    names = ", ".join(ctx.name(bids_file.path) for bids_file in files)
    if TB1MAP in found or TB1MAP in problems:
        ctx.notes.append(f"{names} not used: the TB1map given with --derivatives is")
        LOGGER.info(ctx.notes[-1])
        return
    if len(files) > 1:
        problems[TB1MAP] = CollectionProblem(
            TB1MAP,
            f"several pre-computed B1+ maps in fmap ({names}); keep one, or give the one to use with --derivatives",
        )
        return
    try:
        found[TB1MAP], note = checked_file(files[0].path, files[0].metadata, TB1MAP, origin="raw")
    except BIDSInputError as error:
        problems[TB1MAP] = CollectionProblem(TB1MAP, str(error))
        return
    if note:
        ctx.notes.append(note)
        LOGGER.info(note)


def _check_subject(layout, subject, session):
    """Raise BIDSInputError if the subject or session is absent or the session ambiguous."""
    root = Path(layout.root)
    sessions_of = subject_sessions(layout)
    if subject not in sessions_of:
        raise BIDSInputError(
            f"participant sub-{subject} not found in {root}; available: "
            + ", ".join("sub-" + s for s in sorted(sessions_of))
        )
    sessions = sessions_of[subject]
    if session is None and sessions:
        raise BIDSInputError(
            f"sub-{subject} in {root} has sessions ({', '.join('ses-' + s for s in sessions)}); "
            "choose one (--session-label)"
        )
    if session is not None and session not in sessions:
        raise BIDSInputError(
            f"session ses-{session} not found for sub-{subject} in {root}; available: "
            + (", ".join("ses-" + s for s in sessions) or "none")
        )


def _collection_files(collection, value):
    """The images of a collected value whose sidecars state the field strength."""
    if not value:
        return []
    if collection in (GRE, BSSFP):
        return [series.magnitude[0] for series in value]
    if collection == AFI:
        return [value.tr1_file, value.tr2_file]
    if collection == DAM:
        return [value.flip1_file, value.flip2_file]
    if collection == TFL:
        return [value.famp_file] + ([value.anat_file] if value.anat_file else [])
    return [value.head_file, value.body_file]


def _field_strength(ctx, collected, problems):
    """The field strength (T) of the first collection stating one; a collection disagreeing is dropped.

    ``collected`` ({collection: value}) and ``problems`` ({collection: CollectionProblem}) are updated
    in place: a collection whose images disagree among themselves or with an earlier collection
    becomes None and gets a problem.
    """
    reference = None  # (path, tesla)
    for collection, value in collected.items():
        paths = _collection_files(collection, value)
        try:
            values = {path: sidecar_number(ctx, path, "MagneticFieldStrength", required=False) for path in paths}
            tesla = check_same(
                ctx,
                values,
                "MagneticFieldStrength",
                "all images of a subject must come from one scanner; fix the sidecars",
                tolerance=FIELD_TOLERANCE,
            )
            if tesla is None:
                continue
            path = next(p for p, v in values.items() if v is not None)
            if reference is not None and abs(tesla - reference[1]) > FIELD_TOLERANCE:
                raise BIDSInputError(
                    f"{ctx.name(path)} states MagneticFieldStrength {tesla:g} T but {ctx.name(reference[0])} "
                    f"states {reference[1]:g} T; all images of a subject must come from one scanner: fix the "
                    f"sidecars, or move the {collection} images of the other scanner out of the dataset"
                )
        except BIDSInputError as error:
            problems[collection] = CollectionProblem(collection, str(error))
            collected[collection] = None
            continue
        if reference is None:
            reference = (path, tesla)
    return reference[1] if reference else None
