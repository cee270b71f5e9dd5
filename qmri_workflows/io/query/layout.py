"""Open a raw BIDS dataset, choose participants, and group a subject's files by their entities."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BIDSInputError

__all__ = [
    "IGNORED_FOLDERS",
    "IMAGE_EXTENSIONS",
    "IndexedFile",
    "QueryContext",
    "by_echo",
    "dataset_indexer",
    "dataset_root",
    "entity",
    "open_layout",
    "select_images",
    "select_participants",
    "single_collection",
    "split_parts",
    "strip_prefix",
    "subject_images",
    "subject_sessions",
]

IMAGE_EXTENSIONS = [".nii", ".nii.gz"]
IGNORED_FOLDERS = ["derivatives", "sourcedata", "code", "stimuli", "models"]


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

    root = dataset_root(bids_dir, what="BIDS dataset")
    if database_path is not None:
        database = Path(database_path).resolve()
        if database == root or root in database.parents:
            raise BIDSInputError(
                f"the pybids database {database} would be written inside the input dataset {root}; "
                "put it in the work directory"
            )
        database_path = str(database)
    indexer = dataset_indexer(root, validate=validate, ignore=[*IGNORED_FOLDERS, re.compile(r"/\.")])
    try:
        return BIDSLayout(str(root), database_path=database_path, indexer=indexer)
    except Exception as error:  # pybids raises its own types (BIDSValidationError, ...)
        raise BIDSInputError(f"pybids cannot index {root}: {error}") from error


def dataset_root(folder, *, what):
    """Resolved ``folder`` if it is a dataset root (holds ``dataset_description.json``)."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise BIDSInputError(f"{what} {root} does not exist or is not a folder")
    if not (root / "dataset_description.json").is_file():
        raise BIDSInputError(
            f"{root} is not a BIDS dataset root: {root / 'dataset_description.json'} is missing "
            "(give the folder that holds dataset_description.json and the sub-* folders)"
        )
    return root


def dataset_indexer(root, **options):
    """A pybids indexer that reads entities from the path inside the dataset ``root`` only.

    pybids 0.22 matches its entity patterns against the absolute path of each file, so a folder
    above the dataset named like a datatype or an entity (``/data/perf/study/sub-01/anat/...``,
    ``/scans/sub-x/...``, ``/archive/run-2/...``) becomes every file's ``datatype``, ``subject`` or
    ``run``, and queries for ``anat`` images find nothing (pybids issues #600 and #1270, fixed
    upstream by pull request #1273 after 0.22.0). The indexer returned here keeps pybids' own
    parsing and stored absolute paths, and re-reads the values from the path relative to ``root``,
    which makes BIDS inheritance of sidecars (keyed on these entities) right too.

    Parameters
    ----------
    root : Path
        Resolved dataset root, as given to ``BIDSLayout``.
    **options
        Passed to ``bids.layout.BIDSLayoutIndexer`` (``validate``, ``ignore``, ...).

    Returns
    -------
    bids.layout.BIDSLayoutIndexer
    """
    from bids.layout import BIDSLayoutIndexer

    class DatasetRelativeIndexer(BIDSLayoutIndexer):
        def _index_file(self, abs_fn, entities):
            from bids.layout import parse_file_entities

            bids_file, tags = super()._index_file(abs_fn, entities)
            inside = os.path.relpath(bids_file.path, root)
            if inside.startswith(os.pardir):  # not below the root: leave pybids' reading alone
                return bids_file, tags
            # pybids' patterns expect a leading separator ("/sub-01/anat/..."), as at the root.
            values = parse_file_entities("/" + Path(inside).as_posix(), entities=entities.values())
            # Every entity found inside the dataset was also found (perhaps elsewhere) in the absolute
            # path, so pybids' tags carry its type: keep those, with the value read inside.
            return bids_file, [
                {**tag, "_value": str(values[tag["entity_name"]])} for tag in tags if tag["entity_name"] in values
            ]

    return DatasetRelativeIndexer(**options)


def strip_prefix(label, prefix):
    """``label`` without ``prefix`` (e.g. "sub-") and surrounding blanks."""
    label = str(label).strip()
    return label[len(prefix) :] if label.startswith(prefix) else label


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
    sessions_of = subject_sessions(layout)
    available = sorted(sessions_of)
    if not available:
        raise BIDSInputError(f"no sub-* folders with data found in {root}")
    if participant_labels:
        wanted = sorted({strip_prefix(label, "sub-") for label in participant_labels})
        missing = [label for label in wanted if label not in available]
        if missing:
            raise BIDSInputError(
                f"participant(s) {', '.join('sub-' + m for m in missing)} not found in {root}; "
                f"available: {', '.join('sub-' + a for a in available)}"
            )
    else:
        wanted = available
    wanted_sessions = sorted({strip_prefix(label, "ses-") for label in session_labels}) if session_labels else None

    pairs = []
    seen_sessions = set()
    for subject in wanted:
        sessions = sessions_of[subject]
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
                f"participants in {root}; available: {listing}"
            )
    return pairs


def subject_sessions(layout):
    """{subject label: sorted session labels} of every subject of ``layout``.

    One query of pybids' index, where ``layout.get_subjects()`` and ``layout.get_sessions()`` each
    build every file object of the dataset.
    """
    from bids.layout.models import Tag

    rows = (
        layout.session.query(Tag.file_path, Tag.entity_name, Tag._value)
        .filter(Tag.entity_name.in_(("subject", "session")), Tag.is_metadata.is_(False))
        .all()
    )
    labels = {}
    for path, name, value in rows:
        labels.setdefault(path, {})[name] = value
    sessions = {}
    for found in labels.values():
        if "subject" in found:
            sessions.setdefault(found["subject"], set()).update([found["session"]] if "session" in found else [])
    return {subject: sorted(labels_) for subject, labels_ in sessions.items()}


@dataclass(frozen=True)
class IndexedFile:
    """One image as pybids indexed it, read from the index once.

    Attributes
    ----------
    path : str
        Absolute path.
    entities : dict
        Entities of the file name ({"subject": "01", "echo": 2, "suffix": "VFA", ...}).
    metadata : dict
        Merged JSON sidecar (BIDS inheritance applied by pybids).
    """

    path: str
    entities: dict = field(compare=False, hash=False)
    metadata: dict = field(compare=False, hash=False)

    @property
    def filename(self):
        return os.path.basename(self.path)


def subject_images(layout, subject, session):
    """Every image of one subject/session with its entities and sidecar, sorted by path.

    Two queries of pybids' index in all (the files, then all their tags), so that the checks that
    follow group and filter in Python instead of asking pybids once per file and entity.

    Returns
    -------
    list of IndexedFile
    """
    from bids.layout import Query
    from bids.layout.models import Tag

    paths = sorted(
        layout.get(
            subject=subject,
            session=session if session is not None else Query.NONE,
            extension=IMAGE_EXTENSIONS,
            return_type="filename",
        )
    )
    entities = {path: {} for path in paths}
    metadata = {path: {} for path in paths}
    for tag in layout.session.query(Tag).filter(Tag.file_path.in_(paths)).all():
        (metadata if tag.is_metadata else entities)[tag.file_path][tag.entity_name] = tag.value
    return [IndexedFile(path, entities[path], metadata[path]) for path in paths]


def select_images(files, **filters):
    """The ``files`` (IndexedFile) whose entities match every filter (a value or a list of values)."""

    def matches(indexed):
        for key, wanted in filters.items():
            value = indexed.entities.get(key)
            if value not in (wanted if isinstance(wanted, (list, tuple, set)) else [wanted]):
                return False
        return True

    return [indexed for indexed in files if matches(indexed)]


class QueryContext:
    """What a query needs besides the layout: short file names, cached sidecars, collected notes.

    ``files`` (IndexedFile) seed the sidecar cache, so their metadata needs no further query.
    """

    def __init__(self, layout, files=()):
        self.layout = layout
        self.root = Path(layout.root)
        self.notes = []
        self._metadata = {indexed.path: indexed.metadata for indexed in files}

    def name(self, path):
        """``path`` relative to the dataset root (as users see it in messages)."""
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def metadata(self, path):
        """Merged sidecar of ``path`` (BIDS inheritance applied by pybids)."""
        if path not in self._metadata:
            self._metadata[path] = dict(self.layout.get_metadata(path))
        return self._metadata[path]


def entity(indexed, key):
    """Value of entity ``key`` of an IndexedFile, or None."""
    return indexed.entities.get(key)


def single_collection(ctx, files, suffix):
    """Refuse several acquisitions/runs/reconstructions of the same collection."""
    for key, name in (("acquisition", "acq"), ("run", "run"), ("reconstruction", "rec")):
        labels = sorted({str(entity(f, key)) for f in files if entity(f, key) is not None})
        unlabelled = any(entity(f, key) is None for f in files)
        if len(labels) + unlabelled > 1:
            example = {}
            for f in files:
                example.setdefault(entity(f, key), f.path)
            listing = ", ".join(ctx.name(path) for path in example.values())
            raise BIDSInputError(
                f"several {suffix} collections differ in {name}- ({listing}); keep one per subject/session "
                "(move the others to sourcedata/ or another dataset)"
            )


def split_parts(ctx, files):
    """Split files into magnitude (part-mag or no part) and phase; refuse real/imag."""
    magnitude, phase = [], []
    for bids_file in files:
        part = entity(bids_file, "part")
        if part in (None, "mag"):
            magnitude.append(bids_file)
        elif part == "phase":
            phase.append(bids_file)
        else:
            raise BIDSInputError(
                f"{ctx.name(bids_file.path)}: part-{part} images are not supported; convert real/imaginary "
                "pairs to part-mag and part-phase"
            )
    return magnitude, phase


def by_echo(ctx, files, what):
    """{echo index: path}; files without an echo entity count as echo 1 (only one allowed)."""
    echoes = {}
    for bids_file in files:
        echo = entity(bids_file, "echo")
        index = int(echo) if echo is not None else 1
        if index in echoes:
            raise BIDSInputError(
                f"two {what} files for echo {index}: {ctx.name(echoes[index])} and {ctx.name(bids_file.path)}; "
                "keep one (or give them different acq-/run- labels and remove the other from the dataset)"
            )
        echoes[index] = bids_file.path
    return dict(sorted(echoes.items()))
