"""Write small synthetic raw BIDS datasets (tiny random NIfTIs + sidecars) for tests.

Images are 8x8x6 by default; values are random, only the layout and metadata matter. Every
builder returns the paths it wrote so tests can edit a sidecar or replace an image to provoke
one specific error.

Example
-------
>>> ds = make_dataset(tmp_path / "raw", gre="VFA", flip_angles=(4, 20), n_echoes=3)   # doctest: +SKIP
>>> edit_sidecar(ds.files["gre"][0], EchoTime=None)                                     # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from qmri_workflows.io.images import save_image

DEFAULT_AFFINE = np.array(
    [
        [1.5, 0.0, 0.0, -6.0],
        [0.0, 1.5, 0.0, -6.0],
        [0.0, 0.0, 2.0, -5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
DEFAULT_SHAPE = (8, 8, 6)


@dataclass
class FakeDataset:
    """Paths written by :func:`make_dataset` (``files`` keys: gre, gre_phase, bssfp, afi, receive)."""

    root: Path
    files: dict = field(default_factory=dict)

    def add(self, key, path):
        self.files.setdefault(key, []).append(Path(path))


def head_image(shape=DEFAULT_SHAPE, *, seed=0, echo_time=0.0, r2star=25.0, sigma=8.0):
    """Magnitude of an ellipsoidal 'head' in air: tissue of random brightness (the same in every
    image of a dataset) decaying with ``echo_time`` at ``r2star``, and Rician noise of ``sigma``.

    Random data filling the whole field of view would not pass the brain mask's sanity checks.
    """
    grid = np.indices(shape, dtype=float)
    radius = np.sqrt(sum(((grid[axis] - (shape[axis] - 1) / 2) / (0.36 * shape[axis])) ** 2 for axis in range(3)))
    tissue = np.where(radius < 1, np.random.default_rng(12345).uniform(600, 1000, size=shape), 0.0)
    noise = np.random.default_rng(seed).normal(0.0, sigma, size=(2, *shape))
    return np.abs(tissue * np.exp(-echo_time * r2star) + noise[0] + 1j * noise[1])


def write_image(path, data=None, *, shape=DEFAULT_SHAPE, affine=DEFAULT_AFFINE, dtype=np.float32, seed=0):
    """Write a NIfTI (a :func:`head_image` unless ``data`` is given); return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = head_image(shape, seed=seed)
    data = np.asarray(data).astype(dtype)
    image = nib.Nifti1Image(data, np.asarray(affine, float))
    image.set_data_dtype(dtype)
    image.header.set_xyzt_units("mm", "sec")
    save_image(image, path)
    return path


def write_sidecar(path, metadata):
    """Write the JSON sidecar of image ``path`` (keys with value None are skipped)."""
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    sidecar = path.with_name(name + ".json")
    sidecar.write_text(json.dumps({k: v for k, v in metadata.items() if v is not None}, indent=2))
    return sidecar


def sidecar_of(path):
    path = Path(path)
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return path.with_name(name[: -len(ext)] + ".json")
    return path.with_suffix(".json")


def edit_sidecar(path, **changes):
    """Change keys of an image's sidecar; a value of None removes the key."""
    sidecar = sidecar_of(path)
    metadata = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    for key, value in changes.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    sidecar.write_text(json.dumps(metadata, indent=2))
    return sidecar


def phase_data(units, *, shape=DEFAULT_SHAPE, seed=0):
    """Random phase covering the full range of an encoding.

    units : "rad" ([-pi, pi)), "rad2pi" ([0, 2pi)), "siemens" (integers -4096..4094),
    "siemens12" (0..4095), "ge" (milliradians, -3142..3142), "int16" (-32768..32767),
    "weird" (values 0..1000 that fit no encoding).
    """
    rng = np.random.default_rng(seed)
    radians = rng.uniform(-np.pi, np.pi, size=shape)
    radians.flat[0], radians.flat[1] = -np.pi, np.pi * (1 - 1e-6)  # span the full range
    if units == "rad":
        return radians, np.float32
    if units == "rad2pi":
        return np.mod(radians, 2 * np.pi), np.float32
    if units == "siemens":
        return np.clip(np.round(radians / np.pi * 4096), -4096, 4095), np.int16
    if units == "siemens12":
        return np.clip(np.round(np.mod(radians, 2 * np.pi) / (2 * np.pi) * 4096), 0, 4095), np.int16
    if units == "ge":
        return np.round(radians * 1000), np.int16
    if units == "int16":
        return np.clip(np.round(radians / np.pi * 32768), -32768, 32767), np.int16
    if units == "weird":
        return rng.uniform(0, 1000, size=shape), np.float32
    raise ValueError(f"unknown phase units {units!r}")


def make_dataset(
    root,
    *,
    subjects=("01",),
    sessions=None,
    gre="VFA",
    flip_angles=(4.0, 20.0),
    n_echoes=3,
    first_echo=0.003,
    echo_spacing=0.004,
    repetition_time=0.025,
    phase=True,
    phase_units="rad",
    extension=".nii.gz",
    sidecar_style="bids",
    inherit=False,
    bssfp_increments=(),
    bssfp_flip_angles=(30.0,),
    bssfp_repetition_time=0.005,
    afi=False,
    receive=False,
    field_strength=3.0,
    shape=DEFAULT_SHAPE,
    affine=DEFAULT_AFFINE,
    seed=0,
    mt_echoes=None,
):
    """Write a raw BIDS dataset following docs/architecture.rst "Raw BIDS layout".

    Parameters
    ----------
    gre : {"VFA", "MPM", "MEGRE", None}
        Spoiled multi-echo GRE at ``flip_angles`` (VFA) or at ``flip_angles[0]`` (MEGRE); "MPM" writes
        the hMRI layout: ``acq-PDw_flip-1_mt-off`` at ``flip_angles[0]``, ``acq-T1w_flip-2_mt-off`` at
        ``flip_angles[1]`` (``files["gre"]``) and ``acq-MTw_flip-1_mt-on`` at ``flip_angles[0]``
        (``files["mt"]``), and with ``receive`` a head/body pair per contrast.
    mt_echoes : int, optional
        Echoes of the MPM MT-weighted contrast (``n_echoes`` by default).
    n_echoes : int
        Echoes per flip angle; with 1 and ``gre="VFA"`` the files carry no ``echo`` entity.
    phase : bool
        Also write ``part-phase`` echoes (magnitude files get ``part-mag``); without phase the
        magnitude files have no ``part`` entity.
    phase_units : str
        See :func:`phase_data`; the phase sidecars get ``"Units": "rad"`` for "rad", else
        ``"arbitrary"`` (remove it with :func:`edit_sidecar` to test unlabelled phase).
    sidecar_style : {"bids", "dcm2niix"}
        "dcm2niix": ``RepetitionTime`` instead of ``RepetitionTimeExcitation``, no
        ``PulseSequenceType``, Siemens-like extra keys.
    inherit : bool
        Put keys shared by all GRE files (TR, field strength, manufacturer, sequence type) into a
        dataset-level ``<suffix>.json`` (BIDS inheritance); the per-file sidecars keep the rest.
    bssfp_increments : sequence of int
        RF phase-cycling increments (deg) of a bSSFP collection; empty for none.
    afi, receive : bool
        Write an AFI pair / a receive-field (RB1COR) pair in ``fmap``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "synthetic", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    (root / "participants.tsv").write_text("participant_id\n" + "".join(f"sub-{s}\n" for s in subjects))
    dataset = FakeDataset(root)
    counter = [seed]

    def image(path, data=None, dtype=np.float32):
        counter[0] += 1
        return write_image(path, data, shape=shape, affine=affine, dtype=dtype, seed=counter[0])

    common = {"MagneticFieldStrength": field_strength, "Manufacturer": "Siemens"}
    if sidecar_style == "dcm2niix":
        common.update(
            {
                "ManufacturersModelName": "Prisma",
                "ScanningSequence": "GR",
                "SequenceVariant": "SP",
                "ConversionSoftware": "dcm2niix",
                "Modality": "MR",
            }
        )
    inherited = {}
    for subject in subjects:
        for session in sessions or (None,):
            prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "")
            anat, fmap = folder / "anat", folder / "fmap"
            if gre:
                for acq, trailing, flip_angle, series_echoes, key in _gre_series(gre, flip_angles, n_echoes, mt_echoes):
                    for echo in range(1, series_echoes + 1):
                        for part in ("mag", "phase") if phase else (None,):
                            entities = list(acq)
                            if series_echoes > 1 or gre == "MEGRE":
                                entities.append(f"echo-{echo}")
                            entities.extend(trailing)
                            if part:
                                entities.append(f"part-{part}")
                            name = "_".join([prefix, *entities, gre]) + extension
                            metadata = {
                                "EchoTime": round(first_echo + (echo - 1) * echo_spacing, 6),
                                "FlipAngle": flip_angle,
                            }
                            shared = dict(common)
                            if sidecar_style == "dcm2niix":
                                shared["RepetitionTime"] = repetition_time
                                metadata["EchoNumber"] = echo
                                metadata["ImageType"] = ["ORIGINAL", "PRIMARY", "P" if part == "phase" else "M"]
                            else:
                                shared["RepetitionTimeExcitation"] = repetition_time
                                shared["PulseSequenceType"] = "SPGR"
                                shared["SpoilingRFPhaseIncrement"] = 50.0
                            if inherit:
                                inherited[gre] = shared
                            else:
                                metadata.update(shared)
                            if part == "phase":
                                data, dtype = phase_data(phase_units, shape=shape, seed=counter[0])
                                # BIDS requires Units for part-phase; scanner integers are "arbitrary"
                                metadata["Units"] = "rad" if phase_units == "rad" else "arbitrary"
                                path = image(anat / name, data, dtype)
                                dataset.add(f"{key}_phase", path)
                            else:
                                path = image(
                                    anat / name, head_image(shape, seed=counter[0] + 1, echo_time=metadata["EchoTime"])
                                )
                                dataset.add(key, path)
                            write_sidecar(path, metadata)
            for increment in bssfp_increments:
                for flip_index, flip_angle in enumerate(bssfp_flip_angles, start=1):
                    for part in ("mag", "phase") if phase else (None,):
                        entities = [f"acq-bssfp{int(increment):03d}", f"flip-{flip_index}"]
                        if part:
                            entities.append(f"part-{part}")
                        name = "_".join([prefix, *entities, "VFA"]) + extension
                        metadata = {
                            **common,
                            "FlipAngle": flip_angle,
                            "RepetitionTimeExcitation": bssfp_repetition_time,
                            "EchoTime": bssfp_repetition_time / 2,
                            "PulseSequenceType": "bSSFP",
                            "PhaseCyclingIncrement": float(increment),
                        }
                        if part == "phase":
                            data, dtype = phase_data("rad", shape=shape, seed=counter[0])
                            metadata["Units"] = "rad"
                            path = image(anat / name, data, dtype)
                        else:
                            path = image(anat / name)
                        write_sidecar(path, metadata)
                        dataset.add("bssfp", path)
            if afi:
                for label, tr in (("tr1", 0.02), ("tr2", 0.1)):
                    path = image(fmap / f"{prefix}_acq-{label}_TB1AFI{extension}")
                    write_sidecar(
                        path, {**common, "FlipAngle": 60.0, "RepetitionTimeExcitation": tr, "EchoTime": 0.002}
                    )
                    dataset.add("afi", path)
            if receive:
                contrasts = ("PDw", "MTw", "T1w") if gre == "MPM" else ("PDw",)
                for label in [f"{coil}{contrast}" for contrast in contrasts for coil in ("head", "body")]:
                    path = image(fmap / f"{prefix}_acq-{label}_RB1COR{extension}")
                    write_sidecar(
                        path, {**common, "FlipAngle": 6.0, "RepetitionTimeExcitation": 0.006, "EchoTime": 0.002}
                    )
                    dataset.add("receive", path)
    for suffix, shared in inherited.items():
        (root / f"{suffix}.json").write_text(json.dumps(shared, indent=2))
    return dataset


def _gre_series(gre, flip_angles, n_echoes, mt_echoes):
    """(acq entity, entities after echo, flip angle, echoes, files key) of each GRE series of
    ``make_dataset``, in the BIDS entity order (acq, echo, flip, mt, part)."""
    if gre == "VFA":
        return [((), (f"flip-{i}",), flip, n_echoes, "gre") for i, flip in enumerate(flip_angles, start=1)]
    if gre == "MPM":
        return [
            (("acq-PDw",), ("flip-1", "mt-off"), flip_angles[0], n_echoes, "gre"),
            (("acq-T1w",), ("flip-2", "mt-off"), flip_angles[1], n_echoes, "gre"),
            (("acq-MTw",), ("flip-1", "mt-on"), flip_angles[0], mt_echoes or n_echoes, "mt"),
        ]
    return [((), (), flip_angles[0], n_echoes, "gre")]


def file_tree(folder):
    """{relative path: sha256 (files) or None (folders)} of everything below ``folder``: equal
    before and after a run when nothing was added, removed or changed by a single byte."""
    folder = Path(folder)
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        for path in folder.rglob("*")
    }


def make_vfa_dataset(root, **kwargs):
    """Shortcut: a VFA dataset (see :func:`make_dataset` for the options); returns its root path."""
    kwargs.setdefault("gre", "VFA")
    return make_dataset(root, **kwargs).root


def make_megre_dataset(root, **kwargs):
    """Shortcut: a single-flip-angle MEGRE dataset; returns its root path."""
    kwargs.setdefault("gre", "MEGRE")
    return make_dataset(root, **kwargs).root


DERIVATIVE_AFFINE = np.array(
    [
        [1.0, 0.0, 0.0, -5.0],
        [0.0, 1.0, 0.0, -5.0],
        [0.0, 0.0, 1.0, -4.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
DERIVATIVE_SHAPE = (10, 10, 8)
DSEG_LABELS = {1: "CSF", 2: "GM", 3: "WM"}


def make_derivatives(
    root,
    *,
    subjects=("01",),
    sessions=None,
    tb1map=True,
    tb1map_units="p.u.",
    dseg=True,
    dseg_tsv=True,
    lesion_mask=True,
    brain_mask=True,
    dataset_type="derivative",
    shape=DERIVATIVE_SHAPE,
    affine=DERIVATIVE_AFFINE,
):
    """Write a BIDS derivatives dataset of precomputed inputs, on its own grid (not the raw one).

    ``files`` keys: tb1map (``fmap/*_TB1map``, percent of nominal, sidecar ``Units`` unless
    ``tb1map_units`` is None), dseg (``anat/*_desc-tissue_dseg`` with labels :data:`DSEG_LABELS`)
    and dseg_tsv, lesion_mask (``anat/*_label-lesion_mask``), brain_mask (``anat/*_desc-brain_mask``).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    description = {"Name": "precomputed", "BIDSVersion": "1.10.0", "GeneratedBy": [{"Name": "sometool"}]}
    if dataset_type is not None:
        description["DatasetType"] = dataset_type
    (root / "dataset_description.json").write_text(json.dumps(description))
    dataset = FakeDataset(root)
    grid = np.indices(shape).sum(axis=0)
    labels = (grid % 4).astype(np.int16)  # 0..3: background and every tissue label
    for subject in subjects:
        for session in sessions or (None,):
            prefix = f"sub-{subject}" + (f"_ses-{session}" if session else "")
            folder = root / f"sub-{subject}" / (f"ses-{session}" if session else "")
            if tb1map:
                path = write_image(folder / "fmap" / f"{prefix}_TB1map.nii.gz", np.full(shape, 95.0), affine=affine)
                write_sidecar(path, {"Units": tb1map_units})
                dataset.add("tb1map", path)
            if dseg:
                path = write_image(
                    folder / "anat" / f"{prefix}_desc-tissue_dseg.nii.gz", labels, affine=affine, dtype=np.int16
                )
                dataset.add("dseg", path)
                if dseg_tsv:
                    tsv = path.with_name(path.name.replace(".nii.gz", ".tsv"))
                    tsv.write_text("index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in DSEG_LABELS.items()))
                    dataset.add("dseg_tsv", tsv)
            if lesion_mask:
                path = write_image(
                    folder / "anat" / f"{prefix}_label-lesion_mask.nii.gz",
                    (grid == 9).astype(np.uint8),
                    affine=affine,
                    dtype=np.uint8,
                )
                dataset.add("lesion_mask", path)
            if brain_mask:
                path = write_image(
                    folder / "anat" / f"{prefix}_desc-brain_mask.nii.gz",
                    (labels > 0).astype(np.uint8),
                    affine=affine,
                    dtype=np.uint8,
                )
                dataset.add("brain_mask", path)
    return dataset


DAMAGE_KINDS = ("truncated", "empty", "wrong_compression", "lying_header")
DAMAGE_MESSAGES = {  # what the pre-flight calls each kind of damage (regular expressions)
    "truncated": r"(is truncated|is damaged or truncated)",
    "empty": r"is empty \(0 bytes\)",
    "wrong_compression": r"is not gzip-compressed, which its name does not say",
    "lying_header": r"is truncated: \d+ bytes uncompressed where its header promises \d+",
}


def damage_image(path, kind):
    """Damage a NIfTI file in place as copies and converters do; ``kind`` is one of :data:`DAMAGE_KINDS`.

    "truncated": the last third of the file is cut off (an interrupted copy); "empty": zero bytes;
    "wrong_compression": a ``.nii.gz`` holding an uncompressed NIfTI (or a ``.nii`` holding a
    compressed one); "lying_header": a whole, well-formed file whose header promises twice the slices
    it holds. Returns ``path``.
    """
    path = Path(path)
    compressed = path.name.endswith(".gz")
    content = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(content[: len(content) * 2 // 3])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_compression":
        path.write_bytes(gzip.decompress(content) if compressed else gzip.compress(content))
    elif kind == "lying_header":
        raw = gzip.decompress(content) if compressed else content
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
        shape = header.get_data_shape()
        header.set_data_shape((*shape[:2], 2 * shape[2], *shape[3:]))
        lying = header.binaryblock + raw[len(header.binaryblock) :]
        path.write_bytes(gzip.compress(lying) if compressed else lying)
    else:
        raise ValueError(f"unknown damage {kind!r}; choose from {', '.join(DAMAGE_KINDS)}")
    return path
