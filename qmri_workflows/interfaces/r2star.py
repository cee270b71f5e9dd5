"""Nipype interfaces for R2*/T2* mapping from multi-echo spoiled gradient echoes."""

from __future__ import annotations

import logging
import os

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    InputMultiObject,
    OutputMultiObject,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.r2star import (
    MIN_RESIDUAL_DOF,
    T2STAR_MIN_SIGNIFICANCE,
    fit_estatics,
    t2star_where_significant,
)
from ..io.derivatives import write_nifti
from ..io.images import load_volume, load_volumes
from ._noise import measure_air_noise

ESTATICS_REFERENCE = (
    "Weiskopf N, Callaghan MF, Josephs O, Lutti A, Mohammadi S. Estimating the apparent transverse "
    "relaxation time (R2*) from images with different contrasts (ESTATICS) reduces motion artifacts. "
    "Front Neurosci 2014;8:278. doi:10.3389/fnins.2014.00278"
)

ESTIMATION_ALGORITHMS = {
    "wls": "ESTATICS: one R2* shared by all flip angles, one intercept per flip angle; "
    "log-linear least squares weighted by the squared model signal (iterated)",
    "nls": "ESTATICS: one R2* shared by all flip angles, one intercept per flip angle; "
    "non-linear least squares of the expected magnitude including the noise floor "
    "(Rician/non-central chi), initialised by the weighted log-linear fit",
}

LOGGER = logging.getLogger("qmri_workflows.interfaces")
_FILES_SHOWN = 4


def group_echoes_by_flip_angle(files, echo_times, flip_angles):
    """Group a flat list of echo files into contrasts, one per flip angle.

    Parameters
    ----------
    files, echo_times, flip_angles : sequence
        One entry per echo image; ``flip_angles`` (degrees) names the contrast of each image.

    Returns
    -------
    groups : list of (flip_angle, [(echo_time, file), ...])
        Sorted by flip angle, echoes sorted by echo time.
    """
    if not len(files) == len(echo_times) == len(flip_angles):
        raise ValueError(
            f"files ({len(files)}), echo_times ({len(echo_times)}) and flip_angles "
            f"({len(flip_angles)}) must have one entry per echo image"
        )
    groups: dict[float, list] = {}
    for path, te, flip in zip(files, echo_times, flip_angles):
        groups.setdefault(float(flip), []).append((float(te), path))
    return [(flip, sorted(echoes)) for flip, echoes in sorted(groups.items())]


def stack_contrasts(groups):
    """Load grouped echoes into ``signal[x, y, z, n_contrast, n_echo]`` and ``echo_times``.

    Contrasts with fewer echoes are padded with NaN, which the ESTATICS fit ignores.

    Raises
    ------
    BIDSInputError
        For an image that holds no signal (all zeros, constant, all NaN/Inf), naming the file.
    """
    n_echo = max(len(echoes) for _, echoes in groups)
    reference = nib.load(groups[0][1][0][1])
    shape = reference.shape[:3]
    echo_times = np.full((len(groups), n_echo), np.nan)
    for c, (_, echoes) in enumerate(groups):
        echo_times[c, : len(echoes)] = [te for te, _ in echoes]
    volumes = load_volumes(
        [path for _, echoes in groups for _, path in echoes], reference=reference, require_variation=True
    )
    if all(len(echoes) == n_echo for _, echoes in groups):
        return volumes.reshape(shape + (len(groups), n_echo)), echo_times, reference
    signal = np.full(shape + (len(groups), n_echo), np.nan, dtype=np.float32)
    first = 0
    for c, (_, echoes) in enumerate(groups):
        signal[..., c, : len(echoes)] = volumes[..., first : first + len(echoes)]
        first += len(echoes)
    return signal, echo_times, reference


class _FitR2starInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="magnitude image of every echo of every flip angle"
    )
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo time (s) of each file")
    flip_angles = traits.List(
        traits.Float,
        mandatory=True,
        desc="nominal flip angle (deg) of each file; groups contrasts (0 = not recorded)",
    )
    mask_file = File(exists=True, desc="voxels to fit (others are written as 0)")
    method = traits.Enum("wls", "nls", usedefault=True, desc="estimator (see EstimationAlgorithm)")
    n_coils = traits.Int(1, usedefault=True, desc="receive channels combined by root-sum-of-squares")
    noise_sigma = traits.Float(desc="noise SD per channel; estimated from air when 'nls' needs it")
    denoised = traits.Bool(
        False,
        usedefault=True,
        desc="the magnitudes are NLM-denoised and bias-corrected: no noise floor is modelled, and the "
        "noise of the air (that of the raw data) is not used",
    )
    chunk_size = traits.Int(200_000, usedefault=True, nohash=True, desc="voxels per fitting chunk")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads fitting chunks at once")


class _FitR2starOutputSpec(TraitedSpec):
    r2star_file = File(exists=True, desc="R2* (1/s); NaN where undetermined, 0 outside the mask")
    r2star_stderr_file = File(exists=True, desc="standard error of R2* (1/s); NaN where unknown, 0 outside the mask")
    t2star_file = File(
        exists=True,
        desc="T2* (s); NaN where R2* is not above zero by more than two standard errors, 0 outside the mask",
    )
    s0_files = OutputMultiObject(File(exists=True), desc="TE = 0 intercept, one per flip angle")
    flip_angles = traits.List(traits.Float, desc="flip angle (deg) of each S0 file")
    noise_sigma = traits.Float(desc="noise SD used by the fit (nan when unused)")
    metadata = traits.Dict(desc="EstimationAlgorithm, EstimationReference, protocol and voxel counts for sidecars")


class FitR2star(SimpleInterface):
    """Fit R2* (and one TE = 0 intercept per flip angle) with the ESTATICS model.

    Loads the echoes, calls :func:`qmri_workflows.core.r2star.fit_estatics` inside the mask and
    writes float32 maps on the input grid: R2*, its standard error, T2* where R2* is significantly
    positive (:func:`qmri_workflows.core.r2star.t2star_where_significant`) and the intercepts. NaN or
    infinite samples are left out of their voxel's fit; how many voxels had one, and how many R2*
    values are negative or not significant, goes to the log and into ``metadata``.
    """

    input_spec = _FitR2starInputSpec
    output_spec = _FitR2starOutputSpec

    def _run_interface(self, runtime):
        groups = group_echoes_by_flip_angle(
            self.inputs.magnitude_files, self.inputs.echo_times, self.inputs.flip_angles
        )
        signal, echo_times, reference = stack_contrasts(groups)
        mask = None
        if isdefined(self.inputs.mask_file):
            mask = load_volume(self.inputs.mask_file, reference=reference) > 0

        sigma = self._noise_sigma(signal, echo_times, reference, len(groups))
        s0, r2star, stderr = fit_estatics(
            signal,
            echo_times,
            sigma=sigma,
            n_coils=self.inputs.n_coils,
            method=self.inputs.method,
            mask=mask,
            chunk_size=self.inputs.chunk_size,
            n_jobs=self.inputs.num_threads,
            return_stderr=True,
        )
        fitted = mask if mask is not None else np.ones(r2star.shape, dtype=bool)
        t2star = np.where(fitted, t2star_where_significant(r2star, stderr), 0.0)
        counts = _quality_counts(signal, echo_times, r2star, t2star, fitted)
        _log_quality(counts, groups, signal, echo_times)
        cwd = runtime.cwd
        self._results["r2star_file"] = str(write_nifti(os.path.join(cwd, "R2starmap.nii"), r2star, reference.affine))
        self._results["r2star_stderr_file"] = str(
            write_nifti(os.path.join(cwd, "R2starmap_stderr.nii"), stderr, reference.affine)
        )
        self._results["t2star_file"] = str(write_nifti(os.path.join(cwd, "T2starmap.nii"), t2star, reference.affine))
        self._results["s0_files"] = [
            str(
                write_nifti(
                    os.path.join(cwd, f"S0map_flip{c + 1}.nii"),
                    s0[..., c],
                    reference.affine,
                )
            )
            for c in range(len(groups))
        ]
        self._results["flip_angles"] = [flip for flip, _ in groups]
        self._results["noise_sigma"] = float(sigma) if sigma is not None else float("nan")
        algorithm = ESTIMATION_ALGORITHMS[self.inputs.method]
        if self.inputs.denoised and self.inputs.method == "nls":
            algorithm = algorithm.replace(
                "including the noise floor (Rician/non-central chi)",
                "without a noise floor (the denoised magnitudes are bias-corrected)",
            )
        self._results["metadata"] = {
            "EstimationAlgorithm": algorithm,
            "EstimationReference": ESTATICS_REFERENCE,
            "EchoTime": [te for te, _ in groups[int(np.argmax([len(e) for _, e in groups]))][1]],
        }
        if all(flip > 0 for flip, _ in groups):
            self._results["metadata"]["FlipAngle"] = [flip for flip, _ in groups]
        if sigma is not None:
            self._results["metadata"]["NoiseStandardDeviationPerChannel"] = float(sigma)
            self._results["metadata"]["NumberOfReceiveChannels"] = self.inputs.n_coils
        self._results["metadata"].update(counts)
        return runtime

    def _noise_sigma(self, signal, echo_times, reference, n_contrasts):
        """The given noise SD, or the one measured in the air when the fit needs it.

        The non-linear fit models the noise floor; the standard error needs a noise level from
        elsewhere only where the fit leaves few residuals (see ``core.r2star.MIN_RESIDUAL_DOF``).
        """
        if isdefined(self.inputs.noise_sigma):
            return self.inputs.noise_sigma
        if self.inputs.denoised:
            # The second-moment correction removed the floor: the data are about the amplitude with
            # small Gaussian errors, and the raw noise in the air overstates them.
            return None
        residual_dof = int(np.isfinite(echo_times).sum()) - n_contrasts - 1
        if self.inputs.method != "nls" and residual_dof >= MIN_RESIDUAL_DOF:
            return None
        noise = measure_air_noise(
            signal[..., 0, 0], voxel_size=reference.header.get_zooms()[:3], n_coils=self.inputs.n_coils
        )
        if noise.sigma is not None:
            return noise.sigma
        problem = f"{noise.problem}: give noise_sigma explicitly"
        if self.inputs.method == "nls" and noise.air is None:
            # air that cannot be measured does not mean no floor (masked or cropped real data), and a
            # fit without one biases R2* where the signal is weak; air without noise means there is none
            raise ValueError(
                f"{problem} (in the BIDS App: use --r2star-method wls, which needs no noise level, or keep the noisy "
                "air around the head in the images)"
            )
        consequence = "the non-linear fit models no noise floor" if self.inputs.method == "nls" else ""
        if residual_dof < MIN_RESIDUAL_DOF:
            consequence += (" and " if consequence else "") + (
                "the R2* standard error rests on few residuals"
                if residual_dof > 0
                else "the R2* standard error and T2* are NaN (the fit leaves no residual)"
            )
        # Only a loss is worth a warning: with a few residuals the standard error is still made.
        level = logging.WARNING if self.inputs.method == "nls" or residual_dof < 1 else logging.INFO
        LOGGER.log(level, "R2*: %s; %s", problem, consequence)
        return None


def _quality_counts(signal, echo_times, r2star, t2star, fitted):
    """Sidecar fields counting the voxels a reader of the maps should know about."""
    present = np.isfinite(echo_times)  # NaN echo times pad contrasts with fewer echoes
    if present.all():  # a sum is non-finite exactly where a sample is: one pass, no 5-D mask
        non_finite = ~np.isfinite(signal.sum(axis=(-2, -1), dtype=np.float64))
    else:
        non_finite = (~np.isfinite(signal) & present).any(axis=(-2, -1))
    return {
        "NonFiniteInputVoxels": int(non_finite.sum()),
        "FittedVoxels": int(fitted.sum()),
        "UndeterminedR2starVoxels": int((fitted & ~np.isfinite(r2star)).sum()),
        "NegativeR2starVoxels": int((fitted & (r2star < 0)).sum()),
        "NonSignificantR2starVoxels": int((fitted & np.isfinite(r2star) & np.isnan(t2star)).sum()),
    }


def _log_quality(counts, groups, signal, echo_times):
    if counts["NonFiniteInputVoxels"]:
        from .denoise import input_name  # denoise imports this module

        per_file = sorted(
            (
                (count, input_name(path))
                for c, (_, echoes) in enumerate(groups)
                for e, (_, path) in enumerate(echoes)
                if (count := int((~np.isfinite(signal[..., c, e])).sum()))
            ),
            reverse=True,
        )
        # a long protocol can have dozens of files: the worst few say where to look
        shown = ", ".join(f"{name} ({count})" for count, name in per_file[:_FILES_SHOWN])
        if len(per_file) > _FILES_SHOWN:
            shown += f" and {len(per_file) - _FILES_SHOWN} more file(s)"
        LOGGER.warning(
            "R2*: %d voxel(s) hold NaN/Inf in at least one echo; those samples are left out of "
            "their voxel's fit. Most non-finite voxels: %s",
            counts["NonFiniteInputVoxels"],
            shown,
        )
    fitted = max(counts["FittedVoxels"], 1)
    for key, what in (
        ("UndeterminedR2starVoxels", "have fewer than two usable echoes: R2* and T2* are NaN"),
        ("NegativeR2starVoxels", "have a negative R2* (kept in the R2* map; T2* is NaN)"),
        (
            "NonSignificantR2starVoxels",
            f"have an R2* not above {T2STAR_MIN_SIGNIFICANCE:g} standard errors: T2* is NaN",
        ),
    ):
        if counts[key]:
            LOGGER.info(
                "R2*: %d of %d fitted voxels (%.1f %%) %s",
                counts[key],
                counts["FittedVoxels"],
                100.0 * counts[key] / fitted,
                what,
            )
