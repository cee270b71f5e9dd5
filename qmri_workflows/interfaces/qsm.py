"""Nipype interfaces for quantitative susceptibility mapping, one per swappable step.

Each interface loads NIfTI files, calls one step of :mod:`qmri_workflows.core.qsm` and writes
float32 ``.nii`` files into its node folder:

1. :class:`TotalField` -- phase units checked on every echo, flip angles combined, echo-referenced
   unwrapping, total field (Hz) and its noise SD;
2. :class:`QSMMask` -- the brain mask minus unreliable voxels at its edge;
3. :class:`RemoveBackground` -- local field (Hz);
4. :class:`InvertDipole` -- susceptibility (ppm, not yet referenced);
5. :class:`ReferenceSusceptibility` -- the referenced ``Chimap`` and the sidecar fields of the chain.

The phase is assumed coil-combined (one phase image per echo). The B0 direction and the voxel size
come from the image affine (:func:`b0_direction_from_affine`, :func:`voxel_size_from_affine`).
"""

from __future__ import annotations

import csv
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
    isdefined,
    traits,
)

from ..core.qsm import (
    combine_series,
    estimate_csf_mask,
    fit_field_complex,
    fit_field_linear,
    hz_to_ppm,
    invert_ilsqr,
    invert_l2_gradient,
    invert_tkd,
    invert_tv_admm,
    mask_interior,
    ppm_to_hz,
    reference_to_region,
    reliable_edge_mask,
    remove_background_lbv,
    remove_background_pdf,
    remove_background_vsharp,
    unwrap_echoes,
)
from ..io.derivatives import write_nifti
from ..io.images import check_phase_radians, load_phases, load_volume, load_volumes
from .r2star import group_echoes_by_flip_angle

LOGGER = logging.getLogger("qmri_workflows.interfaces")

__all__ = [
    "InvertDipole",
    "QSMMask",
    "ReferenceSusceptibility",
    "RemoveBackground",
    "TotalField",
    "b0_direction_from_affine",
    "check_phase_radians",
    "csf_labels",
    "voxel_size_from_affine",
]

UNWRAP_ALGORITHMS = {
    "region_growing": "echo-referenced (temporal) unwrapping: first echo difference and phase offset "
    "unwrapped in space by quality-guided region growing (ROMEO-like maximum "
    "spanning tree), later echoes against the prediction of the earlier ones",
    "laplacian": "echo-referenced (temporal) unwrapping: first echo difference and phase offset "
    "unwrapped in space by Laplacian unwrapping (values kept congruent), later echoes "
    "against the prediction of the earlier ones",
}
FIT_ALGORITHMS = {
    "linear": "weighted linear fit of unwrapped phase vs echo time with phase offset (weights magnitude^2)",
    "complex": "non-linear fit of the complex signal (Gauss-Newton) started from the weighted linear fit",
}
BACKGROUND_ALGORITHMS = {
    "vsharp": "V-SHARP (radii 6 mm to one voxel, TSVD 0.05)",
    "pdf": "projection onto dipole fields (PDF), magnitude-weighted",
    "lbv": "Laplacian boundary value (LBV)",
}
INVERSION_ALGORITHMS = {
    "tv": (
        "total-variation inversion by ADMM (FANSI-like), non-linear magnitude-weighted data term; total "
        "variation in the QSM mask only, sources around it free (they absorb residual background)"
    ),
    "tkd": "truncated k-space division (threshold 0.19) with correction of its underestimation",
    "l2": "closed-form L2 inversion with gradient regularisation",
    "ilsqr": "iLSQR (LSQR with streaking estimation and removal), magnitude-weighted",
}
BACKGROUND_REFERENCES = {
    "vsharp": "Li W, Wu B, Liu C. NeuroImage 2011;55:1645-1656",
    "pdf": "Liu T et al. NMR Biomed 2011;24:1129-1136",
    "lbv": "Zhou D et al. NMR Biomed 2014;27:312-319",
}
INVERSION_REFERENCES = {
    "tv": "Milovic C et al. Magn Reson Med 2018;80:814-821",
    "tkd": "Shmueli K et al. Magn Reson Med 2009;62:1510-1522",
    "l2": "Bilgic B et al. Magn Reson Med 2014;72:1444-1459",
    "ilsqr": "Li W et al. NeuroImage 2015;108:111-122",
}
UNWRAP_REFERENCE = "Dymerska B et al. Magn Reson Med 2021;85:2294-2308"

_MIN_REFERENCE_VOXELS = 10
CSF_DEPTH_MM = 8.0
CSF_R2STAR_FRACTION = 0.3


# --------------------------------------------------------------------------------------------------
# geometry and checks
# --------------------------------------------------------------------------------------------------
def voxel_size_from_affine(affine):
    """Voxel size (mm) along each array axis: the lengths of the affine's columns."""
    return tuple(float(size) for size in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def b0_direction_from_affine(affine):
    """The scanner's z axis (B0) as a unit vector in voxel-axis coordinates.

    Component ``i`` is the cosine between array axis ``i`` (column ``i`` of the affine) and the
    scanner z axis, which is the magnet's bore axis in the scanner (patient) coordinates NIfTI
    affines map to. A sheared affine is handled by normalising the result.
    """
    columns = np.asarray(affine, float)[:3, :3]
    direction = columns[2] / np.linalg.norm(columns, axis=0)
    return tuple(float(value) for value in direction / np.linalg.norm(direction))


def csf_labels(tsv_path):
    """Labels of a ``dseg.tsv`` whose name says CSF or ventricle: ``{index: name}``."""
    found = {}
    with open(tsv_path, newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            name = (row.get("name") or "").strip()
            lowered = name.lower()
            if "csf" in lowered or "ventric" in lowered or "cerebrospinal" in lowered:
                found[int(float(row["index"]))] = name
    return found


def _load_optional(path, reference):
    """The volume of an optional file input, or None when it is undefined."""
    return load_volume(path, reference=reference) if isdefined(path) else None


def _write(runtime, name, data, affine):
    return str(write_nifti(os.path.join(runtime.cwd, name), data, affine))


# --------------------------------------------------------------------------------------------------
# total field
# --------------------------------------------------------------------------------------------------
class _TotalFieldInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="magnitude image of every echo of every flip angle"
    )
    phase_files = InputMultiObject(
        File(exists=True), mandatory=True, desc="coil-combined phase image matching each magnitude file"
    )
    phase_scales = traits.List(
        traits.Float, mandatory=True, desc="factor to radians of each phase file (io.query phase_scale)"
    )
    echo_times = traits.List(traits.Float, mandatory=True, desc="echo time (s) of each file")
    flip_angles = traits.List(
        traits.Float, mandatory=True, desc="flip angle (deg) of each file; groups the series (0 = unknown)"
    )
    mask_file = File(exists=True, mandatory=True, desc="brain mask: voxels to unwrap and fit")
    unwrap = traits.Enum(
        "region_growing", "laplacian", usedefault=True, desc="spatial unwrapper of the echo-referenced unwrapping"
    )
    fit = traits.Enum("linear", "complex", usedefault=True, desc="total-field fit")
    flip_angles_used = traits.Enum(
        "all", "best", usedefault=True, desc="combine every flip angle, or use the one of most signal"
    )
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads reading files and combining series")


class _TotalFieldOutputSpec(TraitedSpec):
    field_file = File(exists=True, desc="total field (Hz), 0 outside the mask")
    field_sd_file = File(exists=True, desc="noise SD of the total field (Hz)")
    magnitude_file = File(exists=True, desc="root-sum-of-squares over echoes of the used magnitude")
    mean_echo_time = traits.Float(desc="mean echo time (s) of the fitted echoes")
    metadata = traits.Dict(desc="sidecar fields of this step")


def _load_series(echoes, reference, threads=None):
    """Magnitude and phase (radians) ``(X, Y, Z, N)`` of one series; echoes are (te, (mag, phase, scale)).

    Every echo's phase is checked against the units of the first (:func:`check_phase_radians`).
    A sample that is NaN or Inf in its magnitude or its phase is missing: both become 0, and a 0
    magnitude gives it no weight in the flip-angle average, the unwrapping's quality and the field
    fits (a finite magnitude beside a missing phase would otherwise weigh a phase of 0 rad as a
    measurement).
    """
    magnitude_paths = [magnitude_path for _, (magnitude_path, _, _) in echoes]
    phase_paths = [phase_path for _, (_, phase_path, _) in echoes]
    scales = [scale for _, (_, _, scale) in echoes]
    magnitude = load_volumes(magnitude_paths, reference=reference, max_threads=threads)
    phase = load_phases(phase_paths, scales, reference=reference, max_threads=threads)
    for index, (path, scale) in enumerate(zip(phase_paths, scales)):
        check_phase_radians(phase[..., index], path, scale)
    counts = []
    for index, path in enumerate(magnitude_paths):
        missing = ~(np.isfinite(magnitude[..., index]) & np.isfinite(phase[..., index]))
        if missing.any():
            magnitude[..., index][missing] = 0.0
            phase[..., index][missing] = 0.0
            counts.append(f"{os.path.basename(path)} / {os.path.basename(phase_paths[index])} ({int(missing.sum())})")
    if counts:
        LOGGER.warning(
            "QSM: samples that are NaN/Inf in the magnitude or the phase get no weight in the field fit. "
            "Missing samples per echo: %s",
            ", ".join(counts),
        )
    return magnitude, phase


def _combine_flip_angles(groups, reference, mask, choice, threads=1):
    """Magnitude and phase of the chosen flip angle(s) and a description of the choice.

    With ``all`` and the same echo times, the series are combined by
    :func:`~qmri_workflows.core.qsm.combine_series`; otherwise the series with most signal is used.
    """
    echo_times = [[te for te, _ in echoes] for _, echoes in groups]
    # Series with different numbers of echoes (a protocol that drops the last echo at one flip
    # angle) have different echo times too: np.allclose would fail to broadcast them.
    same_echoes = all(
        len(times) == len(echo_times[0]) and np.allclose(times, echo_times[0], rtol=0, atol=1e-6)
        for times in echo_times
    )
    if len(groups) == 1:
        flip = groups[0][0]
        return (*_load_series(groups[0][1], reference, threads), echo_times[0], [flip], "the only flip angle")
    if choice == "all" and same_echoes:
        series = [_load_series(echoes, reference, threads) for _, echoes in groups]
        magnitudes = [magnitude for magnitude, _ in series]
        phases = [phase for _, phase in series]
        del series
        magnitude, phase = combine_series(magnitudes, phases, n_jobs=threads)
        return (
            magnitude,
            phase,
            echo_times[0],
            [flip for flip, _ in groups],
            "all flip angles: complex average per echo weighted by magnitude, after removing "
            "each flip angle's phase offset relative to the lowest",
        )
    # The phase SNR is proportional to the magnitude: take the series with the most signal.
    scores = []
    for _, echoes in groups:
        magnitude = load_volumes(
            [magnitude_path for _, (magnitude_path, _, _) in echoes], reference=reference, max_threads=threads
        )
        scores.append(float(np.nansum(np.square(magnitude[mask], dtype=np.float64))) / len(echoes))
    del magnitude
    best = int(np.argmax(scores))
    why = "the flip angle of most signal (mean squared magnitude over echoes in the brain mask)" + (
        "" if choice == "best" else "; the flip angles have different echo times, so they were not averaged"
    )
    return (*_load_series(groups[best][1], reference, threads), echo_times[best], [groups[best][0]], why)


class TotalField(SimpleInterface):
    """Total field (Hz) and its noise SD from multi-echo phase.

    Checks every echo's phase units, combines the flip angles, unwraps echo by echo
    (:func:`~qmri_workflows.core.qsm.unwrap_echoes`) and fits the field
    (:func:`~qmri_workflows.core.qsm.fit_field_linear`, optionally refined by
    :func:`~qmri_workflows.core.qsm.fit_field_complex`).
    """

    input_spec = _TotalFieldInputSpec
    output_spec = _TotalFieldOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        n_files = len(inputs.magnitude_files)
        lengths = {len(inputs.phase_files), len(inputs.phase_scales), len(inputs.echo_times), len(inputs.flip_angles)}
        if lengths != {n_files}:
            raise ValueError(
                "magnitude_files, phase_files, phase_scales, echo_times and flip_angles need one entry per echo image"
            )
        items = list(zip(inputs.magnitude_files, inputs.phase_files, inputs.phase_scales))
        groups = group_echoes_by_flip_angle(items, inputs.echo_times, inputs.flip_angles)
        reference = nib.load(inputs.magnitude_files[0])
        mask = load_volume(inputs.mask_file, reference=reference) > 0
        if not mask.any():
            raise ValueError(f"the brain mask {inputs.mask_file} is empty: nothing to map")
        magnitude, phase, echo_times, flips, why = _combine_flip_angles(
            groups, reference, mask, inputs.flip_angles_used, inputs.num_threads
        )
        if len(echo_times) < 2:
            raise ValueError(f"a total-field fit needs at least 2 echoes; {inputs.magnitude_files[0]} has 1")
        voxel_size = voxel_size_from_affine(reference.affine)
        unwrapped = unwrap_echoes(
            phase,
            echo_times,
            magnitude=magnitude,
            mask=mask,
            voxel_size=voxel_size,
            spatial_method=inputs.unwrap,
        )
        field, _, field_sd = fit_field_linear(unwrapped, echo_times, magnitude=magnitude, mask=mask)
        del unwrapped
        if inputs.fit == "complex":
            signal = magnitude * np.exp(1j * phase).astype(np.complex64)
            field, _, field_sd = fit_field_complex(signal, echo_times, mask=mask, initial_field=field)
            del signal
        del phase
        rss = np.sqrt(np.square(magnitude, dtype=np.float32).sum(-1))
        affine = reference.affine
        self._results["field_file"] = _write(runtime, "total_field_hz.nii", field * mask, affine)
        self._results["field_sd_file"] = _write(runtime, "total_field_sd_hz.nii", np.where(mask, field_sd, 0.0), affine)
        self._results["magnitude_file"] = _write(runtime, "magnitude_rss.nii", rss, affine)
        self._results["mean_echo_time"] = float(np.mean(echo_times))
        self._results["metadata"] = {
            "QSMSteps": {
                "PhaseCombination": "coil-combined phase assumed (one phase image per echo)",
                "FlipAngles": why,
                "Unwrapping": UNWRAP_ALGORITHMS[inputs.unwrap],
                "TotalField": FIT_ALGORITHMS[inputs.fit],
            },
            "EchoTime": [float(te) for te in echo_times],
            **({"FlipAngle": flips if len(flips) > 1 else flips[0]} if all(flips) else {}),
        }
        return runtime


# --------------------------------------------------------------------------------------------------
# mask
# --------------------------------------------------------------------------------------------------
class _QSMMaskInputSpec(BaseInterfaceInputSpec):
    mask_file = File(exists=True, mandatory=True, desc="anatomical brain mask")
    magnitude_file = File(exists=True, mandatory=True, desc="magnitude (RSS over echoes)")
    field_sd_file = File(exists=True, desc="noise SD of the total field")
    magnitude_fraction = traits.Float(
        0.15, usedefault=True, desc="unreliable below this fraction of the median magnitude"
    )
    sd_factor = traits.Float(5.0, usedefault=True, desc="unreliable above this multiple of the median field SD")


class _QSMMaskOutputSpec(TraitedSpec):
    out_mask = File(exists=True, desc="QSM mask (uint8)")
    metadata = traits.Dict(desc="sidecar fields of this step")


class QSMMask(SimpleInterface):
    """The brain mask minus unreliable edge voxels (:func:`~qmri_workflows.core.qsm.reliable_edge_mask`)."""

    input_spec = _QSMMaskInputSpec
    output_spec = _QSMMaskOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.magnitude_file)
        mask = load_volume(self.inputs.mask_file, reference=reference) > 0
        magnitude = load_volume(self.inputs.magnitude_file, reference=reference)
        field_sd = _load_optional(self.inputs.field_sd_file, reference)
        reliable = reliable_edge_mask(
            mask,
            magnitude,
            field_sd,
            magnitude_fraction=self.inputs.magnitude_fraction,
            sd_factor=self.inputs.sd_factor,
        )
        if not reliable.any():
            raise ValueError(
                f"no reliable voxel left in the brain mask {self.inputs.mask_file}: the "
                "magnitude or the phase of the whole brain is unusable for QSM"
            )
        self._results["out_mask"] = _write(runtime, "qsm_mask.nii", reliable, reference.affine)
        self._results["metadata"] = {
            "QSMSteps": {
                "Mask": (
                    f"brain mask minus edge voxels with magnitude below {self.inputs.magnitude_fraction:g} x "
                    f"its median or field noise SD above {self.inputs.sd_factor:g} x its median "
                    f"({int(mask.sum() - reliable.sum())} of {int(mask.sum())} voxels removed)"
                )
            }
        }
        return runtime


# --------------------------------------------------------------------------------------------------
# background field removal
# --------------------------------------------------------------------------------------------------
class _RemoveBackgroundInputSpec(BaseInterfaceInputSpec):
    field_file = File(exists=True, mandatory=True, desc="total field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="QSM mask")
    magnitude_file = File(exists=True, desc="data weights of PDF (magnitude)")
    method = traits.Enum("lbv", "vsharp", "pdf", usedefault=True, desc="background removal")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="FFT threads")


class _RemoveBackgroundOutputSpec(TraitedSpec):
    local_field_file = File(exists=True, desc="local field (Hz), 0 outside local_mask_file")
    local_mask_file = File(exists=True, desc="where the local field is defined (uint8)")
    metadata = traits.Dict(desc="sidecar fields of this step")


class RemoveBackground(SimpleInterface):
    """Local field (Hz) from the total field: V-SHARP, PDF or LBV (:mod:`qmri_workflows.core.qsm`).

    The local mask leaves out the QSM mask's boundary layer for PDF and LBV
    (:func:`~qmri_workflows.core.qsm.mask_interior`) and the voxels nearer its edge than the
    smallest kernel for V-SHARP.
    """

    input_spec = _RemoveBackgroundInputSpec
    output_spec = _RemoveBackgroundOutputSpec

    def _run_interface(self, runtime):
        reference = nib.load(self.inputs.field_file)
        field = load_volume(self.inputs.field_file)
        mask = load_volume(self.inputs.mask_file, reference=reference) > 0
        voxel_size = voxel_size_from_affine(reference.affine)
        workers = self.inputs.num_threads
        method = self.inputs.method
        if method == "vsharp":
            local, local_mask = remove_background_vsharp(field, mask, voxel_size, workers=workers)
        elif method == "pdf":
            weights = _load_optional(self.inputs.magnitude_file, reference)
            local, _ = remove_background_pdf(
                field,
                mask,
                voxel_size,
                weights=weights,
                workers=workers,
                b0_direction=b0_direction_from_affine(reference.affine),
            )
            local_mask = mask_interior(mask)
        else:
            # Conjugate gradients on a sparse system: BLAS threads only fight over the cores there
            # (10.4 s with OpenBLAS's threads, 1.8 s with one, 2 mm phantom on a busy machine).
            from threadpoolctl import threadpool_limits

            with threadpool_limits(limits=1, user_api="blas"):
                local, local_mask = remove_background_lbv(field, mask, voxel_size)
        self._results["local_field_file"] = _write(runtime, "local_field_hz.nii", local * local_mask, reference.affine)
        self._results["local_mask_file"] = _write(runtime, "local_mask.nii", local_mask, reference.affine)
        self._results["metadata"] = {
            "QSMSteps": {"BackgroundRemoval": BACKGROUND_ALGORITHMS[method]},
            "QSMReferences": [BACKGROUND_REFERENCES[method]],
        }
        return runtime


# --------------------------------------------------------------------------------------------------
# dipole inversion
# --------------------------------------------------------------------------------------------------
class _InvertDipoleInputSpec(BaseInterfaceInputSpec):
    local_field_file = File(exists=True, mandatory=True, desc="local field (Hz)")
    mask_file = File(exists=True, mandatory=True, desc="where the local field is defined")
    magnitude_file = File(exists=True, desc="data weights of TV and iLSQR (magnitude)")
    field_strength = traits.Float(mandatory=True, desc="MagneticFieldStrength (T)")
    mean_echo_time = traits.Float(desc="effective echo time (s) of the field (TV's phase scale)")
    method = traits.Enum("tv", "tkd", "l2", "ilsqr", usedefault=True, desc="dipole inversion")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="FFT threads")


class _InvertDipoleOutputSpec(TraitedSpec):
    chi_file = File(exists=True, desc="susceptibility (ppm), not referenced, 0 outside the mask")
    metadata = traits.Dict(desc="sidecar fields of this step")


class InvertDipole(SimpleInterface):
    """Susceptibility (ppm) from the local field: TV-ADMM, TKD, L2 or iLSQR.

    The field is converted from Hz to ppm with ``MagneticFieldStrength``; the B0 direction and the
    voxel size come from the affine.
    """

    input_spec = _InvertDipoleInputSpec
    output_spec = _InvertDipoleOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        reference = nib.load(inputs.local_field_file)
        local_ppm = hz_to_ppm(load_volume(inputs.local_field_file), inputs.field_strength)
        mask = load_volume(inputs.mask_file, reference=reference) > 0
        weights = _load_optional(inputs.magnitude_file, reference)
        geometry = dict(
            voxel_size=voxel_size_from_affine(reference.affine),
            b0_direction=b0_direction_from_affine(reference.affine),
            workers=inputs.num_threads,
        )
        if inputs.method == "tv":
            if not isdefined(inputs.mean_echo_time):
                raise ValueError("the TV inversion needs mean_echo_time (its data term is non-linear in the phase)")
            phase_scale = 2 * np.pi * float(ppm_to_hz(1.0, inputs.field_strength)) * inputs.mean_echo_time
            chi = invert_tv_admm(local_ppm, mask, weights=weights, phase_scale=phase_scale, **geometry)
        elif inputs.method == "tkd":
            chi = invert_tkd(local_ppm, mask, **geometry)
        elif inputs.method == "l2":
            chi = invert_l2_gradient(local_ppm, mask, **geometry)
        else:
            chi = invert_ilsqr(local_ppm, mask, weights=weights, **geometry)
        self._results["chi_file"] = _write(runtime, "chi_unreferenced.nii", chi, reference.affine)
        self._results["metadata"] = {
            "QSMSteps": {"DipoleInversion": INVERSION_ALGORITHMS[inputs.method]},
            "QSMReferences": [INVERSION_REFERENCES[inputs.method]],
            "B0Direction": [round(value, 6) for value in geometry["b0_direction"]],
        }
        return runtime


# --------------------------------------------------------------------------------------------------
# referencing and the sidecar of the chain
# --------------------------------------------------------------------------------------------------
class _ReferenceSusceptibilityInputSpec(BaseInterfaceInputSpec):
    chi_file = File(exists=True, mandatory=True, desc="susceptibility (ppm), not referenced")
    mask_file = File(exists=True, mandatory=True, desc="where chi is defined")
    reference = traits.Enum("brain", "csf", usedefault=True, desc="reference region")
    dseg_file = File(exists=True, desc="segmentation on the map grid (for 'csf')")
    dseg_tsv = File(exists=True, desc="its label table (index, name)")
    r2star_file = File(exists=True, desc="R2* (1/s), for 'csf' without a segmentation")
    step_metadata = InputMultiObject(traits.Dict, desc="metadata of the earlier steps, in order")


class _ReferenceSusceptibilityOutputSpec(TraitedSpec):
    chi_file = File(exists=True, desc="referenced susceptibility (ppm)")
    metadata = traits.Dict(desc="sidecar fields of the whole chain")


class ReferenceSusceptibility(SimpleInterface):
    """Reference chi to the whole-brain mean or to CSF, and describe the whole chain.

    ``EstimationAlgorithm`` names every step (from ``step_metadata``), ``EstimationReference`` the
    papers of the chosen methods, ``ReferenceRegion`` the region whose mean is 0.
    """

    input_spec = _ReferenceSusceptibilityInputSpec
    output_spec = _ReferenceSusceptibilityOutputSpec

    def _run_interface(self, runtime):
        inputs = self.inputs
        reference = nib.load(inputs.chi_file)
        chi = load_volume(inputs.chi_file)
        mask = load_volume(inputs.mask_file, reference=reference) > 0
        if inputs.reference == "brain":
            region, description = mask, "whole brain (mean over the QSM mask)"
        else:
            region, description = self._csf(reference, mask)
        referenced, value = reference_to_region(chi, region, mask=mask)
        self._results["chi_file"] = _write(runtime, "Chimap.nii", referenced, reference.affine)
        steps, papers, extra = {}, [UNWRAP_REFERENCE], {}
        for piece in inputs.step_metadata if isdefined(inputs.step_metadata) else []:
            steps.update(piece.get("QSMSteps", {}))
            papers += [paper for paper in piece.get("QSMReferences", []) if paper not in papers]
            extra.update({k: v for k, v in piece.items() if k not in ("QSMSteps", "QSMReferences")})
        steps["Referencing"] = description
        self._results["metadata"] = {
            **extra,
            "EstimationAlgorithm": "QSM: " + "; ".join(f"{step}: {text}" for step, text in steps.items()),
            "EstimationReference": "; ".join(papers),
            "QSMSteps": steps,
            "ReferenceRegion": description,
            "ReferenceValue": round(value, 6),
            "ReferenceRegionVoxels": int(region.sum()),
        }
        return runtime

    def _csf(self, reference, mask):
        inputs = self.inputs
        if not isdefined(inputs.dseg_file) or not isdefined(inputs.dseg_tsv):
            if not isdefined(inputs.r2star_file):
                raise ValueError(
                    "--qsm-reference csf needs a segmentation (dseg with its dseg.tsv "
                    "naming a CSF label) given with --derivatives, or an R2* map to "
                    "estimate CSF from; add one, or use --qsm-reference brain"
                )
            r2star = load_volume(inputs.r2star_file, reference=reference)
            try:
                region = estimate_csf_mask(
                    mask,
                    r2star,
                    voxel_size_from_affine(reference.affine),
                    depth_mm=CSF_DEPTH_MM,
                    r2star_fraction=CSF_R2STAR_FRACTION,
                )
            except ValueError as error:
                raise ValueError(
                    f"{error}; give a segmentation with a CSF label (--derivatives) or use --qsm-reference brain"
                ) from error
            return region, (
                f"CSF estimated without a segmentation: voxels at least {CSF_DEPTH_MM:g} mm "
                f"inside the QSM mask with R2* below {CSF_R2STAR_FRACTION:g} x its median"
            )
        labels = csf_labels(inputs.dseg_tsv)
        if not labels:
            raise ValueError(
                f"{inputs.dseg_tsv} names no CSF or ventricle label (a 'name' containing "
                "'CSF' or 'ventricle'); rename the label or use --qsm-reference brain"
            )
        dseg = np.rint(load_volume(inputs.dseg_file, reference=reference)).astype(np.int64)
        region = np.isin(dseg, list(labels)) & mask
        if region.sum() < _MIN_REFERENCE_VOXELS:
            raise ValueError(
                f"only {int(region.sum())} voxels of the CSF labels {sorted(labels)} of "
                f"{inputs.dseg_file} lie in the QSM mask; check that the segmentation "
                "belongs to this subject, or use --qsm-reference brain"
            )
        names = ", ".join(f"{index}: {name}" for index, name in sorted(labels.items()))
        return region, f"CSF (dseg labels {names}, inside the QSM mask)"
