"""Nipype interface for the brain mask."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from ..core.masking import brain_mask, check_brain_mask
from ..io.derivatives import write_nifti
from ..io.images import load_volumes

LOGGER = logging.getLogger("nipype.interface")


class BrainMaskCheckError(RuntimeError):
    """The automatic brain mask failed its sanity checks."""


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="magnitude images on one grid (e.g. the first echo of each flip angle); "
        "their root-sum-of-squares is masked",
    )
    on_failed_check = traits.Enum(
        "error",
        "warn",
        usedefault=True,
        desc="what a mask failing the sanity checks of core.masking.check_brain_mask does: "
        "'error' stops with the problems listed, 'warn' logs them as a warning and goes on",
    )


class _BrainMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="brain mask (uint8)")
    problems = traits.List(traits.Str, desc="failed sanity checks (empty if none)")


class BrainMask(SimpleInterface):
    """Brain mask from magnitude images (see :func:`qmri_workflows.core.masking.brain_mask`).

    The mask is checked with :func:`qmri_workflows.core.masking.check_brain_mask` (hollow shell,
    field of view touched all round, under 5 % of the head, mostly background, a dark skull-like
    layer inside). A failed check raises :class:`BrainMaskCheckError` naming the images and the
    problems, before any mask is written, unless ``on_failed_check='warn'``: maps fitted in a wrong
    mask would look plausible and be wrong.
    """

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.in_files[0])
        magnitudes = load_volumes(self.inputs.in_files, reference=reference, require_variation=True)
        image = np.sqrt(np.square(magnitudes, dtype=np.float64).sum(axis=-1))
        voxel_size = reference.header.get_zooms()[:3]
        mask = brain_mask(image, voxel_size=voxel_size)
        problems = check_brain_mask(mask, image, voxel_size=voxel_size)
        if problems:
            names = ", ".join(os.path.basename(path) for path in self.inputs.in_files)
            message = (
                f"the automatic brain mask of {names} failed its sanity checks: "
                + "; ".join(problems)
                + ". The images should show a head (bright brain, darker skull or background); "
                "check them, e.g. for a wrong echo or an empty volume."
            )
            if self.inputs.on_failed_check == "error":
                raise BrainMaskCheckError(message)
            LOGGER.warning("WARNING: %s", message)
        self._results["problems"] = problems
        self._results["out_mask"] = str(
            write_nifti(os.path.join(runtime.cwd, "brain_mask.nii"), mask, reference.affine)
        )
        return runtime
