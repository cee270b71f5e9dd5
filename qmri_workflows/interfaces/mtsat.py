"""Nipype interface for MT saturation (MTsat, Helms 2008) from an MPM collection.

* :class:`ComputeMTsat` -- MTsat (p.u.) from the PD- and T1-weighted (mt-off) TE = 0 intercepts, the
  MT-weighted (mt-on) echoes brought to TE = 0 with the ESTATICS R2*, and the transmit field the R1
  fit used (Helms' empirical correction).
"""

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
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.relaxometry.mtsat import HELMS_B1_COEFFICIENT, mtsat
from ..io.derivatives import write_nifti
from ..io.images import load_volume, load_volumes

LOGGER = logging.getLogger("qmri_workflows.interfaces")

MTSAT_REFERENCES = (
    "Helms G, Dathe H, Kallenberg K, Dechent P. High-resolution maps of magnetization transfer with inherent "
    "correction for RF inhomogeneity and T1 relaxation obtained from 3D FLASH MRI. Magn Reson Med "
    "2008;60:1396-1407; erratum Magn Reson Med 2010;64:1856",
    "Weiskopf N, Suckling J, Williams G, et al. Quantitative multi-parameter mapping of R1, PD*, MT, and R2* "
    "at 3T: a multi-center validation. Front Neurosci 2013;7:95",
)


def mt_intercept(echoes, echo_times, r2star):
    """TE = 0 amplitude of the MT-weighted echoes under the ESTATICS model (shared R2*).

    With R2* known from the mt-off contrasts, each echo gives ``log S0 = log S_e + R2* TE_e``; the
    estimate is their mean weighted by ``S_e^2`` (the inverse variance of ``log S_e`` for Gaussian
    noise), which is the ESTATICS intercept of this contrast at that R2*.

    Parameters
    ----------
    echoes : ndarray (..., n_echoes)
        Magnitudes.
    echo_times : sequence of float
        Echo times (s).
    r2star : ndarray (...)
        R2* (1/s).

    Returns
    -------
    ndarray (...)
        NaN where no echo is positive or R2* is not finite.
    """
    echoes = np.asarray(echoes, dtype=float)
    te = np.asarray(echo_times, dtype=float)
    if echoes.shape[-1] != te.size:
        raise ValueError(f"{echoes.shape[-1]} MT-weighted echoes for {te.size} echo times")
    positive = echoes > 0
    weights = np.where(positive, echoes**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_s0 = np.log(np.where(positive, echoes, 1.0)) + np.asarray(r2star, dtype=float)[..., None] * te
        mean = (weights * log_s0).sum(axis=-1) / weights.sum(axis=-1)
    return np.exp(mean)


class _ComputeMTsatInputSpec(BaseInterfaceInputSpec):
    mt_off_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="mt-off signals, one per flip angle (TE = 0 intercepts or echo 1)"
    )
    mt_off_flip_angles = traits.List(traits.Float, mandatory=True, desc="their nominal flip angles (deg)")
    mt_off_repetition_time = traits.Float(mandatory=True, desc="TR (s) of the mt-off contrasts")
    mt_files = InputMultiObject(File(exists=True), mandatory=True, desc="MT-weighted (mt-on) echoes")
    mt_echo_times = traits.List(traits.Float, mandatory=True, desc="their echo times (s)")
    mt_flip_angle = traits.Float(mandatory=True, desc="nominal flip angle (deg) of the MT-weighted contrast")
    mt_repetition_time = traits.Float(mandatory=True, desc="TR (s) of the MT-weighted contrast")
    r2star_file = File(exists=True, desc="ESTATICS R2* (1/s): brings the MT-weighted echoes to TE = 0")
    mask_file = File(exists=True, desc="brain mask: MTsat is 0 outside")
    b1_correction = traits.Bool(True, usedefault=True, desc="apply Helms' empirical B1 correction with b1_file")
    b1_file = File(exists=True, desc="transmit ratio map (1 = nominal) the R1 fit used")
    b1_description = Str(desc="where the B1+ map comes from (for the sidecar)")
    b1_note = Str(desc="why there is no B1 correction (for the sidecar)")
    b1_coefficient = traits.Float(HELMS_B1_COEFFICIENT, usedefault=True, desc="C of (1 - C) / (1 - C B1)")


class _ComputeMTsatOutputSpec(TraitedSpec):
    mtsat_file = File(exists=True, desc="MTsat (p.u.), 0 outside the mask, NaN where undetermined")
    metadata = traits.Dict(desc="sidecar fields")


class ComputeMTsat(SimpleInterface):
    """MTsat (p.u.) by Helms' rational approximation (:func:`qmri_workflows.core.relaxometry.mtsat.mtsat`).

    The PD- and T1-weighted signals are the lowest and highest flip angle of ``mt_off_files``. With
    ``r2star_file`` the MT-weighted echoes are brought to TE = 0 with that R2* (:func:`mt_intercept`),
    as the mt-off intercepts are, so T2* decay cancels from the ratio; without it (single-echo data)
    the first echo of each contrast is used. As in the hMRI toolbox, apparent R1 and amplitude are
    computed at the nominal flip angles and the B1+ map enters only through the empirical correction
    ``(1 - C) / (1 - C B1)``.
    """

    input_spec = _ComputeMTsatInputSpec
    output_spec = _ComputeMTsatOutputSpec

    def _run_interface(self, runtime):
        flips = np.asarray(self.inputs.mt_off_flip_angles, dtype=float)
        if flips.size != len(self.inputs.mt_off_files) or flips.size < 2:
            raise ValueError(
                f"MTsat needs one mt-off signal per flip angle and two flip angles, got "
                f"{len(self.inputs.mt_off_files)} file(s) for {flips.tolist()} deg"
            )
        pd_index, t1_index = int(np.argmin(flips)), int(np.argmax(flips))
        reference = nib.load(self.inputs.mt_off_files[pd_index])
        pd_signal = load_volume(self.inputs.mt_off_files[pd_index], reference=reference).astype(float)
        t1_signal = load_volume(self.inputs.mt_off_files[t1_index], reference=reference).astype(float)
        mt_echoes = load_volumes(self.inputs.mt_files, reference=reference).astype(float)
        metadata = {
            "Units": "p.u.",
            "EstimationAlgorithm": (
                "MT saturation (Helms 2008): apparent R1 and amplitude from the PD- and T1-weighted (mt-off) "
                "signals by the rational approximation of the Ernst equation at the nominal flip angles, then the "
                "fraction of longitudinal magnetisation the MT pulse saturates per TR, in percent"
            ),
            "EstimationReference": "; ".join(MTSAT_REFERENCES),
            "FlipAngles": {
                "MTw": self.inputs.mt_flip_angle,
                "PDw": float(flips[pd_index]),
                "T1w": float(flips[t1_index]),
            },
            "RepetitionTimes": {
                "MTw": self.inputs.mt_repetition_time,
                "PDw": self.inputs.mt_off_repetition_time,
                "T1w": self.inputs.mt_off_repetition_time,
            },
        }
        if isdefined(self.inputs.r2star_file):
            r2star = load_volume(self.inputs.r2star_file, reference=reference).astype(float)
            mt_signal = mt_intercept(mt_echoes, self.inputs.mt_echo_times, np.nan_to_num(r2star, nan=0.0))
            metadata["MTwSignal"] = (
                "TE = 0 intercept of the MT-weighted echoes at the ESTATICS R2* of the mt-off contrasts; PDw and "
                "T1w: their ESTATICS TE = 0 intercepts"
            )
        else:
            mt_signal = mt_echoes[..., 0]
            metadata["MTwSignal"] = "first echo of each contrast (single-echo data: T2* decay not removed)"

        b1 = None
        if self.inputs.b1_correction and isdefined(self.inputs.b1_file):
            b1 = load_volume(self.inputs.b1_file, reference=reference).astype(float)
            b1 = np.where(b1 > 0, b1, np.nan)
            source = self.inputs.b1_description if isdefined(self.inputs.b1_description) else "the R1 fit's B1+ map"
            metadata["B1Correction"] = (
                f"Helms' empirical correction (1 - C) / (1 - C B1), C = {self.inputs.b1_coefficient:g}, with B1+ "
                f"from {source}"
            )
            metadata["B1CorrectionCoefficient"] = self.inputs.b1_coefficient
        else:
            note = self.inputs.b1_note if isdefined(self.inputs.b1_note) else "no B1+ map"
            metadata["B1Correction"] = f"none ({note}): only Helms' inherent first-order B1 independence"
            LOGGER.info("MTsat: not corrected for B1+ (%s)", note)

        result = mtsat(
            mt_signal,
            pd_signal,
            t1_signal,
            np.deg2rad([self.inputs.mt_flip_angle, flips[pd_index], flips[t1_index]]),
            [self.inputs.mt_repetition_time, self.inputs.mt_off_repetition_time, self.inputs.mt_off_repetition_time],
            b1=b1,
            b1_coefficient=self.inputs.b1_coefficient,
        )
        mask = np.ones(pd_signal.shape, dtype=bool)
        if isdefined(self.inputs.mask_file):
            mask = load_volume(self.inputs.mask_file, reference=reference) > 0
        values = np.where(mask, result.mtsat, 0.0).astype(np.float32)
        undetermined = int(np.count_nonzero(mask & ~np.isfinite(values)))
        metadata["UndeterminedVoxels"] = undetermined
        if undetermined:
            LOGGER.info("MTsat: %d brain voxels undetermined (non-positive signal or R1), set to NaN", undetermined)
        path = os.path.join(runtime.cwd, "MTsat.nii.gz")
        write_nifti(path, values, reference.affine)
        self._results["mtsat_file"] = path
        self._results["metadata"] = metadata
        return runtime
