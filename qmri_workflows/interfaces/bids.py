"""Nipype interface that writes a result into a BIDS-derivatives dataset."""

from __future__ import annotations

import os
import re
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from ..io.derivatives import ENTITY_ORDER, bids_uri, publish_map, sidecar_path
from ..io.tables import publish_table

__all__ = ["DerivativesDataSink", "find_dataset_root", "subject_session_of"]

_DTYPES = {"auto": None, "float32": "float32", "uint8": "uint8", "int16": "int16"}


def find_dataset_root(path):
    """Return the closest folder above ``path`` holding a ``dataset_description.json``, or None.

    The file's own symbolic link is not followed: in a DataLad / git-annex dataset every file links
    into the annex's object store (``.git/annex/objects/...``), whose folders are not the dataset's.
    """
    for folder in Path(os.path.abspath(path)).parents:
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


_SUBJECT = re.compile(r"(?:^|_)sub-([A-Za-z0-9]+)")
_SESSION = re.compile(r"(?:^|_)ses-([A-Za-z0-9]+)")


def subject_session_of(path):
    """``(subject, session or None)`` from the file name of a BIDS file.

    Only the file name is read: folders above the dataset (``/data/sub-x/...``) cannot mislead it.

    Raises
    ------
    ValueError
        If the name carries no ``sub-`` entity.
    """
    name = Path(path).name
    subject = _SUBJECT.search(name)
    if subject is None:
        raise ValueError(f"{path} is not a BIDS file name (no sub-<label> entity)")
    session = _SESSION.search(name)
    return subject.group(1), session.group(1) if session else None


def _source_uris(source_files, raw_root):
    """BIDS URIs (``bids:raw:...``) of raw files, relative to ``raw_root`` (found if None)."""
    uris = []
    for source in source_files:
        root = raw_root if raw_root is not None else find_dataset_root(source)
        if root is None:
            raise ValueError(
                f"cannot turn {source} into a BIDS URI: no raw_root given and no dataset_description.json above it"
            )
        uris.append(bids_uri(source, root))
    return uris


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="NIfTI image (or .tsv table with its .json dictionary) to publish")
    base_directory = Str(mandatory=True, desc="root of the derivatives dataset (never a raw dataset)")
    subject = Str(
        "", usedefault=True, desc="subject label (sub- prefix optional); empty: from the first source file's name"
    )
    session = Str(
        "", usedefault=True, desc="session label; empty: from the first source file's name (none if it has none)"
    )
    suffix = Str(mandatory=True, desc="BIDS suffix: R1map, R2starmap, mask, dseg, TB1map ...")
    datatype = traits.Enum(
        "auto", "anat", "fmap", usedefault=True, desc="data-type folder; 'auto': fmap for TB1map/RB1map, anat otherwise"
    )
    metadata = traits.Dict(usedefault=True, desc="sidecar fields (Units filled in for maps when absent)")
    source_files = InputMultiObject(Str, usedefault=True, desc="raw files the result derives from")
    raw_root = Str(
        "",
        usedefault=True,
        desc="root of the raw dataset, for Sources as bids:raw:<path>; found from the source files when empty",
    )
    dtype = traits.Enum(
        "auto",
        "float32",
        "uint8",
        "int16",
        usedefault=True,
        desc="on-disk dtype; 'auto': mask uint8, dseg int16, anything else float32",
    )


# the file-name entities (acq, echo, flip, desc ...) as optional inputs, empty meaning absent
for _entity in ENTITY_ORDER:
    _DerivativesDataSinkInputSpec.add_class_trait(
        _entity,
        traits.Either(traits.Int, Str, default="", usedefault=True, desc=f"BIDS entity {_entity}-"),
    )
del _entity


class _DerivativesDataSinkOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="published NIfTI")
    out_meta = File(exists=True, desc="its JSON sidecar")


class DerivativesDataSink(SimpleInterface):
    """Write ``in_file`` into a BIDS-derivatives dataset with a clean header and a sidecar.

    As NiPreps' sink, it names the output after its first source file: the subject and session
    entities come from that file's name unless given. The path comes from
    :func:`qmri_workflows.io.derivatives.bids_path`; the image is published by
    :func:`qmri_workflows.io.derivatives.publish_map` (copied without re-encoding when the interface
    that made it already wrote a clean header, rewritten otherwise), and the sidecar gets
    ``metadata`` plus ``Sources`` (BIDS URIs of ``source_files``) and default ``Units`` for maps.

    Examples
    --------
    >>> sink = DerivativesDataSink(base_directory="/out/qmri", suffix="R1map", desc="fit",
    ...                            source_files=["/data/raw/sub-01/anat/sub-01_flip-1_VFA.nii.gz"])
    >>> sink.inputs.flip = 2
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        entities = {}
        for key in ENTITY_ORDER:
            value = getattr(inputs, key)
            if isdefined(value) and value != "":
                entities[key] = value

        metadata = dict(inputs.metadata)
        source_files = list(inputs.source_files) if isdefined(inputs.source_files) else []
        if source_files:
            raw_root = inputs.raw_root or None
            sources = list(metadata.get("Sources", []))
            for uri in _source_uris(source_files, raw_root):
                if uri not in sources:
                    sources.append(uri)
            metadata["Sources"] = sources

        subject, session = inputs.subject, inputs.session
        if not subject:
            if not source_files:
                raise ValueError("DerivativesDataSink needs a subject or source files to name the output")
            subject, session = subject_session_of(source_files[0])
        common = {
            "subject": subject,
            "session": session or None,
            "suffix": inputs.suffix,
            "datatype": None if inputs.datatype == "auto" else inputs.datatype,
            "metadata": metadata,
            **entities,
        }
        if str(inputs.in_file).endswith(".tsv"):
            # a table and its data dictionary (the .json beside it)
            out_file = publish_table(inputs.base_directory, inputs.in_file, **common)
        else:
            out_file = publish_map(inputs.base_directory, inputs.in_file, dtype=_DTYPES[inputs.dtype], **common)
        self._results["out_file"] = str(out_file)
        self._results["out_meta"] = str(sidecar_path(out_file))
        return runtime
