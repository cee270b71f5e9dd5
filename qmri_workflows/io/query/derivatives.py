"""Inputs precomputed by other tools, read from BIDS derivatives datasets (``--derivatives``).

Per subject (and session, matched exactly) the pipeline looks for:

* a transmit-field map ``<fmap|anat>/*_TB1map.nii[.gz]`` (sidecar ``Units`` recorded when present);
* a segmentation ``anat/*_dseg.nii[.gz]`` with its label table ``*_dseg.tsv`` (columns ``index``
  and ``name``; next to the image or, by BIDS inheritance, at the dataset root);
* a lesion mask ``anat/*_label-lesion_mask.nii[.gz]``;
* a gadolinium-enhancement mask ``anat/*_label-enhancing_mask.nii[.gz]`` (lesion staging);
* a brain mask ``anat/*_desc-brain_mask.nii[.gz]``.

Files in a standard template space (``space-MNI152NLin2009cAsym`` ...) are not the subject's space
and are skipped. Each file is checked on its own (readable, one 3D volume, finite; masks and
segmentations integer-valued); derivative files need not share the grid of the raw images. Nothing
is ever written into a derivatives dataset.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BIDSInputError
from .layout import IMAGE_EXTENSIONS, dataset_indexer, dataset_root
from .metadata import load_header
from .problems import BRAIN_MASK, DSEG, ENHANCING_MASK, LESION_MASK, TB1MAP, CollectionProblem

__all__ = ["DerivativeFile", "checked_file", "find_derivatives", "open_derivatives", "tb1map_scale"]

LOGGER = logging.getLogger("qmri_workflows.io")

# Standard template identifiers of the BIDS specification (appendix "Coordinate systems"): images in
# these spaces are not in the subject's scanner space.
_TEMPLATE_SPACE = re.compile(
    r"^(MNI|ICBM|Talairach|fsaverage|fsLR|OASIS|NKI|UNCInfant|WHS|SUIT|Fischer344)", re.IGNORECASE
)

# collection: (pybids filters, description for messages, integer-valued)
_QUERIES = {
    TB1MAP: ({"suffix": "TB1map", "datatype": ["fmap", "anat"]}, "<fmap|anat>/*_TB1map", False),
    DSEG: ({"suffix": "dseg", "datatype": "anat"}, "anat/*_dseg", True),
    LESION_MASK: ({"suffix": "mask", "label": "lesion", "datatype": "anat"}, "anat/*_label-lesion_mask", True),
    BRAIN_MASK: ({"suffix": "mask", "desc": "brain", "datatype": "anat"}, "anat/*_desc-brain_mask", True),
    ENHANCING_MASK: (
        {"suffix": "mask", "label": "enhancing", "datatype": "anat"},
        "anat/*_label-enhancing_mask",
        True,
    ),
}


@dataclass(frozen=True)
class DerivativeFile:
    """One checked input from a derivatives dataset.

    Attributes
    ----------
    path : str
        Absolute path of the image.
    metadata : dict
        Its merged JSON sidecar (empty without one); for a ``TB1map`` it holds ``Units`` when the
        producing tool wrote it.
    tsv : str or None
        Label table of a segmentation (``*_dseg.tsv``), else None.
    """

    path: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)
    tsv: str | None = None
    origin: str = "derivatives"
    """Where it was found: "derivatives" (given with ``--derivatives``) or "raw" (a pre-computed map
    in the raw dataset's ``fmap``, as BIDS allows for ``TB1map``)."""
    units_read: str = ""
    """For a ``TB1map``: how its values are read (:func:`tb1map_scale`), for the plan and sidecars."""


def open_derivatives(paths):
    """Index derivatives datasets (e.g. of a lesion segmentation tool) with pybids, read only.

    Parameters
    ----------
    paths : sequence of str or Path
        Roots of BIDS derivatives datasets (each holds ``dataset_description.json``, ideally with
        ``"DatasetType": "derivative"``).

    Returns
    -------
    list of bids.BIDSLayout
        One per distinct path, indexed with pybids' derivatives configuration (``desc``, ``label``, ...
        parsed) and kept in memory.

    Raises
    ------
    BIDSInputError
        If a path is not a dataset root, is a raw dataset, or cannot be indexed.
    """
    from bids import BIDSLayout

    layouts, roots = [], set()
    for path in paths:
        root = dataset_root(path, what="derivatives dataset")
        if root in roots:  # given twice: its files would compete with themselves
            continue
        roots.add(root)
        description_file = root / "dataset_description.json"
        try:
            description = json.loads(description_file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise BIDSInputError(f"cannot read {description_file}: {error}; fix the JSON") from error
        if not isinstance(description, dict):
            raise BIDSInputError(f"{description_file} must hold a JSON object (Name, BIDSVersion, DatasetType)")
        dataset_type = description.get("DatasetType")
        if dataset_type != "derivative":
            generated = description.get("GeneratedBy") or description.get("PipelineDescription")
            if dataset_type is not None or not generated:
                raise BIDSInputError(
                    f"{root} is not a BIDS derivatives dataset ({description_file} has DatasetType "
                    f"{dataset_type!r}); give --derivatives the output folder of the tool that made the maps "
                    'or masks, and set "DatasetType": "derivative" in its dataset_description.json'
                )
            LOGGER.warning('%s has no "DatasetType" in dataset_description.json; read as a derivatives dataset', root)
        indexer = dataset_indexer(root, validate=False, ignore=[re.compile(r"/\.")])
        try:
            layouts.append(BIDSLayout(str(root), config=["bids", "derivatives"], validate=False, indexer=indexer))
        except Exception as error:  # pybids raises its own types
            raise BIDSInputError(f"pybids cannot index the derivatives dataset {root}: {error}") from error
    return layouts


def find_derivatives(layouts, subject, session):
    """Find and check one subject's derivative inputs.

    Parameters
    ----------
    layouts : sequence of bids.BIDSLayout
        From :func:`open_derivatives`.
    subject : str
        Subject label without ``sub-``.
    session : str or None
        Session label without ``ses-``; None matches only files without a session.

    Returns
    -------
    found : dict
        {collection: DerivativeFile} for the collections found and usable.
    problems : list of CollectionProblem
        One per collection found but unusable (broken file, several candidates).
    notes : list of str
        Things the user may want to know (e.g. a TB1map without ``Units``).
    """
    from bids.layout import Query

    found, problems, notes = {}, [], []
    for collection, (filters, pattern, _) in _QUERIES.items():
        candidates = []
        for layout in layouts:
            if subject not in layout.get_subjects():
                continue
            files = layout.get(
                subject=subject,
                session=session if session is not None else Query.NONE,
                extension=IMAGE_EXTENSIONS,
                **filters,
            )
            candidates.extend(f for f in files if not _TEMPLATE_SPACE.match(f.get_entities().get("space") or ""))
        if collection == DSEG:
            # a lesion map stored as a dseg is not the tissue segmentation
            candidates = [f for f in candidates if f.get_entities().get("label") != "lesion"]
        if not candidates:
            continue
        if len(candidates) > 1:
            names = ", ".join(sorted(f.path for f in candidates))
            problems.append(
                CollectionProblem(
                    collection,
                    (
                        f"several {pattern} candidates for sub-{subject}"
                        + (f" ses-{session}" if session else "")
                        + f": {names}; keep one (move the others out of the derivatives dataset, or pass "
                        "--derivatives only the dataset that holds the one to use)"
                    ),
                )
            )
            continue
        try:
            found[collection], note = checked_file(candidates[0].path, candidates[0].get_metadata(), collection)
        except BIDSInputError as error:
            problems.append(CollectionProblem(collection, str(error)))
            continue
        if note:
            notes.append(note)
            LOGGER.info(note)
    return found, problems, notes


def checked_file(path, metadata, collection, *, origin="derivatives"):
    """One candidate image of ``collection`` (its path and merged sidecar), checked.

    Returns
    -------
    file : DerivativeFile
    note : str or None
        What the user may want to know (how a TB1map without ``Units`` is read).

    Raises
    ------
    BIDSInputError
        If the image is unusable (non-finite values, labels that are not integers, a TB1map in
        unknown units ...), naming it and the fix.
    """
    _, _, integer_valued = _QUERIES[collection]
    metadata = dict(metadata)
    tsv = _check_volume(path, collection, integer_valued)
    note, how = None, ""
    if collection == TB1MAP:
        values = np.asanyarray(load_header(path).dataobj)
        _, how = tb1map_scale(values, metadata.get("Units"), path)
        if "Units" not in metadata:
            note = f'{path}: {how}; add "Units" to its sidecar to be sure'
    return DerivativeFile(path=path, metadata=metadata, tsv=tsv, origin=origin, units_read=how), note


def _check_volume(path, collection, integer_valued):
    """Check one derivative image; return the path of its label table for a dseg (else None)."""
    data = np.asanyarray(load_header(path).dataobj)
    if data.dtype.kind == "f":
        if np.isinf(data).any():
            raise BIDSInputError(f"{path} holds infinite values; replace them (NaN or 0 where there is no value)")
        if integer_valued and np.isnan(data).any():
            raise BIDSInputError(f"{path} holds NaN; a {collection} must hold integer labels (0 = outside)")
        if not np.isfinite(data).any():
            raise BIDSInputError(f"{path} holds no finite value")
        if integer_valued and not np.array_equal(data, np.round(data)):
            raise BIDSInputError(
                f"{path} holds non-integer values (range {np.nanmin(data):g}..{np.nanmax(data):g}); a {collection} "
                "must hold integer labels: threshold or round it and save it with an integer data type"
            )
    if integer_valued and data.min() < 0:
        raise BIDSInputError(f"{path} holds negative labels (minimum {data.min():g}); labels are 0 (outside) or more")
    if collection == BRAIN_MASK and not data.any():
        raise BIDSInputError(f"the brain mask {path} is empty (all zero); give a mask that covers the brain")
    if collection == DSEG:
        return _check_label_table(path, np.unique(data))
    return None


def _label_table(path):
    """The ``*_dseg.tsv`` of segmentation ``path``: beside it, else inherited from the dataset root."""
    image = Path(path)
    stem = image.name
    for ext in IMAGE_EXTENSIONS[::-1]:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    beside = image.with_name(stem + ".tsv")
    if beside.is_file():
        return beside, [beside]
    inherited_name = re.sub(r"^(sub-[a-zA-Z0-9+]+_)(ses-[a-zA-Z0-9+]+_)?", "", stem) + ".tsv"
    tried = [beside]
    for folder in image.parents:
        candidate = folder / inherited_name
        tried.append(candidate)
        if candidate.is_file():
            return candidate, tried
        if (folder / "dataset_description.json").is_file():
            break
    return None, tried


def _check_label_table(path, labels):
    """Check the label table of a segmentation holding ``labels``; return its path."""
    table, tried = _label_table(path)
    if table is None:
        raise BIDSInputError(
            f"the segmentation {path} has no label table: write {tried[0]} (tab-separated, columns "
            "'index' and 'name', one row per label)"
        )
    try:
        with open(table, newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t")
            rows = list(reader)
            columns = [name.strip() for name in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise BIDSInputError(f"cannot read the label table {table}: {error}") from error
    if "index" not in columns or "name" not in columns:
        raise BIDSInputError(
            f"the label table {table} needs columns 'index' and 'name' (tab-separated, one row per label); "
            f"found {columns or 'an empty file'}"
        )
    indices = set()
    for number, row in enumerate(rows, start=2):
        row = {str(key).strip(): value for key, value in row.items()}
        try:
            index = int(str(row["index"]).strip())
        except ValueError:
            raise BIDSInputError(f"{table}, line {number}: index {row['index']!r} is not an integer") from None
        if index in indices:
            raise BIDSInputError(f"{table}, line {number}: index {index} is listed twice; keep one row per label")
        indices.add(index)
    missing = sorted(int(label) for label in labels if label != 0 and int(label) not in indices)
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise BIDSInputError(
            f"the segmentation {path} holds labels missing from its table {table}: {shown}; add a row "
            "(index, name) for each"
        )
    return str(table)


# Units words of TB1map sidecars: hMRI writes "p.u." (percent units); a ratio is unitless.
_PERCENT_UNITS = {"percent", "%", "p.u.", "pu", "percent of nominal", "percentage"}
_RATIO_UNITS = {"ratio", "1", "fraction", "unitless", "a.u.", "arbitrary", "dimensionless"}
# Plausible transmit fields span 0.2-3 x nominal; the two unit ranges cannot overlap.
_RATIO_RANGE = (0.2, 3.0)


def tb1map_scale(values, units, name):
    """Factor turning the stored values of a TB1map into the ratio actual / nominal flip angle.

    Parameters
    ----------
    values : numpy.ndarray
        The map's values (any shape; non-finite and non-positive values are ignored).
    units : str or None
        The sidecar's ``Units``; None when it has none.
    name : str
        The file, for messages.

    Returns
    -------
    scale : float
        0.01 for percent, 1 for a ratio.
    how : str
        How the unit was decided (for the sidecar).

    Raises
    ------
    BIDSInputError
        For an unknown unit, or values whose median fits neither a ratio nor a percentage.
    """
    if units is not None:
        unit = str(units).strip().lower()
        if unit in _PERCENT_UNITS:
            return 0.01, f'Units "{units}" (percent of the nominal flip angle)'
        if unit in _RATIO_UNITS:
            return 1.0, f'Units "{units}" (ratio actual / nominal)'
        raise BIDSInputError(
            f'{name}: TB1map "Units" is {units!r}, which is neither percent ("percent", "p.u.") nor a ratio '
            '("ratio"); set "Units" in its sidecar to "percent" (100 = nominal) or "ratio" (1 = nominal)'
        )
    positive = values[np.isfinite(values) & (values > 0)]
    median = float(np.median(positive)) if positive.size else math.nan
    low, high = _RATIO_RANGE
    if low <= median <= high:
        return 1.0, f'no "Units" in the sidecar; median value {median:.3g} read as a ratio (1 = nominal)'
    if 100 * low <= median <= 100 * high:
        return 0.01, f'no "Units" in the sidecar; median value {median:.3g} read as percent (100 = nominal)'
    raise BIDSInputError(
        f'{name}: TB1map without "Units" in its sidecar and a median value of {median:.3g}, which is neither a '
        f"ratio ({low:g}-{high:g}) nor a percentage ({100 * low:g}-{100 * high:g}) of the nominal flip angle; "
        'add "Units": "percent" or "Units": "ratio" to its sidecar (and check that it is a transmit-field map)'
    )
