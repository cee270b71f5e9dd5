"""Write BIDS derivatives: file names, NIfTI maps with clean headers, JSON sidecars.

Every writer here is *atomic*: it writes a temporary file next to the target (same directory, hence the
same file system) and moves it into place with :func:`os.replace`, so a reader (or a re-run after a
crash) never sees a half-written file and an exception mid-write leaves the previous target, if any,
untouched.

Nothing here writes into the raw part of a dataset: :func:`write_map` and
:func:`write_dataset_description` refuse an output root that is a raw BIDS dataset or lies inside one
other than under its ``derivatives/<name>/``; the App checks its output and work directories by the
same rule (:func:`check_output_root`).

Header conventions of :func:`write_nifti`
-----------------------------------------
* ``sform`` and ``qform`` are both set to ``affine`` with code 1 (``scanner``): the maps are computed
  on the grid of the raw acquisition, whose affine maps voxels to scanner coordinates. When the affine
  has a shear that a quaternion cannot represent, the qform code is set to 0 so that readers fall back
  on the (exact) sform instead of a distorted qform.
* Spatial units mm, temporal units s; scaling is reset (``scl_slope`` = 1, ``scl_inter`` = 0) so the
  stored values are the physical values, and so is the display window (``cal_min`` = ``cal_max`` = 0).
* dtype by kind of the array unless ``dtype`` is given: boolean -> uint8, integer -> int16 (labels),
  floating -> float32. Complex arrays are refused.
* NaN and Inf are kept in floating outputs (NaN marks "not estimated", e.g. a failed fit or a voxel
  outside the mask; the pipeline decides where to put them). Casting non-finite values to an integer
  dtype raises ``ValueError``, as does an integer value outside the range of the target dtype.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .images import gzip_module, save_image

__all__ = [
    "BIDS_VERSION",
    "DEFAULT_UNITS",
    "ENTITY_ORDER",
    "bids_path",
    "bids_uri",
    "check_output_root",
    "sidecar_path",
    "write_dataset_description",
    "write_dseg_tsv",
    "write_json",
    "write_map",
    "write_nifti",
    "has_clean_header",
    "publish_map",
]

BIDS_VERSION = "1.10.0"
"""BIDS version written into ``dataset_description.json``."""

ENTITY_ORDER = (
    "task",
    "acq",
    "ce",
    "rec",
    "dir",
    "run",
    "echo",
    "flip",
    "inv",
    "mt",
    "part",
    "space",
    "res",
    "den",
    "label",
    "desc",
)
"""Entities accepted by :func:`bids_path` (after ``sub`` and ``ses``), in BIDS file-name order."""

DEFAULT_UNITS = {
    "R1map": "1/s",
    "T1map": "s",
    "R2map": "1/s",
    "T2map": "s",
    "R2starmap": "1/s",
    "T2starmap": "s",
    "PDmap": "percent",  # percent water (project convention; BIDS allows arbitrary units)
    "M0map": "arbitrary",
    "S0map": "arbitrary",
    "Chimap": "ppm",
    "TB1map": "percent",  # percent of the nominal flip angle (100 = nominal, hMRI convention)
    "RB1map": "arbitrary",
}
"""``Units`` written into a map's sidecar by :func:`write_map` when the metadata has none."""

FMAP_SUFFIXES = frozenset({"TB1map", "RB1map"})
_MASK_SUFFIXES = frozenset({"mask"})
_SEGMENTATION_SUFFIXES = frozenset({"dseg"})
_DATATYPES = frozenset({"anat", "fmap", "func", "dwi", "perf", "figures"})

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")
_EXTENSION_RE = re.compile(r"^(\.[A-Za-z0-9]+)+$")
_INT16_INFO = np.iinfo(np.int16)


# --------------------------------------------------------------------------------------------------
# file names
# --------------------------------------------------------------------------------------------------
def _clean_label(entity, value):
    """Return ``value`` as a BIDS label string, stripping an ``<entity>-`` prefix; validate it."""
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"BIDS entity {entity!r} needs a label, got the boolean {value!r}")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValueError(f"BIDS entity {entity!r} needs a non-negative index, got {value!r}")
        value = str(int(value))
    if not isinstance(value, str):
        raise ValueError(f"BIDS entity {entity!r} needs a string label, got {type(value).__name__} {value!r}")
    if value.startswith(f"{entity}-"):
        value = value[len(entity) + 1 :]
    if not _LABEL_RE.match(value):
        raise ValueError(
            f"BIDS entity {entity!r} label {value!r} is invalid: labels must be non-empty and "
            "alphanumeric (no '-', '_', '.', spaces)"
        )
    return value


def bids_path(*, subject, suffix, session=None, datatype="anat", extension=".nii.gz", **entities):
    """Build the relative path of a BIDS (derivative) file from its entities.

    Parameters
    ----------
    subject : str
        Subject label, with or without the ``sub-`` prefix.
    suffix : str
        BIDS suffix (``R1map``, ``mask``, ``VFA`` ...), alphanumeric.
    session : str, optional
        Session label, with or without the ``ses-`` prefix.
    datatype : str, optional
        Data-type folder (``anat``, ``fmap`` ...).
    extension : str, optional
        File extension including the leading dot (``.nii.gz``, ``.json``, ``.tsv``).
    **entities
        Further entities by their short BIDS key (see :data:`ENTITY_ORDER`), e.g. ``acq="bssfp090"``,
        ``echo=1``, ``flip=2``, ``part="mag"``, ``desc="brain"``. ``None`` values are skipped; integers
        are written as indices.

    Returns
    -------
    str
        ``sub-<s>[/ses-<x>]/<datatype>/sub-<s>[_ses-<x>][_<key>-<value>...]_<suffix><extension>``
        with POSIX separators and entities in BIDS order.

    Raises
    ------
    ValueError
        For an unknown entity key, an invalid label, suffix, datatype or extension.

    Examples
    --------
    >>> bids_path(subject="sub-01", suffix="S0map", flip=2, desc="fit")
    'sub-01/anat/sub-01_flip-2_desc-fit_S0map.nii.gz'
    >>> bids_path(subject="01", session="ses-pre", suffix="TB1map", datatype="fmap", extension=".json")
    'sub-01/ses-pre/fmap/sub-01_ses-pre_TB1map.json'
    """
    unknown = sorted(set(entities) - set(ENTITY_ORDER))
    if unknown:
        raise ValueError(
            f"unknown BIDS entities {unknown}; accepted entities are {list(ENTITY_ORDER)} "
            "(use the short keys, e.g. 'acq' not 'acquisition')"
        )
    if not isinstance(suffix, str) or not _LABEL_RE.match(suffix):
        raise ValueError(f"BIDS suffix must be a non-empty alphanumeric string, got {suffix!r}")
    if datatype not in _DATATYPES:
        raise ValueError(f"datatype must be one of {sorted(_DATATYPES)}, got {datatype!r}")
    if not isinstance(extension, str) or not _EXTENSION_RE.match(extension):
        raise ValueError(f"extension must look like '.nii.gz' or '.json', got {extension!r}")

    subject = _clean_label("sub", subject)
    parts = [f"sub-{subject}"]
    folders = [f"sub-{subject}"]
    if session is not None:
        session = _clean_label("ses", session)
        parts.append(f"ses-{session}")
        folders.append(f"ses-{session}")
    for key in ENTITY_ORDER:
        value = entities.get(key)
        if value is None:
            continue
        parts.append(f"{key}-{_clean_label(key, value)}")
    folders.append(datatype)
    name = "_".join(parts) + f"_{suffix}{extension}"
    return "/".join([*folders, name])


def sidecar_path(path):
    """Return the ``.json`` sidecar path of a ``.nii``/``.nii.gz`` (or any) file as a :class:`Path`."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii", ".tsv.gz", ".tsv"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def bids_uri(path, raw_root, *, dataset="raw"):
    """Return the BIDS URI ``bids:<dataset>:<path relative to raw_root>`` of a raw file.

    Parameters
    ----------
    path : str or Path
        File inside ``raw_root``.
    raw_root : str or Path
        Root of the dataset that the name ``dataset`` refers to (``DatasetLinks`` in
        ``dataset_description.json``).
    dataset : str, optional
        Dataset name in the URI (``raw`` by default; empty for the current dataset).

    Raises
    ------
    ValueError
        If ``path`` is not inside ``raw_root``.
    """
    path = Path(os.path.abspath(path))
    raw_root = Path(os.path.abspath(raw_root))
    try:
        relative = path.relative_to(raw_root)
    except ValueError:
        raise ValueError(f"source file {path} is not inside the dataset root {raw_root}") from None
    return f"bids:{dataset}:{relative.as_posix()}"


# --------------------------------------------------------------------------------------------------
# atomic writing
# --------------------------------------------------------------------------------------------------
def _current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _atomic_target(path):
    """Yield a temporary path next to ``path`` (same extension); move it onto ``path`` on success.

    The temporary file is removed if the body raises, so no partial target or stray temporary file
    is left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    # keep the full (possibly double) extension: nibabel picks gzip compression from it
    extension = "".join(Path(name).suffixes[-2:]) if name.endswith(".gz") else Path(name).suffix
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=f".tmp{extension}")
    os.close(handle)
    try:
        yield Path(temporary)
        # mkstemp creates mode 0600; give the result the permissions a plain open() would
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _output_dtype(data, dtype):
    if dtype is not None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf":
            raise ValueError(f"cannot write NIfTI data of dtype {dtype}; use a boolean, integer or float dtype")
        return np.dtype(np.uint8) if dtype.kind == "b" else dtype
    kind = data.dtype.kind
    if kind == "b":
        return np.dtype(np.uint8)
    if kind in "iu":
        return np.dtype(np.int16)
    if kind == "f":
        return np.dtype(np.float32)
    raise ValueError(
        f"cannot write NIfTI data of dtype {data.dtype} (shape {data.shape}); "
        "write real and imaginary parts (or magnitude and phase) separately"
    )


def _cast(data, dtype):
    """Cast ``data`` to ``dtype``, refusing values the target cannot hold exactly enough."""
    if dtype.kind == "f":
        if data.dtype.kind == "f" and data.dtype.itemsize > dtype.itemsize and data.size:
            # a finite value beyond the target's range would be written as inf, silently
            limit = float(np.finfo(dtype).max)
            magnitudes = np.abs(data[np.isfinite(data)])
            largest = float(np.max(magnitudes, initial=0.0))
            if largest > limit:
                n_over = int(np.count_nonzero(magnitudes > limit))
                raise ValueError(
                    f"cannot cast {n_over} finite values up to {largest:.3g} (array shape {data.shape}) to {dtype}, "
                    f"whose largest value is {limit:.3g}: they would be stored as inf"
                )
        return data.astype(dtype, copy=False)
    values = data
    if values.dtype.kind == "f":
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        if n_bad:
            raise ValueError(f"cannot cast {n_bad} NaN/Inf values (array shape {data.shape}) to {dtype}")
        if not np.array_equal(values, np.round(values)):
            raise ValueError(f"cannot cast non-integer values (array shape {data.shape}) to {dtype}")
    if values.size:
        info = np.iinfo(dtype)
        low, high = values.min(), values.max()
        if low < info.min or high > info.max:
            raise ValueError(f"values span [{low}, {high}], outside the range of {dtype} [{info.min}, {info.max}]")
    return values.astype(dtype)


def write_nifti(path, data, affine, *, dtype=None, header=None):
    """Write a NIfTI-1 image atomically with a clean header.

    Parameters
    ----------
    path : str or Path
        Target file (``.nii`` or ``.nii.gz``); parent folders are created.
    data : array_like
        Image array (3D or 4D).
    affine : array_like, shape (4, 4)
        Voxel-to-world affine, written exactly as the sform (and the qform when representable).
    dtype : numpy dtype, optional
        On-disk dtype. Default by kind: bool -> uint8, integer -> int16, float -> float32.
    header : nibabel header, optional
        Template header (e.g. of the source image) for fields like ``pixdim[4]`` and ``descrip``;
        dtype, scaling, transforms and units are always reset as described in the module docstring.

    Returns
    -------
    Path
        The written file.

    Raises
    ------
    ValueError
        For a non-finite or non-4x4 affine, unsupported dtype, a wrong extension, values that do
        not fit the requested integer dtype, or finite values beyond the float dtype's range.
    """
    import nibabel as nib  # keep `import qmri_workflows.io.derivatives` light

    path = Path(path)
    if not (path.name.endswith(".nii.gz") or path.name.endswith(".nii")):
        raise ValueError(f"NIfTI path must end with .nii or .nii.gz, got {path}")
    data = np.asanyarray(data)
    if data.ndim < 2 or data.ndim > 7:
        raise ValueError(f"NIfTI data must have 2 to 7 dimensions, got shape {data.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 array, got shape {affine.shape}: {affine!r}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"affine is singular (zero voxel size?): {affine.tolist()}")

    out_dtype = _output_dtype(data, dtype)
    try:
        array = _cast(data, out_dtype)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None

    if header is not None:
        header = nib.Nifti1Header.from_header(header)
    image = nib.Nifti1Image(array, affine, header=header)
    out_header = image.header
    out_header.set_data_dtype(out_dtype)
    out_header.set_xyzt_units(xyz="mm", t="sec")
    out_header.set_slope_inter(1.0, 0.0)
    # display window of a template header describes other data (e.g. a raw magnitude image)
    out_header["cal_min"] = 0.0
    out_header["cal_max"] = 0.0
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    if not np.allclose(out_header.get_qform(), affine, atol=1e-4, rtol=0):
        # a quaternion cannot hold a shear: let readers use the exact sform
        image.set_qform(affine, code=0)

    with _atomic_target(path) as temporary:
        save_image(image, temporary)
    return path


def _to_json_compatible(obj, where="<root>"):
    """Convert numpy and path objects to JSON types, refusing NaN/Inf with the key path named."""
    if isinstance(obj, Mapping):
        converted = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise ValueError(f"JSON keys must be strings, got {key!r} at {where}")
            converted[key] = _to_json_compatible(value, f"{where}.{key}" if where != "<root>" else key)
        return converted
    if isinstance(obj, (np.ndarray, list, tuple)):
        items = obj.tolist() if isinstance(obj, np.ndarray) else obj
        return [_to_json_compatible(item, f"{where}[{index}]") for index, item in enumerate(items)]
    if isinstance(obj, (set, frozenset)):
        return [_to_json_compatible(item, where) for item in sorted(obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        if not math.isfinite(value):
            raise ValueError(f"JSON cannot hold the non-finite number {value} (at {where}); use null or drop it")
        return value
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, str):
        return obj
    raise ValueError(f"cannot write {type(obj).__name__} {obj!r} (at {where}) to JSON")


def write_json(path, obj):
    """Write ``obj`` as JSON atomically: sorted keys, indent 2, trailing newline.

    numpy scalars and arrays become numbers and lists, tuples and sets lists, paths strings.

    Raises
    ------
    ValueError
        For NaN/Inf values (invalid JSON, rejected by the BIDS validator) or unsupported objects;
        the message names the offending key.
    """
    text = json.dumps(_to_json_compatible(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"
    path = Path(path)
    with _atomic_target(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# guarding the input dataset
# --------------------------------------------------------------------------------------------------
def _is_raw_description(description_file):
    try:
        description = json.loads(Path(description_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        # unreadable: be safe and treat it as an input dataset
        return True
    if not isinstance(description, dict):
        return True
    dataset_type = description.get("DatasetType")
    if dataset_type is None:
        # BIDS: DatasetType defaults to "raw"; old derivatives without it still name their pipeline
        return not ("GeneratedBy" in description or "PipelineDescription" in description)
    return str(dataset_type).lower() == "raw"


def check_output_root(out_root, *, bids_dir=None, work=False):
    """Refuse a folder that would put files into the raw part of a BIDS dataset.

    The one rule for where derivatives (and the App's work directory) may go. The raw part of a
    dataset is all of it but ``derivatives/<name>/`` (where BIDS puts the outputs of pipelines, and
    which pybids and the BIDS validator keep out of the raw data): ``out_root`` may be such a folder,
    or lie outside the dataset, but not be the dataset's root, its ``derivatives/`` folder, or any
    other folder in it. The datasets checked are the raw ones above ``out_root`` (a
    ``dataset_description.json`` with ``DatasetType`` "raw", or none without ``GeneratedBy``) and
    ``bids_dir``, the input of a run, whatever its description says.

    An output root must not hold ``bids_dir`` either: the input would become part of the derivative
    dataset. A work directory (``work=True``) may, as nothing written there is read as BIDS.

    Parameters
    ----------
    out_root : str or Path
    bids_dir : str or Path, optional
        The input dataset of the run.
    work : bool, optional
        ``out_root`` is a work directory, not a derivatives dataset (the message says which).

    Returns
    -------
    Path
        The absolute ``out_root``.

    Raises
    ------
    ValueError
        One sentence naming the dataset and where the folder may go instead.
    """
    root = Path(os.path.abspath(out_root))
    resolved = root.resolve()
    what = "the work directory" if work else "the output directory"
    datasets = [
        candidate
        for candidate in (resolved, *resolved.parents)
        if (candidate / "dataset_description.json").is_file()
        and _is_raw_description(candidate / "dataset_description.json")
    ]
    if bids_dir is not None:
        bids_dir = Path(bids_dir).resolve()
        if not work and resolved in bids_dir.parents:
            raise ValueError(
                f"{what} {root} holds the input dataset {bids_dir}, which would become part of the "
                f"derivatives: choose a folder outside it, or under {bids_dir / 'derivatives'}/<pipeline-name>"
            )
        if bids_dir == resolved or bids_dir in resolved.parents:
            datasets.append(bids_dir)
    for dataset in dict.fromkeys(datasets):
        relative = resolved.relative_to(dataset).parts
        if len(relative) >= 2 and relative[0] == "derivatives":
            continue
        where = "the root of" if not relative else "inside"
        raise ValueError(
            f"{what} {root} is {where} the raw BIDS dataset {dataset}, whose raw data are never written to: "
            f"choose a folder outside it, or under {dataset / 'derivatives'}/<pipeline-name>"
        )
    return root


# --------------------------------------------------------------------------------------------------
# derivatives
# --------------------------------------------------------------------------------------------------
def _map_target(out_root, *, subject, suffix, session, datatype, **entities):
    """Checked output root and target path of a derivative image (see :func:`write_map`)."""
    root = check_output_root(out_root)
    if datatype is None:
        datatype = "fmap" if suffix in FMAP_SUFFIXES else "anat"
    elif suffix in FMAP_SUFFIXES and datatype != "fmap":
        raise ValueError(f"{suffix} belongs in the 'fmap' folder (BIDS), got datatype={datatype!r}")
    relative = bids_path(
        subject=subject, session=session, suffix=suffix, datatype=datatype, extension=".nii.gz", **entities
    )
    return root / relative


def _map_sidecar(metadata, suffix, entities):
    sidecar = dict(metadata or {})
    if suffix in DEFAULT_UNITS:
        sidecar.setdefault("Units", DEFAULT_UNITS[suffix])
        # required by BIDS for derivative images that are not masks or segmentations
        sidecar.setdefault("SkullStripped", False)
    if suffix in _MASK_SUFFIXES and entities.get("desc") == "brain":
        sidecar.setdefault("Type", "Brain")
    return sidecar


def _check_mask_values(data):
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"a mask must hold only 0 and 1, got values {values[:10].tolist()} (shape {np.shape(data)})")


def _default_dtype(suffix):
    if suffix in _MASK_SUFFIXES:
        return np.dtype(np.uint8)
    if suffix in _SEGMENTATION_SUFFIXES:
        return np.dtype(np.int16)
    return np.dtype(np.float32)


def write_map(
    out_root,
    data,
    affine,
    *,
    subject,
    suffix,
    metadata,
    session=None,
    datatype=None,
    dtype=None,
    header=None,
    **entities,
):
    """Write a derivative image and its JSON sidecar into the BIDS-derivatives dataset ``out_root``.

    Parameters
    ----------
    out_root : str or Path
        Root of the derivatives dataset (must not be, or be inside, a raw dataset; see
        :func:`check_output_root`).
    data : array_like
        Image array.
    affine : array_like, shape (4, 4)
        Voxel-to-world affine, copied exactly.
    subject, suffix, session, **entities
        File-name entities, see :func:`bids_path`.
    metadata : dict or None
        Sidecar content. For map suffixes (:data:`DEFAULT_UNITS`) ``Units`` is filled from that table
        when absent, and ``SkullStripped`` (required by BIDS for derivative images) defaults to
        ``False``: pass ``True`` when the map was masked to the brain. A ``desc-brain`` mask gets
        ``"Type": "Brain"`` unless given.
    datatype : str, optional
        ``"fmap"`` for TB1map/RB1map, ``"anat"`` otherwise, by default.
    dtype : numpy dtype, optional
        On-disk dtype; default by suffix: ``mask`` -> uint8, ``dseg`` -> int16, anything else float32.
    header : nibabel header, optional
        Template header passed to :func:`write_nifti`.

    Returns
    -------
    Path
        The NIfTI file written (the sidecar is next to it, see :func:`sidecar_path`).

    Raises
    ------
    ValueError
        If ``out_root`` is in a raw dataset, a B1 map is put outside ``fmap``, a mask has values other
        than 0/1, or a file-name entity is invalid.
    """
    target = _map_target(out_root, subject=subject, session=session, suffix=suffix, datatype=datatype, **entities)
    data = np.asanyarray(data)
    if dtype is None:
        if suffix in _MASK_SUFFIXES:
            _check_mask_values(data)
        dtype = _default_dtype(suffix)
    write_nifti(target, data, affine, dtype=dtype, header=header)
    write_json(sidecar_path(target), _map_sidecar(metadata, suffix, entities))
    return target


def has_clean_header(image, dtype):
    """Whether ``image`` (nibabel) is stored as :func:`write_nifti` would store it with ``dtype``.

    Only the header is read: dtype, unit scaling, sform (code 1) and qform consistent with it,
    spatial units mm and no display window.
    """
    header = image.header
    if header.get_data_dtype() != np.dtype(dtype):
        return False
    slope, inter = header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return False
    sform, sform_code = image.get_sform(coded=True)
    if int(sform_code) != 1:
        return False
    qform, qform_code = image.get_qform(coded=True)
    if int(qform_code) not in (0, 1) or (int(qform_code) == 1 and not np.allclose(qform, sform, atol=1e-4, rtol=0)):
        return False
    return header.get_xyzt_units()[0] == "mm" and header["cal_min"] == 0 and header["cal_max"] == 0


def publish_map(out_root, in_file, *, subject, suffix, metadata, session=None, datatype=None, dtype=None, **entities):
    """Put the image file ``in_file`` into the derivatives dataset, as :func:`write_map` would.

    A file whose header already follows :func:`write_nifti`'s conventions for the target dtype
    (the interfaces write their results with it) is copied byte for byte, or gzip-compressed when
    it is a ``.nii``: the voxels are neither decoded nor re-encoded. Any other file is rewritten
    through :func:`write_map`.

    Parameters
    ----------
    out_root, subject, suffix, metadata, session, datatype, dtype, **entities
        As :func:`write_map`.
    in_file : str or Path
        NIfTI file (``.nii`` or ``.nii.gz``).

    Returns
    -------
    Path
        The published NIfTI file.
    """
    import shutil

    import nibabel as nib

    image = nib.load(str(in_file))
    target_dtype = np.dtype(dtype) if dtype is not None else _default_dtype(suffix)
    if not has_clean_header(image, target_dtype) or not isinstance(image, nib.Nifti1Image):
        data = np.asanyarray(image.dataobj)
        return write_map(
            out_root,
            data,
            image.affine,
            subject=subject,
            suffix=suffix,
            metadata=metadata,
            session=session,
            datatype=datatype,
            dtype=dtype,
            header=image.header,
            **entities,
        )
    if suffix in _MASK_SUFFIXES:
        _check_mask_values(np.asanyarray(image.dataobj))
    target = _map_target(out_root, subject=subject, session=session, suffix=suffix, datatype=datatype, **entities)
    with _atomic_target(target) as temporary:
        if str(in_file).endswith(".gz"):
            shutil.copyfile(in_file, temporary)
        else:
            # a fast level (nibabel's default is 1 too): the maps compress well at it
            with open(in_file, "rb") as source, gzip_module().open(temporary, "wb", compresslevel=1) as sink:
                shutil.copyfileobj(source, sink, length=1 << 22)
    write_json(sidecar_path(target), _map_sidecar(metadata, suffix, entities))
    return target


def write_dataset_description(
    root, *, name, dataset_type="derivative", generated_by=None, source_datasets=None, dataset_links=None, extra=None
):
    """Write ``dataset_description.json`` of a derivatives dataset.

    Parameters
    ----------
    root : str or Path
        Dataset root (checked with :func:`check_output_root` for derivative datasets).
    name : str
        ``Name`` of the dataset.
    dataset_type : {"derivative", "raw"}
        ``DatasetType``.
    generated_by : dict or list of dict, optional
        ``GeneratedBy`` entries (``Name`` required; ``Version``, ``CodeURL``, ``Description`` ...).
        Default: this package with its version.
    source_datasets : list of (str or dict), optional
        ``SourceDatasets``; strings are taken as ``{"URL": ...}``.
    dataset_links : dict, optional
        ``DatasetLinks``, e.g. ``{"raw": "/data/study"}`` so that ``bids:raw:...`` URIs resolve.
    extra : dict, optional
        Further keys (``License``, ``Authors`` ...), overriding the ones above.

    Returns
    -------
    Path
        The written file.
    """
    if dataset_type not in ("derivative", "raw"):
        raise ValueError(f"dataset_type must be 'derivative' or 'raw', got {dataset_type!r}")
    root = check_output_root(root) if dataset_type == "derivative" else Path(root)
    if generated_by is None:
        from qmri_workflows import __version__

        generated_by = [
            {
                "Name": "qmri-workflows",
                "Version": __version__,
                "Description": "Quantitative MRI maps (R1, R2, R2*, PD, MTsat, QSM) from raw BIDS data",
            }
        ]
    elif isinstance(generated_by, Mapping):
        generated_by = [dict(generated_by)]
    else:
        generated_by = [dict(entry) for entry in generated_by]
    for entry in generated_by:
        if "Name" not in entry:
            raise ValueError(f"every GeneratedBy entry needs a 'Name', got {entry!r}")
    description = {"Name": name, "BIDSVersion": BIDS_VERSION, "DatasetType": dataset_type}
    if dataset_type == "derivative":
        description["GeneratedBy"] = generated_by
    if source_datasets:
        description["SourceDatasets"] = [
            {"URL": str(item)} if isinstance(item, (str, os.PathLike)) else dict(item) for item in source_datasets
        ]
    if dataset_links:
        description["DatasetLinks"] = {str(k): str(v) for k, v in dataset_links.items()}
    if extra:
        description.update(extra)
    return write_json(Path(root) / "dataset_description.json", description)


def write_dseg_tsv(path, rows):
    """Write the label table of a segmentation (``*_dseg.tsv``) atomically.

    Parameters
    ----------
    path : str or Path
        Target ``.tsv`` file.
    rows : iterable of (index, name, abbreviation) or of dicts with those keys
        One row per label; indices must be unique integers.

    Returns
    -------
    Path
        The written file.
    """
    lines = ["index\tname\tabbreviation"]
    seen = set()
    for row in rows:
        if isinstance(row, Mapping):
            index, label_name, abbreviation = row["index"], row["name"], row.get("abbreviation", "")
        else:
            index, label_name, abbreviation = row
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise ValueError(f"dseg index must be an integer, got {index!r}")
        if int(index) in seen:
            raise ValueError(f"duplicate dseg index {index}")
        seen.add(int(index))
        for text in (label_name, abbreviation):
            if not isinstance(text, str) or any(c in text for c in "\t\r\n"):
                raise ValueError(f"dseg names must be strings without tabs or newlines, got {text!r}")
        lines.append(f"{int(index)}\t{label_name}\t{abbreviation}")
    if len(lines) == 1:
        raise ValueError("a dseg table needs at least one row")
    path = Path(path)
    with _atomic_target(path) as temporary:
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
