"""Nipype interfaces for proton density: receive sensitivity, PD calibration and a map-free B1+ estimate."""

from __future__ import annotations

import logging
import math
import os

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

from ..core.relaxometry.b1_free import estimate_b1_from_vfa
from ..core.relaxometry.pd import PD_REFERENCES, calibrate_pd, receive_bias_from_r1, receive_sensitivity
from ..io.derivatives import write_nifti
from ..io.errors import BIDSInputError
from ..io.images import load_volume, load_volumes, read_image
from ..io.resample import load_on_grid, resample_to_reference

RB1COR_REFERENCE = (
    "Papp D, Callaghan MF, Meyer H, Buckley C, Weiskopf N. Correction of inter-scan motion artifacts in "
    "quantitative R1 mapping by accounting for receive coil sensitivity effects. Magn Reson Med "
    "2016;76:1478-1485. doi:10.1002/mrm.26058"
)
R1_BIAS_REFERENCE = (
    "Volz S, Nöth U, Deichmann R. Correction of systematic errors in quantitative proton density mapping. "
    "Magn Reson Med 2012;68:74-85. doi:10.1002/mrm.23206"
)
PD_CALIBRATION_REFERENCE = (
    "Tofts P. PD: proton density of tissue water. In: Tofts P, ed. Quantitative MRI of the Brain. "
    "Chichester: Wiley; 2003, chapter 4"
)
UNICORT_REFERENCE = (
    "Weiskopf N, Lutti A, Helms G, Novak M, Ashburner J, Hutton C. Unified segmentation based correction "
    "of R1 brain maps for RF transmit field inhomogeneities (UNICORT). NeuroImage 2011;54:2116-2124. "
    "doi:10.1016/j.neuroimage.2010.10.023"
)

RECEIVE_CORRECTIONS = {
    "rb1cor": "receive sensitivity from the RB1COR head/body-coil pair (ratio of the smoothed images)",
    "r1_relation": "receive field estimated from the linear relation between 1/PD and R1 in grey and white "
    "matter (smooth polynomial field, no body-coil pair)",
    "none": "no receive-sensitivity correction (PD carries the receive field of the coil)",
}


def _existing(path, what, fix):
    """The path, or a BIDSInputError naming it and the fix."""
    if not os.path.isfile(path):
        raise BIDSInputError(f"{what} {path} does not exist; {fix}")
    return path


LOGGER = logging.getLogger("qmri_workflows.interfaces")


class _ReceiveSensitivityInputSpec(BaseInterfaceInputSpec):
    head_file = File(mandatory=True, desc="RB1COR image acquired with the head (receive array) coil")
    body_file = File(mandatory=True, desc="RB1COR image acquired with the body coil, same protocol")
    reference_file = File(exists=True, mandatory=True, desc="image on the grid of the maps (e.g. M0map)")
    mask_file = File(exists=True, desc="brain mask on the map grid: sets the normalisation (median 1)")
    smoothing_fwhm = traits.Float(12.0, usedefault=True, desc="FWHM (mm) of the smoothing of both images")


class _ReceiveSensitivityOutputSpec(TraitedSpec):
    receive_file = File(exists=True, desc="relative receive sensitivity (ratio) on the map grid")
    metadata = traits.Dict(desc="Units, EstimationAlgorithm and EstimationReference for the sidecar")


class ReceiveSensitivity(SimpleInterface):
    """Receive sensitivity of the head coil from an RB1COR head/body pair, on the map grid.

    The ratio of the smoothed images (:func:`qmri_workflows.core.relaxometry.pd.receive_sensitivity`)
    is formed on the head-coil image's grid (a body-coil image on another grid is resampled onto it
    first), then resampled (linear) onto the grid of ``reference_file``. A pair whose field of view
    misses part of the brain mask is an input error.
    """

    input_spec = _ReceiveSensitivityInputSpec
    output_spec = _ReceiveSensitivityOutputSpec

    def _run_interface(self, runtime):
        fix = "give both images of the RB1COR pair (acq-head*/acq-body*) or turn the receive correction off"
        head_path = _existing(self.inputs.head_file, "RB1COR head-coil image", fix)
        body_path = _existing(self.inputs.body_file, "RB1COR body-coil image", fix)
        head_image = read_image(head_path)
        head = load_volume(head_path, require_variation=True)
        body = load_on_grid(body_path, head_image)
        if np.isnan(body).mean() > 0.5:
            raise BIDSInputError(
                f"the body-coil image {body_path} covers less than half of the head-coil image {head_path}: "
                "the RB1COR pair must be acquired with the same field of view"
            )
        voxel_size = head_image.header.get_zooms()[:3]
        sensitivity = receive_sensitivity(head, body, voxel_size=voxel_size, smoothing_fwhm=self.inputs.smoothing_fwhm)
        on_grid = nib.Nifti1Image(sensitivity.astype(np.float32), head_image.affine)
        reference = read_image(self.inputs.reference_file)
        resampled = np.asarray(
            resample_to_reference(on_grid, reference, kind="linear", name=str(head_path)).dataobj, dtype=float
        )
        if isdefined(self.inputs.mask_file):
            mask = load_on_grid(self.inputs.mask_file, reference, kind="nearest", dtype=np.float32) > 0
            outside = mask & ~np.isfinite(resampled)
            if np.any(outside):
                raise BIDSInputError(
                    f"the RB1COR pair ({head_path}) does not cover {int(outside.sum())} voxels of the brain mask "
                    f"({100 * outside.mean() / max(mask.mean(), 1e-12):.0f} % of the brain): re-acquire it with a "
                    "field of view covering the head, or turn the receive correction off"
                )
            resampled /= np.median(resampled[mask])
        self._results["receive_file"] = str(
            write_nifti(os.path.join(runtime.cwd, "RB1map.nii"), np.nan_to_num(resampled, nan=0.0), reference.affine)
        )
        self._results["metadata"] = {
            "Units": "arbitrary",
            "EstimationAlgorithm": RECEIVE_CORRECTIONS["rb1cor"]
            + f", {self.inputs.smoothing_fwhm:g} mm FWHM, normalised to median 1 over the brain",
            "EstimationReference": RB1COR_REFERENCE,
            "Sources": [str(head_path), str(body_path)],
        }
        return runtime


class _CalibratePDInputSpec(BaseInterfaceInputSpec):
    m0_file = File(exists=True, mandatory=True, desc="apparent M0 (T2*-decay and B1 corrected)")
    r1_file = File(exists=True, mandatory=True, desc="R1 map (1/s) on the M0 grid")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    receive_file = File(exists=True, desc="receive sensitivity on the map grid (from ReceiveSensitivity)")
    receive_correction = traits.Bool(
        True,
        usedefault=True,
        desc="correct the receive field: with receive_file when given, else from the 1/PD-R1 relation",
    )
    reference = traits.Enum("csf", "wm", usedefault=True, desc="calibration reference (CSF 100 % or WM 69 %)")


class _CalibratePDOutputSpec(TraitedSpec):
    pd_file = File(exists=True, desc="PD (percent water); 0 outside the brain mask")
    receive_file = File(exists=True, desc="receive field used (ratio), when one was")
    metadata = traits.Dict(desc="Units, EstimationAlgorithm, calibration for the sidecar")


class CalibratePD(SimpleInterface):
    """PD in percent water from M0 and R1: receive correction, then calibration on CSF or WM.

    Which receive correction was used (RB1COR pair, the 1/PD-R1 estimate, or none) is stated in
    ``metadata["EstimationAlgorithm"]`` and ``metadata["ReceiveCorrection"]``.
    """

    input_spec = _CalibratePDInputSpec
    output_spec = _CalibratePDOutputSpec

    def _run_interface(self, runtime):
        reference = read_image(self.inputs.m0_file)
        m0 = load_volume(self.inputs.m0_file, dtype=np.float64)
        r1 = load_volume(self.inputs.r1_file, dtype=np.float64, reference=reference)
        mask = load_on_grid(self.inputs.mask_file, reference, kind="nearest", dtype=np.float32) > 0
        voxel_size = reference.header.get_zooms()[:3]
        receive = None
        correction = "none"
        fallback = None
        if self.inputs.receive_correction and isdefined(self.inputs.receive_file):
            receive = load_on_grid(self.inputs.receive_file, reference, kind="linear", dtype=np.float64)
            correction = "rb1cor"
        elif self.inputs.receive_correction:
            try:
                receive = receive_bias_from_r1(m0, r1, mask, voxel_size=voxel_size).field
                correction = "r1_relation"
            except ValueError as error:
                # Too little tissue for the estimate (a small field of view, a partial brain): PD is
                # still worth having, uncorrected and said so, rather than losing the subject.
                fallback = f"receive field not corrected: {error}"
                LOGGER.warning("PD: %s", fallback)
        calibration, result, note = _calibrate_with_fallback(m0, r1, mask, receive, self.inputs.reference)
        if note:
            LOGGER.warning("PD: %s", note)
            fallback = f"{fallback}; {note}" if fallback else note
        if result is None:
            pd = np.where(mask, m0 / receive if receive is not None else m0, 0.0)
        else:
            pd = np.where(mask, result.pd, 0.0)
        self._results["pd_file"] = str(write_nifti(os.path.join(runtime.cwd, "PDmap.nii"), pd, reference.affine))
        if receive is not None:
            self._results["receive_file"] = str(
                write_nifti(os.path.join(runtime.cwd, "RB1map_used.nii"), receive, reference.affine)
            )
        if result is None:
            self._results["metadata"] = {
                "Units": "arbitrary",
                "EstimationAlgorithm": (
                    "M0 (T2*-decay corrected ESTATICS intercepts, B1 corrected) divided by the "
                    f"{RECEIVE_CORRECTIONS[correction]}; NOT calibrated (no reference tissue found)"
                ),
                "ReceiveCorrection": correction,
                "CalibrationReference": "none",
            }
        else:
            target = PD_REFERENCES[calibration]
            name = {"csf": "cerebrospinal fluid", "wm": "white matter"}[calibration]
            self._results["metadata"] = {
                "Units": "percent",
                "EstimationAlgorithm": (
                    "M0 (T2*-decay corrected ESTATICS intercepts, B1 corrected) divided by the "
                    f"{RECEIVE_CORRECTIONS[correction]}; "
                    f"calibrated so that {name} (found from R1) holds {target:g} % water"
                ),
                "ReceiveCorrection": correction,
                "CalibrationReference": calibration.upper(),
                "CalibrationReferencePD": target,
                "CalibrationReferenceVoxels": int(np.count_nonzero(result.reference_region)),
            }
        if fallback:
            self._results["metadata"]["CalibrationNote"] = fallback
        # Every method the map went through is cited: the calibration on a reference tissue (also
        # without a receive correction, e.g. with --no-receive-correction) and the receive correction.
        references = [PD_CALIBRATION_REFERENCE] if result is not None else []
        references += {"r1_relation": [R1_BIAS_REFERENCE], "rb1cor": [RB1COR_REFERENCE]}.get(correction, [])
        if references:
            self._results["metadata"]["EstimationReference"] = references
        return runtime


def _calibrate_with_fallback(m0, r1, mask, receive, reference):
    """Calibrate on ``reference``, else on the other tissue, else not at all.

    Returns ``(tissue, calibration or None, note)``. A field of view without ventricles, or data
    whose R1 shows no tissue classes, still give a PD map; the note says what was done instead.
    """
    try:
        return reference, calibrate_pd(m0, r1, mask, receive=receive, reference=reference), None
    except ValueError as error:
        first_error = error
    other = "wm" if reference == "csf" else "csf"
    try:
        result = calibrate_pd(m0, r1, mask, receive=receive, reference=other)
    except ValueError as error:
        return (
            None,
            None,
            (
                f"neither a CSF nor a white-matter reference region found from R1 ({first_error}; {error}): "
                "PD is written uncalibrated (arbitrary units)"
            ),
        )
    return other, result, f"{first_error}; calibrated on {other.upper()} instead"


class _EstimateB1FromVFAInputSpec(BaseInterfaceInputSpec):
    signal_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="TE = 0 intercept (or single-echo magnitude) per flip angle"
    )
    flip_angles = traits.List(traits.Float, mandatory=True, desc="nominal flip angle (deg) of each file")
    repetition_time = traits.Float(mandatory=True, desc="TR (s)")
    mask_file = File(exists=True, mandatory=True, desc="brain mask")
    degree = traits.Int(4, usedefault=True, desc="polynomial degree of the log field")
    no_map_reason = traits.Str(desc="why there is no measured B1+ map (recorded in the description)")


class _EstimateB1FromVFAOutputSpec(TraitedSpec):
    b1_file = File(exists=True, desc="TB1map: actual / nominal flip angle in percent")
    description = traits.Str(desc="how b1_file was made, for the sidecar of the maps corrected with it")
    metadata = traits.Dict(desc="Units, EstimationAlgorithm and EstimationReference for the sidecar")


class EstimateB1FromVFA(SimpleInterface):
    """Map-free B1+ (TB1map, percent) from the VFA data alone (UNICORT-like, see
    :mod:`qmri_workflows.core.relaxometry.b1_free` for what it assumes)."""

    input_spec = _EstimateB1FromVFAInputSpec
    output_spec = _EstimateB1FromVFAOutputSpec

    def _run_interface(self, runtime):
        files = list(self.inputs.signal_files)
        flips = list(self.inputs.flip_angles)
        if len(files) != len(flips) or len(set(flips)) < 2:
            raise BIDSInputError(
                f"a map-free B1 estimate needs images at two or more distinct flip angles, got {len(files)} "
                f"file(s) at flip angles {flips} deg: {', '.join(map(str, files))}"
            )
        if not all(math.isfinite(f) and 0 < f < 90 for f in flips):
            raise BIDSInputError(f"flip angles must be in (0, 90) degrees, got {flips} for {', '.join(files)}")
        reference = read_image(files[0])
        signals = load_volumes(files, reference=reference, require_variation=True).astype(np.float64)
        mask = load_on_grid(self.inputs.mask_file, reference, kind="nearest", dtype=np.float32) > 0
        why = f"{self.inputs.no_map_reason}; " if isdefined(self.inputs.no_map_reason) else ""
        try:
            estimate = estimate_b1_from_vfa(
                signals,
                np.radians(flips),
                self.inputs.repetition_time,
                mask,
                voxel_size=reference.header.get_zooms()[:3],
                degree=self.inputs.degree,
                fit_map=False,
            )
        except ValueError as error:
            # Too little brain for the estimate: the fit goes on at the nominal angles, and says so.
            note = f"none: {why}the map-free B1+ estimate failed ({error}); nominal flip angles assumed"
            LOGGER.warning("B1+: %s", note)
            self._results["b1_file"] = str(
                write_nifti(os.path.join(runtime.cwd, "TB1map.nii"), np.full(mask.shape, 100.0), reference.affine)
            )
            self._results["description"] = note
            self._results["metadata"] = {"Units": "percent", "EstimationAlgorithm": note, "FlipAngle": flips}
            return runtime
        self._results["description"] = (
            f"estimated from the VFA data ({why}no measured map): smooth field, R1 constant within three "
            "tissue classes, mean B1+ 1 over the brain (UNICORT-like)"
        )
        self._results["b1_file"] = str(
            write_nifti(os.path.join(runtime.cwd, "TB1map.nii"), 100.0 * estimate.b1, reference.affine)
        )
        self._results["metadata"] = {
            "Units": "percent",
            "EstimationAlgorithm": (
                "map-free estimate from the VFA data (no B1 map): R1 assumed piecewise constant per tissue "
                "class (three-class mixture on log R1) and B1+ smooth (polynomial of degree "
                f"{self.inputs.degree} in log B1), fitted by expectation-maximisation; mean over the brain "
                "fixed to 100 % (transmitter calibration)"
            ),
            "EstimationReference": UNICORT_REFERENCE,
            "FlipAngle": flips,
        }
        return runtime
