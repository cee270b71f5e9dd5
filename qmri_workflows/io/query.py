"""Find a subject's qMRI inputs in a raw BIDS dataset (pybids) and check them.

The layout read here is described in ``docs/architecture.rst`` ("Raw BIDS layout"):

* spoiled multi-echo GRE at several flip angles: ``anat/*_echo-<e>_flip-<f>_part-<mag|phase>_VFA``;
* plain multi-echo GRE: ``anat/*_echo-<e>_part-<mag|phase>_MEGRE``;
* phase-cycled bSSFP: ``anat/*_acq-bssfp<inc>_flip-<f>_part-<mag|phase>_VFA`` with
  ``PulseSequenceType`` "bSSFP" (project convention);
* AFI: ``fmap/*_acq-tr1_TB1AFI`` / ``fmap/*_acq-tr2_TB1AFI``;
* receive-field pair: ``fmap/*_acq-head<contrast>_RB1COR`` / ``fmap/*_acq-body<contrast>_RB1COR``.

Everything wrong with the inputs raises one :class:`BIDSInputError` whose message names the file(s)
and the fix. Only image headers are read, except for the first phase echo of a series whose sidecar
does not state the phase units (its value range tells them, see :func:`phase_scale_from_values`).

Sidecars written by dcm2niix are accepted: ``RepetitionTime`` stands in for
``RepetitionTimeExcitation``, a missing ``PulseSequenceType`` means spoiled GRE, and metadata
inherited from dataset-level sidecars is merged by pybids.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BIDSInputError
from .images import GRID_TOLERANCE_MM, same_grid

__all__ = [
    "AFI",
    "BSSFP",
    "GRE",
    "RECEIVE",
    "AFIPair",
    "BIDSInputError",
    "BSSFPSeries",
    "EchoSeries",
    "ReceivePair",
    "SubjectInputs",
    "collect_inputs",
    "open_layout",
    "phase_scale_from_values",
    "select_participants",
]

LOGGER = logging.getLogger("qmri_workflows.io")

# Collection names (what a map family needs, see qmri_workflows.workflows.registry).
GRE = "gre"
BSSFP = "bssfp"
AFI = "afi"
RECEIVE = "receive"

IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
IGNORED_FOLDERS = ["derivatives", "sourcedata", "code", "stimuli", "models"]

_SPOILED_SEQUENCE_TYPES = frozenset({"spgr", "flash", "gre", "spoiled gre", "spoiled gradient echo", "t1ffe",
                                     "spoiled grass", "fast low angle shot"})
_BSSFP_SEQUENCE_TYPES = frozenset({"bssfp", "ssfp", "truefisp", "fiesta", "balanced ssfp", "balanced ffe",
                                   "b-ffe", "bffe"})
_BSSFP_ACQ = re.compile(r"^bssfp(\d{3})$", re.IGNORECASE)
_TIME_TOLERANCE = 1e-6  # s; sidecars store times with ~microsecond precision
_ANGLE_TOLERANCE = 1e-3  # deg
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


# --------------------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------------------
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


@dataclass(frozen=True)
class SubjectInputs:
    """Everything the pipeline uses for one subject (and session)."""

    subject: str
    session: str | None
    gre: tuple = ()
    gre_suffix: str | None = None
    bssfp: tuple = ()
    afi: AFIPair | None = None
    receive: ReceivePair | None = None
    field_strength: float | None = None
    notes: tuple = ()

    def has(self, collection):
        """Whether the collection named ``collection`` ("gre", "bssfp", "afi", "receive") is usable."""
        return bool({"gre": self.gre, "bssfp": self.bssfp, "afi": self.afi,
                     "receive": self.receive}.get(collection))

    def problem(self, collection):  # noqa: ARG002 - every problem still aborts the subject here
        """What is wrong with ``collection`` (None: nothing recorded)."""
        return None

    def describe(self):
        """Human-readable summary (one line per collection)."""
        label = f"sub-{self.subject}" + (f" ses-{self.session}" if self.session else "")
        lines = [f"{label}:"]
        if self.gre:
            lines.append(f"  {self.gre_suffix}: {len(self.gre)} flip angle(s)")
            for series in self.gre:
                flip = "n/a" if series.flip_angle is None else f"{series.flip_angle:g} deg"
                tr = "n/a" if series.repetition_time is None else f"{series.repetition_time * 1e3:g} ms"
                tes = ", ".join(f"{te * 1e3:g}" for te in series.echo_times)
                phase = "with phase" if series.phase else "magnitude only"
                lines.append(f"    flip {flip}, TR {tr}, {len(series.echo_times)} echo(es) "
                             f"TE [{tes}] ms, {phase}")
        else:
            lines.append("  no multi-echo GRE (VFA/MEGRE)")
        for series in self.bssfp:
            increments = ", ".join(f"{inc:g}" for inc in series.phase_increments)
            lines.append(f"  bSSFP: flip {series.flip_angle:g} deg, TR {series.repetition_time * 1e3:g} ms, "
                         f"phase increments [{increments}] deg" + (", with phase" if series.phase else ""))
        if self.afi:
            lines.append(f"  AFI: flip {self.afi.flip_angle:g} deg, TR1 {self.afi.tr1 * 1e3:g} ms, "
                         f"TR2 {self.afi.tr2 * 1e3:g} ms")
        if self.receive:
            lines.append("  receive field: head/body coil pair")
        if self.field_strength:
            lines.append(f"  field strength {self.field_strength:g} T")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# layout and participants
# --------------------------------------------------------------------------------------------------
def open_layout(bids_dir, *, database_path=None, validate=False):
    """Index a raw BIDS dataset with pybids without writing into it.

    Parameters
    ----------
    bids_dir : str or Path
        Dataset root (holds ``dataset_description.json``).
    database_path : str or Path, optional
        Folder for pybids' SQLite index (e.g. in the work directory); in memory when None. It must
        not be inside ``bids_dir``. Do not share one between parallel jobs.
    validate : bool, optional
        Let pybids skip files that are not BIDS (False indexes everything but ``derivatives``,
        ``sourcedata``, ``code`` and hidden files).

    Returns
    -------
    bids.BIDSLayout

    Raises
    ------
    BIDSInputError
        If ``bids_dir`` is not a dataset root or ``database_path`` lies inside it.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    root = Path(bids_dir).resolve()
    if not root.is_dir():
        raise BIDSInputError(f"BIDS dataset {root} does not exist or is not a folder")
    if not (root / "dataset_description.json").is_file():
        raise BIDSInputError(
            f"{root} is not a BIDS dataset root: {root / 'dataset_description.json'} is missing "
            "(give the folder that holds dataset_description.json and the sub-* folders)")
    if database_path is not None:
        database = Path(database_path).resolve()
        if database == root or root in database.parents:
            raise BIDSInputError(
                f"the pybids database {database} would be written inside the input dataset {root}; "
                "put it in the work directory")
        database_path = str(database)
    indexer = BIDSLayoutIndexer(validate=validate, ignore=[*IGNORED_FOLDERS, re.compile(r"/\.")])
    try:
        return BIDSLayout(str(root), database_path=database_path, indexer=indexer)
    except Exception as error:  # pybids raises its own types (BIDSValidationError, ...)
        raise BIDSInputError(f"pybids cannot index {root}: {error}") from error


def _strip(label, prefix):
    label = str(label).strip()
    return label[len(prefix):] if label.startswith(prefix) else label


def select_participants(layout, participant_labels=None, session_labels=None):
    """Return the (subject, session) pairs to process.

    Parameters
    ----------
    layout : bids.BIDSLayout
    participant_labels : sequence of str, optional
        Subjects with or without ``sub-``; all subjects when None or empty.
    session_labels : sequence of str, optional
        Sessions with or without ``ses-``; all sessions when None or empty.

    Returns
    -------
    list of (str, str or None)
        Sorted pairs; session is None for subjects without sessions.

    Raises
    ------
    BIDSInputError
        If a requested subject or session is absent (the message lists the available labels), or the
        dataset has no subjects.
    """
    root = layout.root
    available = sorted(layout.get_subjects())
    if not available:
        raise BIDSInputError(f"no sub-* folders with data found in {root}")
    if participant_labels:
        wanted = sorted({_strip(label, "sub-") for label in participant_labels})
        missing = [label for label in wanted if label not in available]
        if missing:
            raise BIDSInputError(
                f"participant(s) {', '.join('sub-' + m for m in missing)} not found in {root}; "
                f"available: {', '.join('sub-' + a for a in available)}")
    else:
        wanted = available
    wanted_sessions = sorted({_strip(label, "ses-") for label in session_labels}) if session_labels else None

    pairs = []
    seen_sessions = set()
    for subject in wanted:
        sessions = sorted(layout.get_sessions(subject=subject))
        seen_sessions.update(sessions)
        if not sessions:
            if wanted_sessions is None:
                pairs.append((subject, None))
            continue
        for session in sessions:
            if wanted_sessions is None or session in wanted_sessions:
                pairs.append((subject, session))
    if wanted_sessions is not None:
        missing = [s for s in wanted_sessions if s not in seen_sessions]
        if missing:
            listing = ", ".join("ses-" + s for s in sorted(seen_sessions)) or "none (no ses-* folders)"
            raise BIDSInputError(
                f"session(s) {', '.join('ses-' + m for m in missing)} not found for the selected "
                f"participants in {root}; available: {listing}")
    return pairs


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
class _Context:
    """What a query needs besides the layout: the dataset root for short names, notes collected."""

    def __init__(self, layout):
        self.layout = layout
        self.root = Path(layout.root)
        self.notes = []
        self._metadata = {}

    def name(self, path):
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def metadata(self, path):
        if path not in self._metadata:
            self._metadata[path] = dict(self.layout.get_metadata(path))
        return self._metadata[path]


def _number(ctx, path, metadata, key, *, fallback=None, required=True, what=""):
    """Read a positive finite number from the sidecar, optionally from a fallback key."""
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
            f"{_sidecar_name(ctx, path)} ({_UNITS_HINT.get(key, '')})")
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


_UNITS_HINT = {
    "EchoTime": "seconds",
    "FlipAngle": "degrees",
    "RepetitionTimeExcitation": "seconds",
    "PhaseCyclingIncrement": "degrees",
}
_SANITY_LIMITS = {
    "EchoTime": (1.0, "s is implausible for a gradient echo: BIDS times are in seconds, not ms"),
    "RepetitionTimeExcitation": (10.0, "s is implausible for a gradient echo: BIDS times are in seconds, not ms"),
    "FlipAngle": (180.0, "deg is not a valid excitation flip angle (degrees, 0 < FA <= 180)"),
}


def _sidecar_name(ctx, path):
    name = ctx.name(path)
    for ext in IMAGE_EXTENSIONS[::-1]:
        if name.endswith(ext):
            return name[: -len(ext)] + ".json"
    return name + ".json"


def _get(layout, subject, session, **filters):
    """Image files (BIDSFile objects) of one subject/session matching ``filters``, sorted by path."""
    from bids.layout import Query

    files = layout.get(subject=subject, session=session if session is not None else Query.NONE,
                       extension=IMAGE_EXTENSIONS, **filters)
    return sorted(files, key=lambda f: f.path)


def _entity(bids_file, key):
    return bids_file.get_entities().get(key)


def _check_same(ctx, values, label, fix):
    """Raise if the numbers in ``values`` ({path: number}) differ by more than the tolerance."""
    items = [(path, value) for path, value in values.items() if value is not None]
    if not items:
        return None
    reference_path, reference = items[0]
    tolerance = _TIME_TOLERANCE if "time" in label.lower() or label == "TR" else _ANGLE_TOLERANCE
    for path, value in items[1:]:
        if abs(value - reference) > tolerance:
            raise BIDSInputError(
                f"inconsistent {label} within one series: {ctx.name(reference_path)} has {reference:g}, "
                f"{ctx.name(path)} has {value:g}; {fix}")
    return reference


def _check_grids(ctx, paths, what):
    """All ``paths`` must be single 3D volumes on the same grid (headers only)."""
    import nibabel as nib

    reference = None
    for path in paths:
        try:
            image = nib.load(path)
        except Exception as error:
            raise BIDSInputError(f"cannot read image {ctx.name(path)}: {error}") from error
        shape = image.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise BIDSInputError(
                f"{ctx.name(path)} has shape {shape}; one 3D volume per file is expected "
                "(split 4D series into one file per echo / flip angle / part)")
        if reference is None:
            reference = (path, shape, image.affine)
            continue
        if not same_grid(shape, image.affine, reference[1], reference[2], atol=GRID_TOLERANCE_MM):
            difference = np.abs(image.affine - reference[2]).max()
            raise BIDSInputError(
                f"the {what} images are not on one voxel grid: {ctx.name(path)} (shape {shape[:3]}) "
                f"differs from {ctx.name(reference[0])} (shape {reference[1][:3]}; largest affine "
                f"difference {difference:.3g} mm, tolerance {GRID_TOLERANCE_MM} mm); re-export the "
                "series from the scanner together or resample them onto one grid")


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
    raise BIDSInputError(
        f"cannot tell the units of {name}: values span [{minimum:g}, {maximum:g}]; convert it to "
        "radians or add \"Units\": \"rad\" to its sidecar")


def _phase_scale(ctx, path):
    """Phase scale of one phase image from its sidecar ``Units`` or, failing that, its values."""
    units = ctx.metadata(path).get("Units")
    unit = str(units).strip().lower() if units is not None else None
    if unit in ("rad", "radian", "radians"):
        return 1.0
    if unit in ("deg", "degree", "degrees"):
        return math.pi / 180
    if unit not in (None, "arbitrary", "a.u.", "au", ""):
        raise BIDSInputError(
            f"{ctx.name(path)}: unsupported phase \"Units\": {units!r} in {_sidecar_name(ctx, path)}; "
            "phase must be in \"rad\" (or \"deg\"), or unlabelled scanner integers")
    import nibabel as nib

    data = np.asanyarray(nib.load(path).dataobj)
    values = data[np.isfinite(data)] if data.dtype.kind == "f" else data.ravel()
    if values.size == 0:
        raise BIDSInputError(f"phase image {ctx.name(path)} holds no finite value")
    integer_valued = data.dtype.kind in "iu" or bool(np.all(values == np.round(values)))
    scale, description = phase_scale_from_values(
        float(values.min()), float(values.max()), integer_valued=integer_valued,
        name=f"phase image {ctx.name(path)}")
    if scale != 1.0:
        ctx.notes.append(
            f"phase of {ctx.name(path)} (sidecar Units: {units if units is not None else 'absent'}) read as "
            f"{description}; "
            f"multiplied by {scale:.6g} to get radians")
        LOGGER.info(ctx.notes[-1])
    return scale


def _split_parts(ctx, files):
    """Split files into magnitude (part-mag or no part) and phase; refuse real/imag."""
    magnitude, phase = [], []
    for bids_file in files:
        part = _entity(bids_file, "part")
        if part in (None, "mag"):
            magnitude.append(bids_file)
        elif part == "phase":
            phase.append(bids_file)
        else:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: part-{part} images are not supported; convert real/imaginary "
                "pairs to part-mag and part-phase")
    return magnitude, phase


def _by_echo(ctx, files, what):
    """{echo index: path}; files without an echo entity count as echo 1 (only one allowed)."""
    echoes = {}
    for bids_file in files:
        echo = _entity(bids_file, "echo")
        index = int(echo) if echo is not None else 1
        if index in echoes:
            raise BIDSInputError(
                f"two {what} files for echo {index}: {ctx.name(echoes[index])} and {ctx.name(bids_file.path)}; "
                "keep one (or give them different acq-/run- labels and remove the other from the dataset)")
        echoes[index] = bids_file.path
    return dict(sorted(echoes.items()))


def _echo_series(ctx, files, *, suffix, require_flip, require_tr):
    """Build one EchoSeries from the files of one flip angle."""
    magnitude_files, phase_files = _split_parts(ctx, files)
    if not magnitude_files:
        names = ", ".join(ctx.name(f.path) for f in phase_files)
        raise BIDSInputError(f"phase images without magnitude images: {names}; add the part-mag echoes")
    magnitude = _by_echo(ctx, magnitude_files, "magnitude")
    echo_times = {path: _number(ctx, path, ctx.metadata(path), "EchoTime") for path in magnitude.values()}
    times = [echo_times[path] for path in magnitude.values()]
    for (index_a, path_a), (index_b, path_b) in zip(list(magnitude.items()), list(magnitude.items())[1:]):
        te_a, te_b = echo_times[path_a], echo_times[path_b]
        if abs(te_a - te_b) <= _TIME_TOLERANCE:
            raise BIDSInputError(
                f"duplicate echo time {te_a:g} s: {ctx.name(path_a)} and {ctx.name(path_b)}; "
                "each echo needs its own EchoTime (fix the sidecars or remove the duplicate)")
        if te_b < te_a:
            raise BIDSInputError(
                f"echo times decrease with the echo index: {ctx.name(path_a)} (echo {index_a}) has "
                f"{te_a:g} s, {ctx.name(path_b)} (echo {index_b}) has {te_b:g} s; renumber the echo- entities")

    flips = {path: _number(ctx, path, ctx.metadata(path), "FlipAngle", required=require_flip,
                           what=f" (required for {suffix})") for path in magnitude.values()}
    flip_angle = _check_same(ctx, flips, "FlipAngle",
                             "all echoes of one flip angle must share it; fix the sidecars")
    trs = {path: _number(ctx, path, ctx.metadata(path), "RepetitionTimeExcitation",
                         fallback="RepetitionTime", required=require_tr, what=f" (required for {suffix})")
           for path in magnitude.values()}
    repetition_time = _check_same(ctx, trs, "TR", "all echoes of one series must share it; fix the sidecars")

    phase = None
    phase_scale = None
    if phase_files:
        phase_by_echo = _by_echo(ctx, phase_files, "phase")
        if set(phase_by_echo) != set(magnitude):
            raise BIDSInputError(
                f"phase echoes {sorted(phase_by_echo)} do not match magnitude echoes {sorted(magnitude)} "
                f"(magnitude: {ctx.name(next(iter(magnitude.values())))}, phase: "
                f"{ctx.name(next(iter(phase_by_echo.values())))}); provide a phase image for every "
                "magnitude echo or none")
        for index, phase_path in phase_by_echo.items():
            magnitude_path = magnitude[index]
            te = ctx.metadata(phase_path).get("EchoTime")
            if te is not None:
                te = _number(ctx, phase_path, ctx.metadata(phase_path), "EchoTime")
                if abs(te - echo_times[magnitude_path]) > _TIME_TOLERANCE:
                    raise BIDSInputError(
                        f"phase echo {ctx.name(phase_path)} has EchoTime {te:g} s but its magnitude "
                        f"{ctx.name(magnitude_path)} has {echo_times[magnitude_path]:g} s; fix the sidecars")
        phase = tuple(phase_by_echo[index] for index in magnitude)
        phase_scale = _phase_scale(ctx, phase[0])

    first = next(iter(magnitude.values()))
    return EchoSeries(
        magnitude=tuple(magnitude.values()),
        phase=phase,
        echo_times=tuple(times),
        flip_angle=flip_angle,
        repetition_time=repetition_time,
        phase_scale=phase_scale,
        metadata=dict(ctx.metadata(first)),
    )


def _sequence_kind(ctx, bids_file):
    """'spoiled' or 'bssfp' for a VFA file, from its acq label and PulseSequenceType."""
    acquisition = _entity(bids_file, "acquisition")
    sequence = ctx.metadata(bids_file.path).get("PulseSequenceType")
    sequence_key = str(sequence).strip().lower() if sequence is not None else None
    acq_says_bssfp = bool(acquisition and _BSSFP_ACQ.match(acquisition))
    if sequence_key in _BSSFP_SEQUENCE_TYPES:
        return "bssfp"
    if acq_says_bssfp:
        if sequence_key is not None:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: acq-{acquisition} marks a phase-cycled bSSFP image but "
                f"PulseSequenceType is {sequence!r}; set \"PulseSequenceType\": \"bSSFP\" in its sidecar")
        return "bssfp"
    if sequence_key is None or sequence_key in _SPOILED_SEQUENCE_TYPES:
        return "spoiled"
    raise BIDSInputError(
        f"{ctx.name(bids_file.path)}: PulseSequenceType {sequence!r} is neither a spoiled gradient echo "
        "(\"SPGR\") nor a balanced SSFP (\"bSSFP\"); fix the sidecar or move the file out of the dataset")


def _single_collection(ctx, files, suffix):
    """Refuse several acquisitions/runs/reconstructions of the same collection."""
    for key, entity in (("acquisition", "acq"), ("run", "run"), ("reconstruction", "rec")):
        labels = sorted({str(_entity(f, key)) for f in files if _entity(f, key) is not None})
        unlabelled = any(_entity(f, key) is None for f in files)
        if len(labels) + unlabelled > 1:
            example = {}
            for f in files:
                example.setdefault(_entity(f, key), f.path)
            listing = ", ".join(ctx.name(path) for path in example.values())
            raise BIDSInputError(
                f"several {suffix} collections differ in {entity}- ({listing}); keep one per subject/session "
                "(move the others to sourcedata/ or another dataset)")


def _gre_series(ctx, files, suffix):
    _single_collection(ctx, files, suffix)
    groups = {}
    for bids_file in files:
        groups.setdefault(_entity(bids_file, "flip"), []).append(bids_file)
    if suffix == "MEGRE" and len(groups) > 1:
        raise BIDSInputError(
            f"MEGRE files carry several flip- labels ({sorted(map(str, groups))}); a multi-echo GRE at "
            "several flip angles is a VFA collection: rename them *_VFA")
    require = suffix == "VFA"
    series = [_echo_series(ctx, group, suffix=suffix, require_flip=require, require_tr=require)
              for _, group in sorted(groups.items(), key=lambda item: str(item[0]))]
    if suffix == "VFA":
        series.sort(key=lambda s: s.flip_angle)
        for a, b in zip(series, series[1:]):
            if abs(a.flip_angle - b.flip_angle) <= _ANGLE_TOLERANCE:
                raise BIDSInputError(
                    f"two VFA flip- groups have the same FlipAngle {a.flip_angle:g} deg: {ctx.name(a.magnitude[0])} "
                    f"and {ctx.name(b.magnitude[0])}; fix the FlipAngle in the sidecars or the flip- labels")
        _check_same(ctx, {s.magnitude[0]: s.repetition_time for s in series}, "TR",
                    "the flip angles of a VFA collection must share one TR; fix the sidecars")
    paths = [p for s in series for p in (*s.magnitude, *(s.phase or ()))]
    _check_grids(ctx, paths, suffix)
    return tuple(series)


def _increment(ctx, bids_file):
    acquisition = _entity(bids_file, "acquisition")
    match = _BSSFP_ACQ.match(acquisition or "")
    metadata = ctx.metadata(bids_file.path)
    from_sidecar = metadata.get("PhaseCyclingIncrement")
    if match is None and from_sidecar is None:
        raise BIDSInputError(
            f"{ctx.name(bids_file.path)}: bSSFP image without its RF phase-cycling increment; name it "
            "acq-bssfp<increment, 3 digits> (e.g. acq-bssfp090) and add \"PhaseCyclingIncrement\" (deg)")
    if from_sidecar is not None:
        try:
            value = float(from_sidecar)
        except (TypeError, ValueError):
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: PhaseCyclingIncrement must be a number, got {from_sidecar!r}") from None
        if match is not None and abs(value - float(match.group(1))) > _ANGLE_TOLERANCE:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: acq-{acquisition} says {int(match.group(1))} deg but the sidecar "
                f"PhaseCyclingIncrement is {value:g} deg; make them agree")
        return value
    return float(match.group(1))


def _bssfp_series(ctx, files):
    for key, entity in (("run", "run"), ("reconstruction", "rec"), ("echo", "echo")):
        labels = {_entity(f, key) for f in files}
        if len(labels) > 1:
            raise BIDSInputError(
                f"bSSFP images differ in {entity}- ({', '.join(sorted(ctx.name(f.path) for f in files)[:4])} ...); "
                "keep one bSSFP collection per subject/session with one image per increment, flip angle and part")
    groups = {}
    for bids_file in files:
        groups.setdefault(_entity(bids_file, "flip"), []).append(bids_file)
    series = []
    for _, group in groups.items():
        magnitude_files, phase_files = _split_parts(ctx, group)
        magnitude = {}
        for bids_file in magnitude_files:
            increment = _increment(ctx, bids_file)
            if increment in magnitude:
                raise BIDSInputError(
                    f"two bSSFP magnitude images with increment {increment:g} deg at one flip angle: "
                    f"{ctx.name(magnitude[increment])} and {ctx.name(bids_file.path)}; keep one")
            magnitude[increment] = bids_file.path
        if not magnitude:
            raise BIDSInputError(
                f"bSSFP phase images without magnitude: {', '.join(ctx.name(f.path) for f in phase_files)}")
        magnitude = dict(sorted(magnitude.items()))
        phase = {}
        for bids_file in phase_files:
            phase[_increment(ctx, bids_file)] = bids_file.path
        if phase and set(phase) != set(magnitude):
            raise BIDSInputError(
                f"bSSFP phase increments {sorted(phase)} do not match magnitude increments {sorted(magnitude)} "
                f"(e.g. {ctx.name(next(iter(magnitude.values())))}); provide phase for every increment or none")
        paths = list(magnitude.values())
        flips = {p: _number(ctx, p, ctx.metadata(p), "FlipAngle", what=" (required for bSSFP)") for p in paths}
        trs = {p: _number(ctx, p, ctx.metadata(p), "RepetitionTimeExcitation", fallback="RepetitionTime",
                          what=" (required for bSSFP)") for p in paths}
        flip_angle = _check_same(ctx, flips, "FlipAngle",
                                 "the phase cycles of one bSSFP flip angle must share it; fix the sidecars")
        repetition_time = _check_same(ctx, trs, "TR", "the phase cycles of one bSSFP series must share it")
        phase_tuple = tuple(phase[inc] for inc in magnitude) if phase else None
        series.append(BSSFPSeries(
            flip_angle=flip_angle,
            repetition_time=repetition_time,
            phase_increments=tuple(magnitude),
            magnitude=tuple(paths),
            phase=phase_tuple,
            phase_scale=_phase_scale(ctx, phase_tuple[0]) if phase_tuple else None,
            metadata=dict(ctx.metadata(paths[0])),
        ))
    series.sort(key=lambda s: s.flip_angle)
    for a, b in zip(series, series[1:]):
        if abs(a.flip_angle - b.flip_angle) <= _ANGLE_TOLERANCE:
            raise BIDSInputError(
                f"two bSSFP flip- groups have the same FlipAngle {a.flip_angle:g} deg "
                f"({ctx.name(a.magnitude[0])}, {ctx.name(b.magnitude[0])}); fix the sidecars or the flip- labels")
    _check_grids(ctx, [p for s in series for p in (*s.magnitude, *(s.phase or ()))], "bSSFP")
    return tuple(series)


def _one_per_label(ctx, files, labels, suffix):
    """{label: path} for files whose acq label is in ``labels``; refuse duplicates."""
    found = {}
    for bids_file in files:
        acquisition = _entity(bids_file, "acquisition")
        if acquisition not in labels:
            continue
        if acquisition in found:
            raise BIDSInputError(
                f"two {suffix} images with acq-{acquisition}: {ctx.name(found[acquisition])} and "
                f"{ctx.name(bids_file.path)}; keep one")
        found[acquisition] = bids_file.path
    return found


def _afi_pair(ctx, files):
    if not files:
        return None
    found = _one_per_label(ctx, files, ("tr1", "tr2"), "TB1AFI")
    if set(found) != {"tr1", "tr2"}:
        names = ", ".join(ctx.name(f.path) for f in files)
        raise BIDSInputError(
            f"incomplete AFI pair ({names}): need fmap/*_acq-tr1_TB1AFI and fmap/*_acq-tr2_TB1AFI")
    tr1_file, tr2_file = found["tr1"], found["tr2"]
    tr1 = _number(ctx, tr1_file, ctx.metadata(tr1_file), "RepetitionTimeExcitation", fallback="RepetitionTime",
                  what=" (required for AFI)")
    tr2 = _number(ctx, tr2_file, ctx.metadata(tr2_file), "RepetitionTimeExcitation", fallback="RepetitionTime",
                  what=" (required for AFI)")
    flip1 = _number(ctx, tr1_file, ctx.metadata(tr1_file), "FlipAngle", what=" (required for AFI)")
    flip2 = _number(ctx, tr2_file, ctx.metadata(tr2_file), "FlipAngle", what=" (required for AFI)")
    if abs(flip1 - flip2) > _ANGLE_TOLERANCE:
        raise BIDSInputError(
            f"AFI pair with different flip angles: {ctx.name(tr1_file)} has {flip1:g} deg, {ctx.name(tr2_file)} "
            f"has {flip2:g} deg; both images of an AFI acquisition share one flip angle: fix the sidecars")
    if tr2 <= tr1:
        raise BIDSInputError(
            f"AFI pair with TR2 <= TR1: {ctx.name(tr1_file)} has {tr1:g} s, {ctx.name(tr2_file)} has {tr2:g} s; "
            "acq-tr1 must be the image acquired after the shorter TR (swap the acq- labels if they are reversed)")
    _check_grids(ctx, [tr1_file, tr2_file], "AFI")
    return AFIPair(tr1_file=tr1_file, tr2_file=tr2_file, tr1=tr1, tr2=tr2, flip_angle=flip1)


def _receive_pair(ctx, files):
    if not files:
        return None
    heads, bodies = {}, {}
    for bids_file in files:
        acquisition = _entity(bids_file, "acquisition") or ""
        for prefix, target in (("head", heads), ("body", bodies)):
            if acquisition.lower().startswith(prefix):
                contrast = acquisition[len(prefix):]
                if contrast in target:
                    raise BIDSInputError(
                        f"two RB1COR images with acq-{acquisition}: {ctx.name(target[contrast])} and "
                        f"{ctx.name(bids_file.path)}; keep one")
                target[contrast] = bids_file.path
    contrasts = sorted(set(heads) & set(bodies))
    names = ", ".join(ctx.name(f.path) for f in files)
    if not contrasts:
        raise BIDSInputError(
            f"incomplete receive-field pair ({names}): need fmap/*_acq-head<contrast>_RB1COR and "
            "fmap/*_acq-body<contrast>_RB1COR with the same <contrast>")
    if len(contrasts) > 1:
        if "PDw" not in contrasts:
            raise BIDSInputError(
                f"several receive-field pairs ({names}) and none for PDw; keep one head/body pair")
        contrasts = ["PDw"]
    contrast = contrasts[0]
    _check_grids(ctx, [heads[contrast], bodies[contrast]], "RB1COR")
    return ReceivePair(head_file=heads[contrast], body_file=bodies[contrast])


# --------------------------------------------------------------------------------------------------
# public query
# --------------------------------------------------------------------------------------------------
def collect_inputs(layout, subject, session=None):
    """Collect and check one subject's qMRI inputs.

    Parameters
    ----------
    layout : bids.BIDSLayout
        From :func:`open_layout`.
    subject : str
        Subject label (``sub-`` prefix optional).
    session : str, optional
        Session label (``ses-`` prefix optional); required if the subject has sessions.

    Returns
    -------
    SubjectInputs
        GRE series sorted by flip angle (``gre_suffix`` "VFA" if spoiled VFA files exist, else "MEGRE",
        else None), bSSFP series, AFI and receive pairs, field strength, and notes (e.g. phase rescaling).

    Raises
    ------
    BIDSInputError
        For missing or inconsistent metadata, mismatched phase/magnitude echoes, images off the
        series' grid, a broken AFI or receive pair; the message names the file(s) and the fix.
    """
    subject = _strip(subject, "sub-")
    session = _strip(session, "ses-") if session is not None else None
    ctx = _Context(layout)
    if subject not in layout.get_subjects():
        raise BIDSInputError(
            f"participant sub-{subject} not found in {ctx.root}; available: "
            + ", ".join("sub-" + s for s in sorted(layout.get_subjects())))
    sessions = sorted(layout.get_sessions(subject=subject))
    if session is None and sessions:
        raise BIDSInputError(
            f"sub-{subject} in {ctx.root} has sessions ({', '.join('ses-' + s for s in sessions)}); "
            "choose one (--session-label)")
    if session is not None and session not in sessions:
        raise BIDSInputError(
            f"session ses-{session} not found for sub-{subject} in {ctx.root}; available: "
            + (", ".join("ses-" + s for s in sessions) or "none"))

    vfa_files = _get(layout, subject, session, suffix="VFA", datatype="anat")
    spoiled, bssfp = [], []
    for bids_file in vfa_files:
        (bssfp if _sequence_kind(ctx, bids_file) == "bssfp" else spoiled).append(bids_file)
    megre_files = _get(layout, subject, session, suffix="MEGRE", datatype="anat")

    gre, gre_suffix = (), None
    if spoiled:
        gre, gre_suffix = _gre_series(ctx, spoiled, "VFA"), "VFA"
        if megre_files:
            ctx.notes.append(
                f"MEGRE images ignored ({ctx.name(megre_files[0].path)} ...): the VFA collection is used")
            LOGGER.warning(ctx.notes[-1])
    elif megre_files:
        gre, gre_suffix = _gre_series(ctx, megre_files, "MEGRE"), "MEGRE"

    bssfp_series = _bssfp_series(ctx, bssfp) if bssfp else ()
    afi = _afi_pair(ctx, _get(layout, subject, session, suffix="TB1AFI", datatype="fmap"))
    receive = _receive_pair(ctx, _get(layout, subject, session, suffix="RB1COR", datatype="fmap"))

    strengths = {}
    for series in (*gre, *bssfp_series):
        value = series.metadata.get("MagneticFieldStrength")
        if value is not None:
            strengths[series.magnitude[0]] = _number(ctx, series.magnitude[0], series.metadata,
                                                     "MagneticFieldStrength")
    field_strength = None
    if strengths:
        field_strength = _check_same(
            ctx, strengths, "MagneticFieldStrength",
            "all images of a subject must come from one scanner; fix the sidecars")

    if not gre and not bssfp_series:
        listing = ", ".join(sorted({f.filename for f in _get(layout, subject, session)}))[:500] or "no images"
        raise BIDSInputError(
            f"no qMRI inputs for sub-{subject}" + (f" ses-{session}" if session else "") + f" in {ctx.root}: "
            "expected anat/*_VFA or anat/*_MEGRE images (see the documentation, 'Raw BIDS layout'); "
            f"found: {listing}")

    return SubjectInputs(
        subject=subject,
        session=session,
        gre=gre,
        gre_suffix=gre_suffix,
        bssfp=bssfp_series,
        afi=afi,
        receive=receive,
        field_strength=field_strength,
        notes=tuple(ctx.notes),
    )
