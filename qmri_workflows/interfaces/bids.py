"""Nipype interface that writes a result into a BIDS-derivatives dataset."""

from __future__ import annotations

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

from ..io.derivatives import ENTITY_ORDER, bids_uri, sidecar_path, write_map

__all__ = ["DerivativesDataSink", "find_dataset_root"]

_DTYPES = {"auto": None, "float32": "float32", "uint8": "uint8", "int16": "int16"}


def find_dataset_root(path):
    """Return the closest folder above ``path`` holding a ``dataset_description.json``, or None."""
    for folder in Path(path).resolve().parents:
        if (folder / "dataset_description.json").is_file():
            return folder
    return None


def _source_uris(source_files, raw_root):
    """BIDS URIs (``bids:raw:...``) of raw files, relative to ``raw_root`` (found if None)."""
    uris = []
    for source in source_files:
        root = raw_root if raw_root is not None else find_dataset_root(source)
        if root is None:
            raise ValueError(
                f"cannot turn {source} into a BIDS URI: no raw_root given and no dataset_description.json "
                "above it")
        uris.append(bids_uri(source, root))
    return uris


class _DerivativesDataSinkInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="NIfTI image to publish")
    base_directory = Str(mandatory=True, desc="root of the derivatives dataset (never a raw dataset)")
    subject = Str(mandatory=True, desc="subject label (sub- prefix optional)")
    session = Str("", usedefault=True, desc="session label; empty for none")
    suffix = Str(mandatory=True, desc="BIDS suffix: R1map, R2starmap, mask, dseg, TB1map ...")
    datatype = traits.Enum("auto", "anat", "fmap", usedefault=True,
                           desc="data-type folder; 'auto': fmap for TB1map/RB1map, anat otherwise")
    metadata = traits.Dict(usedefault=True, desc="sidecar fields (Units filled in for maps when absent)")
    source_files = InputMultiObject(Str, usedefault=True, desc="raw files the result derives from")
    raw_root = Str("", usedefault=True,
                   desc="root of the raw dataset, for Sources as bids:raw:<path>; found from the "
                        "source files when empty")
    dtype = traits.Enum("auto", "float32", "uint8", "int16", usedefault=True,
                        desc="on-disk dtype; 'auto': mask uint8, dseg int16, anything else float32")


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

    The path comes from :func:`qmri_workflows.io.derivatives.bids_path`; the image is rewritten by
    :func:`qmri_workflows.io.derivatives.write_map` (affine copied exactly into sform/qform, dtype by
    kind, atomic write), and the sidecar gets ``metadata`` plus ``Sources`` (BIDS URIs of
    ``source_files``) and default ``Units`` for map suffixes.

    Examples
    --------
    >>> sink = DerivativesDataSink(base_directory="/out/qmri", subject="01", suffix="R1map",
    ...                            raw_root="/data/raw", desc="fit")
    >>> sink.inputs.flip = 2
    """

    input_spec = _DerivativesDataSinkInputSpec
    output_spec = _DerivativesDataSinkOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np

        inputs = self.inputs
        image = nib.load(inputs.in_file)
        data = np.asanyarray(image.dataobj)
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

        out_file = write_map(
            inputs.base_directory,
            data,
            image.affine,
            subject=inputs.subject,
            session=inputs.session or None,
            suffix=inputs.suffix,
            datatype=None if inputs.datatype == "auto" else inputs.datatype,
            dtype=_DTYPES[inputs.dtype],
            metadata=metadata,
            header=image.header,
            **entities,
        )
        self._results["out_file"] = str(out_file)
        self._results["out_meta"] = str(sidecar_path(out_file))
        return runtime
