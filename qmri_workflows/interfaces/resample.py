"""Nipype interface bringing an image onto the grid of the maps (see :mod:`qmri_workflows.io.resample`)."""

from __future__ import annotations

import os

import numpy as np
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from ..io.derivatives import write_nifti
from ..io.resample import KINDS, resample_to_reference


class _ResampleToReferenceInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="image to resample (e.g. a B1+ map or a label image)")
    reference_file = File(exists=True, mandatory=True, desc="image on the target grid (its data are not read)")
    kind = traits.Enum(
        *KINDS,
        usedefault=True,
        desc="linear: smooth fields (float32 out); nearest or majority: labels and masks "
        "(source dtype out; majority votes over the footprint when the source is finer)",
    )


class _ResampleToReferenceOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="in_file on the grid of reference_file (NaN/0 outside its field of view)")


class ResampleToReference(SimpleInterface):
    """Resample ``in_file`` onto the grid of ``reference_file`` through world coordinates."""

    input_spec = _ResampleToReferenceInputSpec
    output_spec = _ResampleToReferenceOutputSpec

    def _run_interface(self, runtime):
        resampled = resample_to_reference(self.inputs.in_file, self.inputs.reference_file, kind=self.inputs.kind)
        data = np.asanyarray(resampled.dataobj)
        name = os.path.basename(self.inputs.in_file).removesuffix(".gz").removesuffix(".nii")
        self._results["out_file"] = str(
            write_nifti(os.path.join(runtime.cwd, f"{name}_resampled.nii.gz"), data, resampled.affine, dtype=data.dtype)
        )
        return runtime
