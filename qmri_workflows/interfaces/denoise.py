"""Nipype interface denoising the magnitude images of one collection before any fit."""

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

from ..core.denoise import multispectral_denoise, multispectral_denoise_complex, nlmeans_volumes
from ..core.noise import estimate_effective_coils, estimate_sigma_map
from ..io.derivatives import write_nifti
from ..io.images import check_phase_radians, load_phases, load_volumes
from ..io.resample import load_on_grid
from ._noise import measure_air_noise

LOGGER = logging.getLogger("qmri_workflows.interfaces")

#: Added to an input file's name for its denoised copy (:func:`input_name` takes it off again).
DENOISED_SUFFIX = "_desc-denoised"

DENOISE_METHODS = ("none", "nlm", "multispectral")

DENOISING_DESCRIPTIONS = {
    "nlm": "non-local means of each magnitude image on its own (dipy nlmeans, classic), weights from its own patches",
    "multispectral": "multispectral non-local means: one set of weights for all magnitude images of the "
    "collection (patch distances summed over every echo and flip angle, after projection on the principal "
    "components of the noise-whitened images that carry signal), then the removed residual given back where "
    "its local mean stands above the noise (Wiener gain, over neighbours of similar denoised signal)",
}
COMPLEX_DENOISING = (
    "complex data (magnitude and phase): the real and imaginary parts of every image averaged with the "
    "weights (Gaussian noise: no bias correction; root-sum-of-squares magnitudes of N channels first lose the "
    "noise power orthogonal to the signal, 2 (N - 1) sigma^2); magnitude and phase of the result"
)
BIAS_CORRECTION = (
    "second moment averaged with the NLM weights, minus the noise power 2 N sigma^2 (sigma from the "
    "noise map), square root; 0 where it is below the noise power"
)
DENOISING_REFERENCES = (
    "Manjon JV et al. MRI denoising using non-local means. Med Image Anal 2008;12:514-523. "
    "doi:10.1016/j.media.2008.02.004; Manjon JV et al. Multicomponent MR image denoising. Int J Biomed "
    "Imaging 2009:756897; Aja-Fernandez S, Pieciak T, Vegas-Sanchez-Ferrero G. Spatially variant noise "
    "estimation in MRI: a homomorphic approach. Med Image Anal 2015;20:184-197"
)


def input_name(path):
    """The name (no folder, no extension) of the input file that ``path`` is, or is the denoised copy of:
    what a message about its values should name, since denoising keeps missing samples missing."""
    name = os.path.basename(str(path))
    for extension in (".nii.gz", ".nii"):
        name = name.removesuffix(extension)
    return name.removesuffix(DENOISED_SUFFIX)


class _DenoiseInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(File(exists=True), mandatory=True, desc="magnitude images of one collection")
    mask_file = File(
        exists=True, desc="voxels to denoise (others keep their raw values); resampled (nearest) if on another grid"
    )
    echo_times = traits.List(traits.Float, desc="echo time (s) of each file (structure-free noise residuals)")
    flip_angles = traits.List(traits.Float, desc="flip angle (deg) of each file: one echo train per flip angle")
    method = traits.Enum(
        "multispectral", "nlm", "none", usedefault=True, desc="denoising method ('none': noise map only)"
    )
    phase_files = InputMultiObject(
        File(exists=True),
        desc="phase of each magnitude file (complex data, e.g. bSSFP phase cycles): multispectral denoising then "
        "averages the real and imaginary parts, and the phase comes out denoised too",
    )
    phase_scale = traits.Float(desc="factor from the stored phase values to radians")
    n_coils = traits.Int(1, usedefault=True, desc="receive channels combined by root-sum-of-squares")
    patch_radius = traits.Int(1, usedefault=True, desc="patch radius (voxels)")
    search_radius = traits.Int(2, usedefault=True, desc="search radius (voxels)")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads of dipy's nlmeans")


class _DenoiseOutputSpec(TraitedSpec):
    denoised_files = OutputMultiObject(File(exists=True), desc="denoised magnitude, in the order of the input")
    denoised_phase_files = OutputMultiObject(
        File(exists=True), desc="the phase the fits should read: denoised (radians) or the input phase files"
    )
    denoised_phase_scale = traits.Float(desc="factor from denoised_phase_files' values to radians")
    noise_map_file = File(exists=True, desc="noise SD per channel, voxel by voxel (0 when unmeasurable)")
    metadata = traits.Dict(desc="sidecar fields describing the denoising")
    applied = traits.Bool(
        desc="the images were denoised; False: denoised_files are the inputs, raw (method 'none', or no noise "
        "level in the air), noise floor included"
    )


class DenoiseCollection(SimpleInterface):
    """Estimate the noise and denoise every magnitude image of a collection.

    The global noise SD and the effective number of coils are measured in the air of the first
    image (:func:`~qmri_workflows.interfaces._noise.measure_air_noise`,
    :func:`qmri_workflows.core.noise.estimate_effective_coils`); the noise map by the homomorphic
    approach on all images (:func:`qmri_workflows.core.noise.estimate_sigma_map`). Non-local means
    (:mod:`qmri_workflows.core.denoise`) with that map then gives the bias-corrected amplitude.
    Without measurable noise in the air (noiseless simulations), the images pass through unchanged
    and the metadata say so.
    """

    input_spec = _DenoiseInputSpec
    output_spec = _DenoiseOutputSpec

    def _run_interface(self, runtime):
        files = list(self.inputs.magnitude_files)
        reference = nib.load(files[0])
        images = load_volumes(files, reference=reference, require_variation=True)
        voxel_size = reference.header.get_zooms()[:3]
        mask = None
        if isdefined(self.inputs.mask_file):
            # a collection on another grid than the maps (bSSFP) gets the brain mask by nearest neighbour
            mask = load_on_grid(self.inputs.mask_file, reference, kind="nearest") > 0
        n_coils = self.inputs.n_coils
        metadata = {"DenoisingMethod": self.inputs.method}
        complex_data = isdefined(self.inputs.phase_files) and len(self.inputs.phase_files) > 0
        if complex_data:  # unless multispectral denoises it, the fits read the input phase (and check it)
            self._results["denoised_phase_files"] = list(self.inputs.phase_files)
            if isdefined(self.inputs.phase_scale):
                self._results["denoised_phase_scale"] = float(self.inputs.phase_scale)
        # the effective number of coils below is measured in the same air
        noise = measure_air_noise(images[..., 0], voxel_size=voxel_size, n_coils=n_coils)
        sigma, in_air, problem = noise.sigma, noise.air, noise.problem
        if sigma is None:
            if self.inputs.method == "none":
                LOGGER.info("Noise map not estimated: %s", problem)
            else:
                LOGGER.warning(
                    "Denoising skipped for %s: %s; the fits use the raw magnitude images (--denoise none says "
                    "so without this warning)",
                    files[0],
                    problem,
                )
            self._results["denoised_files"] = files
            self._results["applied"] = False
            self._write_noise_map(runtime, np.zeros(images.shape[:3], dtype=np.float32), reference)
            metadata["Denoising"] = f"none: {problem}"
            self._results["metadata"] = metadata
            return runtime
        if self.inputs.method == "none":
            sigma_map = self._noise_map(images, n_coils, sigma, voxel_size)
            self._write_noise_map(runtime, sigma_map, reference)
            self._results["denoised_files"] = files
            self._results["applied"] = False
            metadata.update({"Denoising": "none", "NoiseStandardDeviationAir": float(sigma)})
            self._results["metadata"] = metadata
            return runtime
        n_effective, sigma_effective = estimate_effective_coils(images[..., 0][in_air])
        sigma_map = self._noise_map(images, n_coils, sigma, voxel_size)
        radii = {"patch_radius": self.inputs.patch_radius, "search_radius": self.inputs.search_radius}
        if self.inputs.method == "nlm":
            denoised = nlmeans_volumes(
                images, sigma_map, mask=mask, n_coils=n_coils, num_threads=self.inputs.num_threads, **radii
            )
        elif not complex_data:
            denoised, details = multispectral_denoise(images, sigma_map, mask=mask, n_coils=n_coils, **radii)
            metadata["DenoisingSimilarityComponents"] = details["similarity_components"]
            metadata["DenoisingRestoredFraction"] = round(details["restored_fraction"], 4)
        else:
            denoised, denoised_phases, details = multispectral_denoise_complex(
                images, self._phases(reference, len(files)), sigma_map, mask=mask, n_coils=n_coils, **radii
            )
            self._write_phases(runtime, denoised_phases, reference)
            metadata["DenoisingComplex"] = True
            metadata["DenoisingSimilarityComponents"] = details["similarity_components"]
            metadata["DenoisingRestoredFraction"] = round(details["restored_fraction"], 4)
        outputs = []
        for index, path in enumerate(files):
            target = os.path.join(runtime.cwd, f"{input_name(path)}{DENOISED_SUFFIX}.nii")
            outputs.append(str(write_nifti(target, denoised[..., index], reference.affine)))
        self._results["denoised_files"] = outputs
        self._results["applied"] = True
        self._write_noise_map(runtime, sigma_map, reference)
        inside = sigma_map[mask] if mask is not None else sigma_map
        metadata.update(
            {
                "Denoising": f"{DENOISING_DESCRIPTIONS[self.inputs.method]}; "
                + (COMPLEX_DENOISING if "DenoisingComplex" in metadata else f"bias correction: {BIAS_CORRECTION}"),
                "DenoisingReference": DENOISING_REFERENCES,
                "DenoisingPatchRadius": self.inputs.patch_radius,
                "DenoisingSearchRadius": self.inputs.search_radius,
                "NoiseStandardDeviationAir": float(sigma),
                "NoiseStandardDeviationMedianInMask": float(np.median(inside)),
                "NumberOfReceiveChannels": n_coils,
                "EffectiveNumberOfCoilsAir": round(n_effective, 3),
                "EffectiveNoiseStandardDeviationAir": sigma_effective,
            }
        )
        LOGGER.info(
            "Denoising (%s): noise SD %.4g in the air, median %.4g in the mask, effective coils %.2f",
            self.inputs.method,
            sigma,
            float(np.median(inside)),
            n_effective,
        )
        self._results["metadata"] = metadata
        return runtime

    def _phases(self, reference, n_files):
        """The phase in radians (X, Y, Z, n_files), its units checked image by image."""
        phase_files = list(self.inputs.phase_files)
        scale = self.inputs.phase_scale if isdefined(self.inputs.phase_scale) else None
        if len(phase_files) != n_files:
            raise ValueError(f"{len(phase_files)} phase files for {n_files} magnitude files")
        phases = load_phases(phase_files, [scale] * n_files, reference=reference)
        for index, path in enumerate(phase_files):
            check_phase_radians(phases[..., index], path, scale, image="image")
        return phases  # a missing phase sample makes its complex sample missing (NaN out)

    def _write_phases(self, runtime, phases, reference):
        outputs = []
        for index, path in enumerate(self.inputs.phase_files):
            target = os.path.join(runtime.cwd, f"{input_name(path)}{DENOISED_SUFFIX}.nii")
            outputs.append(str(write_nifti(target, phases[..., index], reference.affine)))
        self._results["denoised_phase_files"] = outputs
        self._results["denoised_phase_scale"] = 1.0

    def _write_noise_map(self, runtime, sigma_map, reference):
        path = write_nifti(os.path.join(runtime.cwd, "noise_sigmamap.nii"), sigma_map, reference.affine)
        self._results["noise_map_file"] = str(path)

    def _noise_map(self, images, n_coils, sigma, voxel_size):
        return estimate_sigma_map(
            images, n_coils=n_coils, sigma_global=sigma, voxel_size=voxel_size, echo_trains=self._echo_trains()
        )

    def _echo_trains(self):
        """Indices of the files of each flip angle in echo-time order (None without echo times)."""
        if not isdefined(self.inputs.echo_times):
            return None
        echo_times = list(self.inputs.echo_times)
        flips = list(self.inputs.flip_angles) if isdefined(self.inputs.flip_angles) else [0.0] * len(echo_times)
        if not len(echo_times) == len(flips) == len(self.inputs.magnitude_files):
            raise ValueError(
                f"echo_times ({len(echo_times)}) and flip_angles ({len(flips)}) need one entry per "
                f"magnitude file ({len(self.inputs.magnitude_files)})"
            )
        trains = {}
        for index, (echo_time, flip) in enumerate(zip(echo_times, flips)):
            trains.setdefault(flip, []).append((echo_time, index))
        return [[index for _, index in sorted(train)] for train in trains.values()]
