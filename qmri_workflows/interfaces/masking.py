"""Nipype interface for the brain mask."""

from __future__ import annotations

import logging
import os
import re

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.masking import brain_mask, check_brain_mask
from ..io.derivatives import bids_path, write_nifti
from ..io.images import load_volume, load_volumes

LOGGER = logging.getLogger("nipype.interface")


class BrainMaskCheckError(RuntimeError):
    """The automatic brain mask failed its sanity checks."""


def _user_mask_path(image_path):
    """Where a user's brain mask for ``image_path``'s subject and session goes in a derivatives dataset."""
    name = os.path.basename(image_path)
    subject = re.match(r"sub-([a-zA-Z0-9]+)", name)
    session = re.search(r"_ses-([a-zA-Z0-9]+)", name)
    if subject is None:
        return "sub-<label>/anat/sub-<label>_desc-brain_mask.nii.gz"
    return bids_path(
        subject=subject.group(1), session=session.group(1) if session else None, suffix="mask", desc="brain"
    )


class _BrainMaskInputSpec(BaseInterfaceInputSpec):
    in_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="magnitude images on one grid (e.g. the first echo of each flip angle); "
        "their root-sum-of-squares is masked",
    )
    user_mask_file = File(
        exists=True,
        desc="a brain mask of the user's (given with --derivatives), on the grid of the first of "
        "in_files: used instead of the automatic mask; a failed sanity check only warns, as the "
        "user chose it",
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
    layer inside, low in the head along the affine's superior axis). A failed check raises
    :class:`BrainMaskCheckError` naming the images, the problems and the fix (a user mask given
    with ``--derivatives``), before any mask is written, unless ``on_failed_check='warn'``: maps
    fitted in a wrong mask would look plausible and be wrong. With ``user_mask_file`` that mask
    is used instead of the automatic one (it is checked too, but a failed check only warns).
    """

    input_spec = _BrainMaskInputSpec
    output_spec = _BrainMaskOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.in_files[0])
        magnitudes = load_volumes(self.inputs.in_files, reference=reference, require_variation=True)
        image = np.sqrt(np.square(magnitudes, dtype=np.float64).sum(axis=-1))
        voxel_size = reference.header.get_zooms()[:3]
        if isdefined(self.inputs.user_mask_file):
            mask = load_volume(self.inputs.user_mask_file, reference=reference) > 0
            problems = check_brain_mask(mask, image, voxel_size=voxel_size, affine=reference.affine)
            if problems:
                LOGGER.warning(
                    "WARNING: the brain mask %s given with --derivatives fails sanity checks (%s); "
                    "it is used as given: check it against the images",
                    os.path.basename(self.inputs.user_mask_file),
                    "; ".join(problems),
                )
            return self._write(runtime, mask, reference, problems)
        mask = brain_mask(image, voxel_size=voxel_size)
        problems = check_brain_mask(mask, image, voxel_size=voxel_size, affine=reference.affine)
        if problems:
            names = ", ".join(os.path.basename(path) for path in self.inputs.in_files)
            message = (
                f"the automatic brain mask of {names} failed its sanity checks: "
                + "; ".join(problems)
                + ". The images should show a head (bright brain, darker skull or background) with "
                "a correct orientation in the header; check them, e.g. for a wrong echo or an empty "
                "volume, or give a brain mask of your own with --derivatives (a BIDS derivatives "
                f"dataset holding {_user_mask_path(self.inputs.in_files[0])})."
            )
            if self.inputs.on_failed_check == "error":
                raise BrainMaskCheckError(message)
            LOGGER.warning("WARNING: %s", message)
        return self._write(runtime, mask, reference, problems)

    def _write(self, runtime, mask, reference, problems):
        self._results["problems"] = problems
        self._results["out_mask"] = str(
            write_nifti(os.path.join(runtime.cwd, "brain_mask.nii"), mask, reference.affine)
        )
        return runtime
