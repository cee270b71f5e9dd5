"""Nipype interface for the brain mask."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
)

from ..core.masking import brain_mask
from ..io.images import load_volumes
from ..io.derivatives import write_nifti


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="magnitude images on one grid (e.g. the first echo of each flip angle); "
        "their root-sum-of-squares is masked",
    )


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8)")


class BrainMask(SimpleInterface):
    """Brain mask from magnitude images (see :func:`qmri_workflows.core.masking.brain_mask`)."""

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.in_files[0])
        volumes = load_volumes(self.inputs.in_files, reference=reference)
        sum_of_squares = np.square(volumes, dtype=np.float64).sum(axis=-1)
        mask = brain_mask(np.sqrt(sum_of_squares), voxel_size=reference.header.get_zooms()[:3])
        self._results["out_mask"] = str(
            write_nifti(os.path.join(runtime.cwd, "brain_mask.nii"), mask, reference.affine)
        )
        return runtime
