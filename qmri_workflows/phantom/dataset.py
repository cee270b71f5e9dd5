"""Write the digital phantom as a raw BIDS dataset with its ground truth as a derivative.

Layout (``docs/architecture.rst``, "Raw BIDS layout")::

    OUTPUT_DIR/
      dataset_description.json  README  CHANGES  participants.tsv  participants.json
      sub-01/anat/sub-01_echo-<e>_flip-<f>_part-<mag|phase>_VFA.nii.gz (+ .json)      multi-echo SPGR
      sub-01/anat/sub-01_acq-bssfp<ddd>_flip-<f>_part-<mag|phase>_VFA.nii.gz (+ .json)  phase-cycled bSSFP
      sub-01/fmap/sub-01_acq-tr1_TB1AFI.nii.gz, sub-01_acq-tr2_TB1AFI.nii.gz (+ .json)   AFI
      sub-01/fmap/sub-01_acq-headPDw_RB1COR.nii.gz, sub-01_acq-bodyPDw_RB1COR.nii.gz     receive pair
      derivatives/phantom/
        dataset_description.json                                      DatasetType "derivative"
        sub-01/sub-01_desc-simulation.json                            protocol, snr, sigma, coils, seeds
        sub-01/anat/sub-01_<R1map|T1map|R2map|T2map|R2starmap|T2starmap|PDmap|Chimap|M0map>.nii.gz
        sub-01/anat/sub-01_desc-flip<f>_S0map.nii.gz                 noiseless TE = 0 SPGR intercepts
        sub-01/anat/sub-01_dseg.nii.gz + sub-01_dseg.tsv, sub-01_desc-<brain|head>_mask.nii.gz
        sub-01/anat/sub-01_label-<abbreviation>_desc-interior_mask.nii.gz  per brain label (see below)
        sub-01/fmap/sub-01_TB1map.nii.gz (percent), sub-01_RB1map.nii.gz (ratio),
                    sub-01_desc-bodycoil_RB1map.nii.gz (receive field of the RB1COR body coil)
        sub-01/fmap/sub-01_desc-<total|background|local>_fieldmap.nii.gz   field offsets in ppm

Truth conventions: rates in 1/s, times in s (``T1map = 1 / R1map``, 0 where the rate is 0, i.e. in
air), PD in percent water, Chi in ppm relative to CSF, TB1map in percent of the nominal flip angle,
RB1map the relative receive sensitivity, M0map ``PD / 100 * receive * SIGNAL_SCALE`` (the apparent
equilibrium signal a VFA fit estimates) and S0map the TE = 0 intercept per flip angle (what a
multi-echo R2* fit estimates). The field maps are B0 offsets in ppm of the main field: total (what
the phase sees), background (sources outside the brain mask, incl. air-tissue interfaces and shim
residual) and local (from the susceptibility inside the brain mask); suffix ``fieldmap`` with
``Units`` "ppm" (raw BIDS field maps are in Hz). TB1map, RB1map and the field maps are 0 outside
the head mask (no image carries information there).

Interior masks: one ``label-<abbreviation>_desc-interior_mask`` (abbreviations of ``dseg.tsv``: WM,
CGM, CAU, PUT, GP, THA, LEA, LLA, LCAC, LCAR, LCI, CL, CSF) per brain label of the subject: the
voxels whose whole footprint on the simulation grid (``oversample**3`` fine voxels) has that label
with at least 95 % of each fine voxel's volume in it (no partial volume), eroded by one more voxel
(3 x 3 x 3) when at least 20 voxels remain; the sidecar records the rule, whether the mask was
eroded and its voxel count (0 when the region has no interior at this resolution). Accuracy tests
evaluate estimates there; the rest of a region (its edge) shows what partial volume and intravoxel
dephasing do.

Oversampling (default 2): the images are simulated on a grid twice as fine and reduced by k-space
cropping, so they carry partial volume, Gibbs ringing and intravoxel dephasing, which the
block-averaged truth does not model: the truth is then not the exact inverse of any fit.
``oversample=1`` gives images that are the exact signal model of the truth (plumbing tests).

The bSSFP increments follow :func:`qmri_workflows.core.signal.bssfp_signal`: increment 0 is
conventional bSSFP (RF phase alternating by 180 degrees). The bSSFP sidecars record the duration
of the rectangular RF pulse as ``RFPulseDuration`` (s; project convention, BIDS has no key for it).

Storage: ``dtype="float32"`` writes magnitude and phase as float32; ``dtype="int16"`` quantises them
to int16 with a NIfTI scale slope, like a scanner's reconstruction, to keep shipped examples small:
the magnitude step is a quarter of the noise sigma (quantisation adds 0.5 % to the noise variance),
the phase step pi/1024 (pi/16384 when noiseless). Truth maps are always float32 (masks uint8,
segmentation int16).

The whole dataset is written into a temporary folder next to ``output_dir`` and renamed into place at
the end, so a failed or interrupted run never leaves a half-written dataset.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from qmri_workflows import __version__
from qmri_workflows.io.derivatives import (
    BIDS_VERSION,
    bids_path,
    sidecar_path,
    write_dataset_description,
    write_dseg_tsv,
    write_json,
    write_map,
    write_nifti,
)
from qmri_workflows.io.images import save_image
from qmri_workflows.phantom.protocol import Protocol
from qmri_workflows.phantom.simulate import (
    DIFFUSION_T2_RANGE,
    FREE_WATER_DIFFUSION,
    KSPACE_FILTERS,
    SIGNAL_SCALE,
    TISSUE_DIFFUSION,
    PhantomScanner,
    gfactor_map,
    list_volumes,
    reference_sigma,
    tfl_flip_angle_map,
)

__all__ = ["ICBM_NOTICE", "MANUFACTURER", "subject_table", "write_phantom_dataset"]

MANUFACTURER = "qmri-workflows phantom"
"""``Manufacturer`` written into every raw sidecar."""

ICBM_NOTICE = (
    "Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
    "Institute, McGill University. Permission to use, copy, modify, and distribute this software and "
    "its documentation for any purpose and without fee is hereby granted, provided that the above "
    "copyright notice appear in all copies. The authors and McGill University make no representations "
    'about the suitability of this software for any purpose. It is provided "as is" without express '
    "or implied warranty. The authors are not responsible for any data loss, equipment damage, property "
    "loss, or injury to subjects or patients resulting from the use or misuse of this software package."
)
"""Copyright notice of the MNI ICBM152 2009a template, which every copy of derived data must carry."""

_ICBM_SOURCE = {
    "URL": "https://nist.mni.mcgill.ca/icbm-152-nonlinear-atlases-2009/",
    "Version": "ICBM 2009a nonlinear symmetric (as shipped with nilearn)",
}
_DATASET_NAME = "qmri-workflows digital MS-brain phantom"
_DTYPES = ("float32", "int16")


def subject_table(n_subjects, seed=0):
    """Participants of a phantom dataset: labels, groups, ages and sexes.

    Subjects alternate patient, control, patient, ... starting with ``sub-01`` (patient). Ages and
    sexes are drawn from ``seed`` (patients 25-55 years, about 70 % female as in relapsing MS;
    controls 25-55 years, half female).

    Returns
    -------
    list of dict
        Keys ``label`` (``"01"``), ``group`` (``"patient"``/``"control"``), ``age`` (int), ``sex``
        (``"F"``/``"M"``), ``index`` (0-based).
    """
    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise ValueError(f"subjects must be a positive integer, got {n_subjects!r}")
    width = max(2, len(str(int(n_subjects))))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xA9E]))
    rows = []
    for index in range(int(n_subjects)):
        group = "patient" if index % 2 == 0 else "control"
        age = int(rng.integers(25, 56))
        female = rng.random() < (0.7 if group == "patient" else 0.5)
        rows.append(
            {
                "index": index,
                "label": f"{index + 1:0{width}d}",
                "group": group,
                "age": age,
                "sex": "F" if female else "M",
            }
        )
    return rows


def _readme(
    *, command, resolution, snr, n_subjects, seed, field_strength, n_coils, oversample, dtype, kspace_filter, spoiling
):
    snr_text = "noiseless (snr = inf)" if math.isinf(snr) else f"{snr:g}"
    lines = [
        "qmri-workflows digital MS-brain phantom",
        "=======================================",
        "",
        "A simulated quantitative-MRI dataset of an MS patient / control brain phantom, written by",
        f"qmri-phantom (qmri-workflows {__version__}). The ground truth of every map is in",
        "derivatives/phantom/ (same file names as the qmri-workflows pipeline output).",
        "",
        "Generation",
        "----------",
        f"Command: {command}" if command else "Generated with qmri_workflows.phantom.write_phantom_dataset.",
        f"Resolution {resolution:g} mm isotropic, {field_strength:g} T, {n_subjects} subject(s), seed {seed},",
        f"SNR {snr_text}, {n_coils} receive channel(s), oversampling {oversample}, storage {dtype}.",
        "",
        "Oversampling: with oversampling K > 1 every image is simulated on a grid K times finer and",
        {
            "box": "reduced by averaging the complex signal over each voxel's footprint (no ringing).",
            "tukey": "reduced by cropping its k-space with a Tukey reconstruction filter (inner half of "
            "k-space flat, cosine taper outside).",
            "none": "reduced by cropping its k-space without a filter (Gibbs ringing kept).",
        }[kspace_filter],
        "The images then carry partial volume and intravoxel dephasing that the block-averaged truth",
        "does not model. With K = 1 each image is the exact signal model of its truth.",
        "",
        "SNR: the noise standard deviation per channel (real and imaginary parts) is the median",
        "noiseless white-matter magnitude of the first echo of the lowest-flip-angle VFA image of",
        "sub-01 divided by the SNR; it is the same for every image of the dataset (fixed receiver).",
        "Each subject's derivatives/phantom/sub-XX/sub-XX_desc-simulation.json records the protocol,",
        "the noise sigma, the number of channels and the seeds.",
        "",
        "Storage: "
        + (
            "float32 magnitude and phase (rad)."
            if dtype == "float32"
            else "int16 with a NIfTI scale slope: magnitude step sigma/4 (0.5 % of the noise variance),"
            " phase step pi/1024 (pi/16384 when noiseless); readers apply the slope."
        ),
        "",
        "Ground truth (derivatives/phantom)",
        "----------------------------------",
        "R1map/R2map/R2starmap (1/s) and T1map/T2map/T2starmap (s, 1/rate), PDmap (percent water),",
        "Chimap (ppm relative to CSF), M0map (PD/100 x receive x signal scale), desc-flip<f>_S0map (noiseless",
        "TE = 0 SPGR intercept per flip angle, incl. B1+ and receive), dseg (+ dseg.tsv), brain and",
        "head masks; fmap: TB1map (percent of nominal flip angle), RB1map (receive sensitivity) and",
        "desc-total|background|local_fieldmap (field offsets in ppm of B0); the smooth fields are 0",
        "outside the head mask; desc-bodycoil_RB1map is the receive field of the body coil (within 3 %",
        "of 1 over the brain, so the RB1COR head/body ratio is RB1map / desc-bodycoil_RB1map).",
        "With oversampling the truth is the block average of a finer truth, and the images carry",
        "partial volume, ringing and intravoxel dephasing that it does not model.",
        "label-<region>_desc-interior_mask: per brain region (dseg.tsv abbreviations), the voxels",
        "without partial volume: their whole footprint on the simulation grid has the region's label,",
        "each fine voxel at least 95 % of it; eroded by one voxel when at least 20 voxels remain (the",
        "sidecar says so). Evaluate accuracy there; the region minus its interior is its edge.",
        "",
        "Acquisitions",
        "------------",
        "- anat/*_echo-<e>_flip-<f>_part-<mag|phase>_VFA: multi-echo spoiled gradient echo (SPGR) at",
        "  several flip angles, "
        + (
            "ideal RF spoiling in the simulation (Ernst equation)."
            if spoiling == "ideal"
            else "spoiled as a scanner does: extended phase graphs of the RF phase schedule,"
        ),
        "- anat/*_acq-bssfp<ddd>_flip-<f>_part-<mag|phase>_VFA: phase-cycled balanced SSFP, TE = TR/2.",
        "  Project convention (BIDS has no phase-cycling entity): one acq- label per RF phase-cycling",
        "  increment in degrees, repeated in the sidecar as PhaseCyclingIncrement. Increment 0 is",
        "  conventional bSSFP (RF phase alternating by 180 degrees, pass band centred on resonance).",
        "  RFPulseDuration (s, project convention) is the duration of the rectangular RF pulse.",
        *(
            []
            if spoiling == "ideal"
            else [
                "  spoiler moment and diffusion (SpoilingRFPhaseIncrement, SpoilingGradientMoment in the",
                "  sidecars) at each voxel's T1, T2 and B1+: the signal departs from the Ernst equation by",
                "  up to a few percent (more at the larger flip angle, long T2 and high B1+), as on a scanner.",
            ]
        ),
        "- fmap/*_acq-tr1|tr2_TB1AFI: actual flip-angle imaging (Yarnykh 2007)"
        + (", ideal spoiling." if spoiling == "ideal" else ", spoiled as in the sidecars (EPG)."),
        "  (or fmap/*_flip-1|2_TB1DAM with qmri-phantom --b1-method dam: a double-angle pair, spoiled",
        "  gradient echoes at the two flip angles with a 2 s TR, spoiled like the VFA images;",
        "  or fmap/*_acq-anat|famp_TB1TFL with --b1-method tfl: a Siemens tfl_b1map, famp = 10 x the",
        "  actual 80 deg preparation angle, sidecar FlipAngle 8 (the readout angle; tfl-vb: 80)).",
        "- fmap/*_acq-headPDw|bodyPDw_RB1COR: low-resolution PD-weighted receive-field pair (head",
        "  coil; body coil, single channel, smooth sensitivity within 3 % of uniform).",
        "",
        "Anatomy source and licence",
        "--------------------------",
        "The brain anatomy is derived from the MNI ICBM152 2009a nonlinear symmetric template",
        "(Fonov et al., NeuroImage 2011;54:313-327; Fonov et al., NeuroImage 2009;47:S102), whose",
        "licence requires the following notice in all copies:",
        "",
    ]
    words, line = ICBM_NOTICE.split(), ""
    for word in words:
        if len(line) + len(word) + 1 > 96:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\n".join(lines) + "\n"


def _quantisation_step(data, *, part, sigma):
    """int16 step of a raw image: a fraction of the noise, or of the range when noiseless.

    Magnitude: ``sigma / 4`` (uniform quantisation error of variance ``step**2 / 12``, i.e. 0.5 % of
    the noise variance), never finer than needed to fit the range into 32000 levels. Phase:
    ``pi / 1024`` with noise (0.0009 rad rms, below the phase noise ``sigma / |S|`` of any image with
    |S| < 1000 sigma), ``pi / 16384`` without.
    """
    if part == "phase":
        return math.pi / (1024.0 if sigma > 0 else 16384.0)
    peak = float(np.max(np.abs(data))) if np.size(data) else 0.0
    range_step = peak / 32000.0
    step = max(sigma / 4.0, range_step) if sigma > 0 else range_step
    return step if step > 0 else 1.0


def _write_raw_image(path, data, affine, dtype, *, part=None, sigma=0.0):
    """Write one raw image: float32 through the project writer, int16 with a scale slope."""
    if dtype == "float32":
        write_nifti(path, data, affine, dtype=np.float32)
        return
    import nibabel as nib

    step = _quantisation_step(data, part=part, sigma=sigma)
    levels = np.round(np.asarray(data, dtype=float) / step).astype(np.int16)
    image = nib.Nifti1Image(levels, affine)
    image.header.set_data_dtype(np.int16)
    image.header.set_slope_inter(step, 0.0)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)


def _write_tfl_image(root, label, volume, scanner, rng, reference, affine, dtype, sigma, field_strength, n_coils):
    """Acquire one image of a tfl_b1map and write what the scanner writes: the reference's magnitude
    (``acq-anat``), or, after the saturated image, the flip-angle map ``acq-famp`` (integers, 10 x
    deg, :func:`~qmri_workflows.phantom.simulate.tfl_flip_angle_map`). Returns the complex
    reference (for the famp that follows it)."""
    import nibabel as nib

    magnitude, combined = scanner.acquire_complex(volume, rng=rng)
    relative = bids_path(subject=label, suffix=volume.suffix, datatype=volume.datatype, **volume.entities)
    sidecar = _raw_sidecar(volume, field_strength=field_strength, part=None, n_coils=n_coils)
    if volume.parameters["image"] == "reference":
        _write_raw_image(root / relative, magnitude, affine, dtype, sigma=sigma)
        write_json(sidecar_path(root / relative), sidecar)
        return combined
    if reference is None:
        raise ValueError("the saturated image of a tfl_b1map needs its reference acquired first")
    # Siemens stores the map as unsigned integers without a scale slope, whatever the other images
    image = nib.Nifti1Image(tfl_flip_angle_map(combined, reference), affine)
    image.header.set_data_dtype(np.uint16)
    image.header.set_xyzt_units(xyz="mm", t="sec")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    (root / relative).parent.mkdir(parents=True, exist_ok=True)
    save_image(image, root / relative)
    sidecar.pop("Units")  # not a magnitude: 10 x the actual preparation angle (deg)
    sidecar["ImageComments"] = "flip angle map: 10 x the actual preparation flip angle in degrees"
    write_json(sidecar_path(root / relative), sidecar)
    return reference


def _raw_sidecar(volume, *, field_strength, part, n_coils):
    metadata = {
        **volume.metadata,
        "MagneticFieldStrength": float(field_strength),
        "Manufacturer": MANUFACTURER,
        "ManufacturersModelName": f"qmri-workflows {__version__} simulator",
        "MRAcquisitionType": "3D",
    }
    body_coil = volume.kind == "rb1cor" and volume.parameters.get("coil") == "body"
    if "ReceiveCoilName" not in metadata:
        metadata["ReceiveCoilName"] = f"head array, {n_coils} channel(s)"
    if body_coil or n_coils == 1:
        metadata["CoilCombinationMethod"] = "single channel"
    else:
        metadata["CoilCombinationMethod"] = (
            "rSOS magnitude; phase of the sensitivity-weighted (Roemer) sum with the known sensitivities"
        )
    metadata["ReceiveCoilActiveElements"] = "body" if body_coil else f"all {n_coils}"
    metadata["MatrixCoilMode"] = "none"
    metadata["NonlinearGradientCorrection"] = False
    metadata["ScanningSequence"] = "GR"
    metadata["SequenceVariant"] = ["SS"] if volume.kind == "bssfp" else ["SS", "SP"]
    metadata["SequenceName"] = f"qmri_{volume.kind}"
    if volume.kind == "bssfp":
        pulse = volume.parameters.get("pulse_duration", 0.0)
        details = "balanced, TE = TR/2, exact steady state of one TR (qmri_workflows.phantom.bssfp_steady_state), " + (
            f"rectangular RF pulses of {pulse * 1e3:g} ms (RFPulseDuration)" if pulse > 0 else "instantaneous RF pulses"
        )
    elif volume.kind == "tfl":
        details = (
            "single TurboFLASH shot from full relaxation read at the centre of k-space, after a saturation pulse "
            "(transverse magnetisation spoiled) or without (the reference)"
        )
    elif volume.parameters.get("spoiling") is None:
        details = "ideal RF and gradient spoiling"
    else:
        details = "RF and gradient spoiling simulated by extended phase graphs (quadratic RF phase schedule)"
    metadata["PulseSequenceDetails"] = (
        "Steady-state signal equations per voxel (qmri_workflows.phantom.simulate); " + details
    )
    metadata["SoftwareVersions"] = f"qmri-workflows {__version__}"
    metadata["DeviceSerialNumber"] = "0000"
    metadata["StationName"] = "qmri-phantom"
    metadata["InstitutionName"] = "none (simulated data)"
    metadata["InstitutionalDepartmentName"] = "none (simulated data)"
    metadata["InstitutionAddress"] = "none (simulated data)"
    metadata["Units"] = "rad" if part == "phase" else "arbitrary"
    return metadata


def _truth_metadata(description, *, field_strength, oversample, **extra):
    text = description
    if oversample > 1:
        text += (
            f" Block average of the truth on a grid {oversample} times finer (approximate truth"
            " of the k-space-reduced images)."
        )
    return {
        "Description": text,
        "EstimationAlgorithm": "ground truth of the digital phantom",
        "MagneticFieldStrength": float(field_strength),
        **extra,
    }


def _write_noise_truth(derivatives_root, scanner, label):
    """True per-channel noise SD of each main-grid voxel (uniform unless a g-factor map is set)."""
    sigma_map = np.full(scanner.shape, scanner.sigma, dtype=np.float32)
    if scanner.noise_gfactor is not None:
        sigma_map *= scanner.noise_gfactor.astype(np.float32)
    write_map(
        derivatives_root,
        sigma_map,
        scanner.affine,
        subject=label,
        suffix="sigmamap",
        desc="noise",
        metadata={
            "Description": "True noise standard deviation per receive channel and per real/imaginary "
            "part of the main-grid images (magnitude units); sigma x g-factor map when the noise "
            "varies in space.",
            "Units": "arbitrary (magnitude units)",
        },
    )


def _write_truth(derivatives_root, scanner, protocol, label, *, field_strength, oversample):
    affine = scanner.affine
    meta = {"field_strength": field_strength, "oversample": oversample}
    rates = {
        "R1map": ("T1map", "longitudinal relaxation"),
        "R2map": ("T2map", "transverse relaxation"),
        "R2starmap": ("T2starmap", "effective transverse relaxation"),
    }
    for name, data in scanner.truth_maps(protocol):
        if name in rates:
            time_name, what = rates[name]
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix=name,
                metadata=_truth_metadata(f"True {what} rate.", **meta),
            )
            with np.errstate(divide="ignore"):
                times = np.where(data > 0, 1.0 / np.where(data > 0, data, 1.0), 0.0)
            write_map(
                derivatives_root,
                times,
                affine,
                subject=label,
                suffix=time_name,
                metadata=_truth_metadata(f"True {what} time, 1 / rate (0 where the rate is 0).", **meta),
            )
        elif name == "PDmap":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="PDmap",
                metadata=_truth_metadata("True proton density, percent water.", **meta),
            )
        elif name == "Chimap":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="Chimap",
                metadata=_truth_metadata("True magnetic susceptibility relative to CSF.", **meta),
            )
        elif name == "M0map":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="M0map",
                metadata=_truth_metadata(
                    f"Apparent equilibrium magnetisation PD / 100 x receive x {SIGNAL_SCALE:g}.", **meta
                ),
            )
        elif name.startswith("S0map-"):
            flip_index = int(name.split("-")[1])
            flip_angle = protocol.vfa.flip_angles[flip_index - 1]
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="S0map",
                desc=f"flip{flip_index}",
                metadata=_truth_metadata(
                    "Noiseless TE = 0 intercept of the SPGR signal at this flip angle (includes B1+ and receive).",
                    FlipAngle=float(flip_angle),
                    RepetitionTimeExcitation=float(protocol.vfa.repetition_time),
                    **meta,
                ),
            )
        elif name == "MTsat":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="MTsat",
                metadata=_truth_metadata(
                    "True MT saturation (Helms 2008) of the protocol's MT pulse at the nominal transmit field: the "
                    "fraction of longitudinal magnetisation it removes per TR, in percent.",
                    Units="p.u.",
                    **meta,
                ),
            )
        elif name == "TB1map":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="TB1map",
                metadata=_truth_metadata("True transmit field, percent of the nominal flip angle.", **meta),
            )
        elif name == "RB1map":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="RB1map",
                metadata=_truth_metadata("True relative receive sensitivity (ratio).", Units="arbitrary", **meta),
            )
        elif name == "RB1map-body":
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="RB1map",
                desc="bodycoil",
                metadata=_truth_metadata(
                    "True receive sensitivity of the body coil of the RB1COR pair (smooth, within "
                    "a few percent of 1 over the brain); the head/body RB1COR ratio is "
                    "RB1map / this map.",
                    Units="arbitrary",
                    **meta,
                ),
            )
        elif name == "dseg":
            path = write_map(
                derivatives_root,
                data.astype(np.int16),
                affine,
                subject=label,
                suffix="dseg",
                metadata=_truth_metadata("Tissue labels of the phantom (majority label).", **meta),
            )
            from qmri_workflows.phantom.tissues import dseg_tsv_rows

            write_dseg_tsv(Path(path).with_name(f"sub-{label}_dseg.tsv"), dseg_tsv_rows())
        elif name in ("brainmask", "headmask"):
            region = name[:-4]
            what = "Intracranial mask (brain and CSF)." if region == "brain" else "Head mask (brain, skull, scalp)."
            write_map(
                derivatives_root,
                data.astype(np.uint8),
                affine,
                subject=label,
                suffix="mask",
                desc=region,
                metadata=_truth_metadata(what, Type="Brain" if region == "brain" else "Head", **meta),
            )
        elif name.endswith("field"):
            kind = name[:-5]
            write_map(
                derivatives_root,
                data,
                affine,
                subject=label,
                suffix="fieldmap",
                datatype="fmap",
                desc=kind,
                metadata=_truth_metadata(f"True {kind} field offset in ppm of the main field.", Units="ppm", **meta),
            )
        else:  # pragma: no cover - every name of truth_maps is handled above
            raise RuntimeError(f"unhandled truth map {name}")
    _write_interior_masks(derivatives_root, scanner, label, field_strength=field_strength, oversample=oversample)
    _write_lesion_truth(derivatives_root, scanner, label, field_strength=field_strength, oversample=oversample)


_LESION_COLUMNS = {
    "index": "lesion number, the value of its voxels in the image",
    "name": "lesion name",
    "stage": "stage (Table 1 of the review; cortical lesions apart)",
    "compartment": "phantom compartment (qmri_workflows.phantom.tissues)",
    "diameter_mm": "diameter of the simulated sphere (mm)",
    "centre_x_mm": "centre, x (RAS, MNI152 mm)",
    "centre_y_mm": "centre, y (RAS, MNI152 mm)",
    "centre_z_mm": "centre, z (RAS, MNI152 mm)",
    "voxels": "voxels of the lesion on this grid (0: too small to hold a voxel)",
    "volume_mm3": "volume of those voxels (mm^3)",
}


def _write_lesion_truth(derivatives_root, scanner, label, *, field_strength, oversample):
    """Lesion numbers (``label-lesion_dseg`` + ``.tsv`` with each lesion's stage) and the lesion mask."""
    from qmri_workflows.io.tables import write_table
    from qmri_workflows.phantom.simulate import _blocks, block_majority
    from qmri_workflows.phantom.tissues import LESION_LABELS, LESION_STAGES, lesion_stage

    truth = scanner.truth
    if truth.lesion_index is None or not truth.lesions:
        return
    dseg = block_majority(truth.dseg, oversample)
    index = block_majority(truth.lesion_index, oversample)
    lesion = np.isin(dseg, LESION_LABELS)
    if oversample > 1:
        # a lesion voxel whose block is mostly non-lesion tissue still belongs to the lesion in it
        largest = _blocks(truth.lesion_index, oversample).max(axis=(1, 3, 5))
        index = np.where(lesion & (index == 0), largest, index)
    index = np.where(lesion, index, 0).astype(np.int16)
    meta = {"field_strength": field_strength, "oversample": oversample}
    path = write_map(
        derivatives_root,
        index,
        scanner.affine,
        subject=label,
        suffix="dseg",
        label="lesion",
        metadata=_truth_metadata(
            "Lesion numbers of the phantom (0 = no lesion); the .tsv gives each lesion's stage.",
            LesionColumns=_LESION_COLUMNS,
            StageLevels={stage: f"{stage} lesion" for stage in LESION_STAGES},
            **meta,
        ),
    )
    voxel_volume = float(abs(np.linalg.det(scanner.affine[:3, :3])))
    counts = np.bincount(index.ravel(), minlength=len(truth.lesions) + 1)
    rows = [
        {
            "index": number,
            "name": f"lesion {number}",
            "stage": lesion_stage(item.compartment),
            "compartment": item.compartment,
            "diameter_mm": 2 * item.radius,
            "centre_x_mm": item.centre[0],
            "centre_y_mm": item.centre[1],
            "centre_z_mm": item.centre[2],
            "voxels": int(counts[number]),
            "volume_mm3": counts[number] * voxel_volume,
        }
        for number, item in enumerate(truth.lesions, start=1)
    ]
    # the image's sidecar shares the table's stem, so the columns are described there (LesionColumns)
    write_table(Path(path).with_name(f"sub-{label}_label-lesion_dseg.tsv"), rows, list(rows[0]))
    write_map(
        derivatives_root,
        (index > 0).astype(np.uint8),
        scanner.affine,
        subject=label,
        suffix="mask",
        label="lesion",
        metadata=_truth_metadata("Lesion mask of the phantom (all stages).", Type="ROI", **meta),
    )


def _write_interior_masks(derivatives_root, scanner, label, *, field_strength, oversample):
    """One ``label-<abbreviation>_desc-interior_mask`` per brain label of the subject."""
    from qmri_workflows.phantom.simulate import MIN_ERODED_VOXELS, PURE_FRACTION
    from qmri_workflows.phantom.tissues import BRAIN_LABELS, LABEL_ABBREVIATIONS, LABELS

    present = set(np.unique(scanner.truth.dseg).tolist())
    labels = [value for value in BRAIN_LABELS if value in present]
    rule = (
        f"Voxels of the label whose whole footprint on the simulation grid ({oversample}^3 voxels "
        f"{oversample} times finer) has this label, each footprint voxel at least "
        f"{PURE_FRACTION:.0%} of this label (no partial volume); then eroded by one voxel "
        f"(3x3x3) if at least {MIN_ERODED_VOXELS} voxels remain."
    )
    for value, (mask, eroded) in scanner.interior_masks(labels).items():
        write_map(
            derivatives_root,
            mask.astype(np.uint8),
            scanner.affine,
            subject=label,
            suffix="mask",
            label=LABEL_ABBREVIATIONS[value],
            desc="interior",
            metadata=_truth_metadata(
                f"Interior of {LABELS[value]} (dseg label {value}), free of partial volume.",
                field_strength=field_strength,
                oversample=1,
                Type="ROI",
                LabelIndex=value,
                LabelName=LABELS[value],
                InteriorRule=rule,
                PureFraction=PURE_FRACTION,
                Eroded=bool(eroded),
                VoxelCount=int(mask.sum()),
                Oversample=oversample,
            ),
        )


def write_phantom_dataset(
    output_dir,
    *,
    resolution=1.0,
    snr=math.inf,
    subjects=1,
    seed=0,
    field_strength=3.0,
    n_coils=1,
    oversample=2,
    dtype="float32",
    protocol=None,
    overwrite=False,
    command=None,
    kspace_filter="box",
    noise_gfactor=0.0,
    make_truth=None,
):
    """Simulate the phantom protocol and write a raw BIDS dataset with its ground truth.

    Parameters
    ----------
    output_dir : str or Path
        Dataset root to create. Must not exist or be empty unless ``overwrite``.
    resolution : float, optional
        Isotropic voxel size (mm) of the main images.
    snr : float, optional
        White-matter SNR of the first echo of the lowest-flip-angle VFA image (see
        :func:`qmri_workflows.phantom.simulate.reference_sigma`); ``math.inf`` for noiseless data.
    subjects : int, optional
        Number of subjects: ``sub-01`` patient, ``sub-02`` control, then alternating.
    seed : int, optional
        Non-negative seed. Subject ``i`` (0-based) uses the phantom seed ``seed + i`` and the noise
        stream ``SeedSequence([seed, i, volume index])``, so results do not depend on what else is
        simulated.
    field_strength : float, optional
        Main field (T).
    n_coils : int, optional
        Receive channels (1: Rician magnitude; more: root-sum-of-squares).
    oversample : int, optional
        Simulate on a grid this many times finer and reduce by k-space cropping (see
        :mod:`qmri_workflows.phantom.simulate`), so that the images carry partial volume and
        intravoxel dephasing that the block-averaged truth does not model; 1 makes the truth the
        exact inverse of the signal model (fast plumbing tests). The fine truth takes about
        60 bytes per fine voxel (4 GB for 1 mm at ``oversample=2``); while it is built, the B0
        field's transforms need about 4 GB more at that size (9.3 GB peak in all, measured).
    dtype : {"float32", "int16"}, optional
        Storage of the raw images.
    protocol : Protocol, optional
        Acquisition protocol; default :class:`~qmri_workflows.phantom.protocol.Protocol`.
    overwrite : bool, optional
        Replace an existing ``output_dir`` (only after the new dataset is complete).
    command : str, optional
        Command line recorded in the README.
    kspace_filter : {"box", "tukey", "none"}, optional
        How a voxel forms from the finer ones when ``oversample > 1``
        (:func:`qmri_workflows.phantom.simulate.kspace_downsample`).
    noise_gfactor : float, optional
        Spatially varying noise: peak excess of a smooth g-factor map
        (:func:`qmri_workflows.phantom.simulate.gfactor_map`; 0.5 = 50 % more noise at its centre);
        0 (default) gives uniform noise. The true per-channel noise SD of each voxel is written to
        the truth folder (``sub-XX_desc-noise_sigmamap.nii.gz``).
    make_truth : callable, optional
        Builds a subject's truth; called with the keywords ``resolution`` (of the simulation grid,
        ``resolution / oversample``), ``field_strength``, ``subject`` and ``seed`` of
        :func:`~qmri_workflows.phantom.truth.make_phantom`, which is the default. A caching wrapper
        of it lets several datasets of the same subject share one build (the simulation only reads
        the truth).

    Returns
    -------
    Path
        ``output_dir``.
    """
    from qmri_workflows.phantom.truth import make_phantom

    if make_truth is None:
        make_truth = make_phantom
    elif not callable(make_truth):
        raise ValueError(f"make_truth must be callable like make_phantom, got {type(make_truth).__name__}")
    output_dir = Path(os.path.abspath(output_dir))
    resolution = float(resolution)
    if not (math.isfinite(resolution) and resolution > 0):
        raise ValueError(f"resolution must be a positive number of mm, got {resolution!r}")
    snr = float(snr)
    if not snr > 0:
        raise ValueError(f"snr must be > 0 (inf for noiseless data), got {snr!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, (int, np.integer)) or oversample < 1:
        raise ValueError(f"oversample must be a positive integer, got {oversample!r}")
    if isinstance(n_coils, bool) or not isinstance(n_coils, (int, np.integer)) or n_coils < 1:
        raise ValueError(f"n_coils must be a positive integer, got {n_coils!r}")
    if not (math.isfinite(float(noise_gfactor)) and noise_gfactor >= 0):
        raise ValueError(f"noise_gfactor must be a finite number >= 0, got {noise_gfactor!r}")
    if kspace_filter not in KSPACE_FILTERS:
        raise ValueError(f"kspace_filter must be one of {KSPACE_FILTERS}, got {kspace_filter!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if not (math.isfinite(float(field_strength)) and field_strength > 0):
        raise ValueError(f"field_strength must be a positive number of tesla, got {field_strength!r}")
    protocol = Protocol() if protocol is None else protocol
    if not isinstance(protocol, Protocol):
        raise ValueError(f"protocol must be a Protocol, got {type(protocol).__name__}")
    participants = subject_table(subjects, seed)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{output_dir} exists and is not empty; choose another folder or pass overwrite=True")
    output_dir.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    try:
        _write_dataset(
            staging,
            participants=participants,
            resolution=resolution,
            snr=snr,
            seed=int(seed),
            field_strength=float(field_strength),
            n_coils=int(n_coils),
            oversample=int(oversample),
            dtype=dtype,
            protocol=protocol,
            make_phantom=make_truth,
            command=command,
            kspace_filter=kspace_filter,
            noise_gfactor=float(noise_gfactor),
        )
        os.chmod(staging, 0o777 & ~_umask())
        if output_dir.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
            os.rmdir(retired)
            os.replace(output_dir, retired)
            os.replace(staging, output_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_dataset(
    root,
    *,
    participants,
    resolution,
    snr,
    seed,
    field_strength,
    n_coils,
    oversample,
    dtype,
    protocol,
    make_phantom,
    command,
    kspace_filter,
    noise_gfactor=0.0,
):
    generated_by = [
        {
            "Name": "qmri-phantom",
            "Version": __version__,
            "Description": "Digital MS-brain phantom and qMRI protocol simulator of qmri-workflows",
        }
    ]
    write_dataset_description(
        root,
        name=_DATASET_NAME,
        dataset_type="raw",
        extra={
            "BIDSVersion": BIDS_VERSION,
            "License": "Simulated data; the anatomy derives from the MNI ICBM152 2009a template, whose "
            "copyright notice (README) must accompany every copy.",
            "Authors": ["qmri-workflows developers"],
            "GeneratedBy": generated_by,
            "SourceDatasets": [_ICBM_SOURCE],
            "HowToAcknowledge": "Cite qmri-workflows and the MNI ICBM152 2009a template (Fonov et al. 2009, 2011).",
            "ReferencesAndLinks": [
                "Fonov VS et al. Unbiased nonlinear average age-appropriate brain templates from birth to "
                "adulthood. NeuroImage 2009;47:S102.",
                "Fonov V et al. Unbiased average age-appropriate atlases for pediatric studies. "
                "NeuroImage 2011;54:313-327.",
            ],
        },
    )
    readme = _readme(
        command=command,
        resolution=resolution,
        snr=snr,
        n_subjects=len(participants),
        seed=seed,
        field_strength=field_strength,
        n_coils=n_coils,
        oversample=oversample,
        dtype=dtype,
        kspace_filter=kspace_filter,
        spoiling=protocol.spoiling,
    )
    (root / "README").write_text(readme, encoding="utf-8")
    (root / "CHANGES").write_text(
        f"{__version__}\n  - Simulated by qmri-phantom (qmri-workflows {__version__}).\n", encoding="utf-8"
    )
    rows = ["participant_id\tgroup\tage\tsex"] + [
        f"sub-{p['label']}\t{p['group']}\t{p['age']}\t{p['sex']}" for p in participants
    ]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    write_json(
        root / "participants.json",
        {
            "participant_id": {"Description": "Subject label"},
            "group": {
                "Description": "Simulated group",
                "Levels": {
                    "patient": "MS patient phantom (lesions, NAWM and deep grey-matter changes)",
                    "control": "Healthy control phantom",
                },
            },
            "age": {"Description": "Nominal age of the simulated subject", "Units": "year"},
            "sex": {"Description": "Nominal sex of the simulated subject", "Levels": {"F": "female", "M": "male"}},
        },
    )

    derivatives_root = root / "derivatives" / "phantom"
    write_dataset_description(
        derivatives_root,
        name=f"{_DATASET_NAME}: ground truth",
        dataset_type="derivative",
        generated_by=generated_by,
        source_datasets=[_ICBM_SOURCE],
        extra={"License": "Same as the raw dataset (see ../../README)."},
    )
    volumes = list_volumes(protocol)
    sigma = None
    for participant in participants:
        label, index = participant["label"], participant["index"]
        truth = make_phantom(
            resolution=resolution / oversample,
            field_strength=field_strength,
            subject=participant["group"],
            seed=seed + index,
        )
        rb1cor_factor = 1 if protocol.rb1cor is None else protocol.rb1cor.coarsening_factor(resolution)
        scanner = PhantomScanner(
            truth, oversample=oversample, n_coils=n_coils, rb1cor_factor=rb1cor_factor, kspace_filter=kspace_filter
        )
        if sigma is None:
            # one receiver for the whole dataset: the noise level is set on the first subject
            sigma = reference_sigma(scanner, protocol, snr)
        scanner.sigma = sigma
        if noise_gfactor > 0:
            scanner.noise_gfactor = gfactor_map(scanner.shape, noise_gfactor)
        tfl_reference = None  # the complex reference image of a tfl_b1map, for its famp
        for volume_index, volume in enumerate(volumes):
            rng = np.random.default_rng(np.random.SeedSequence([seed, index, volume_index]))
            affine, _ = scanner.grid(volume)
            if volume.kind == "tfl":
                tfl_reference = _write_tfl_image(
                    root, label, volume, scanner, rng, tfl_reference, affine, dtype, sigma, field_strength, n_coils
                )
                continue
            magnitude, phase = scanner.acquire(volume, rng=rng)
            parts = (("mag", magnitude), ("phase", phase)) if volume.with_phase else ((None, magnitude),)
            for part, data in parts:
                relative = bids_path(
                    subject=label, suffix=volume.suffix, datatype=volume.datatype, part=part, **volume.entities
                )
                _write_raw_image(root / relative, data, affine, dtype, part=part, sigma=sigma)
                write_json(
                    sidecar_path(root / relative),
                    _raw_sidecar(volume, field_strength=field_strength, part=part, n_coils=n_coils),
                )
            del magnitude, phase
        _write_truth(derivatives_root, scanner, protocol, label, field_strength=field_strength, oversample=oversample)
        _write_noise_truth(derivatives_root, scanner, label)
        write_json(
            derivatives_root / f"sub-{label}" / f"sub-{label}_desc-simulation.json",
            {
                "Description": "Parameters of the simulation of this subject's raw data.",
                "Generator": f"qmri-workflows {__version__}",
                "Group": participant["group"],
                "PhantomSeed": seed + index,
                "NoiseSeed": [seed, index],
                "NoiseSeedNote": "noise of volume v comes from numpy SeedSequence([seed, subject index, v])",
                "DatasetSeed": seed,
                "MagneticFieldStrength": field_strength,
                "Resolution": resolution,
                "Oversample": oversample,
                "KSpaceFilter": kspace_filter if oversample > 1 else "none (no k-space crop at oversample 1)",
                "SNR": None if math.isinf(snr) else snr,
                "SNRDefinition": (
                    "median noiseless white-matter magnitude of echo 1 of the lowest-flip-angle VFA "
                    "image of sub-01 divided by the noise sigma per channel"
                ),
                "NoiseSigma": sigma,
                "NoiseGFactorPeak": noise_gfactor,
                "NumberOfReceiveChannels": n_coils,
                "MagnitudeCombination": "Rician (1 channel)" if n_coils == 1 else "root-sum-of-squares",
                "PhaseCombination": "sensitivity-weighted (Roemer) with the known channel sensitivities",
                "SignalScale": SIGNAL_SCALE,
                "StorageDataType": dtype,
                "Protocol": protocol.to_dict(),
                "SpoilingSimulation": (
                    "ideal spoiling (Ernst equation; Yarnykh 2007 for AFI)"
                    if protocol.spoiling == "ideal"
                    else {
                        "Model": "extended phase graphs of the quadratic RF phase schedule, spoiler and "
                        "diffusion (qmri_workflows.phantom.epg), tabulated over T1, T2 and B1+",
                        "TissueDiffusion": TISSUE_DIFFUSION,
                        "FreeWaterDiffusion": FREE_WATER_DIFFUSION,
                        "DiffusionUnits": "mm^2/s",
                        "DiffusionT2Range": list(DIFFUSION_T2_RANGE),
                        "DiffusionNote": "tissue diffusion below the T2 range, free water above, "
                        "log-linear in T2 between",
                    }
                ),
                "MainGridShape": list(scanner.shape),
                "RB1CORGridShape": list(scanner.rb1cor_shape),
            },
        )
        del truth, scanner
