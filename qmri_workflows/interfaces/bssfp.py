"""Nipype interfaces for R2 from phase-cycled balanced SSFP.

* :class:`BandFreeBSSFP` -- one band-free signal per flip angle from its phase cycles (geometric
  solution, ellipse fit, or a magnitude-only combination), and the off-resonance map when the
  data are complex; on the map grid.
* :class:`FitDESPOT2` -- R2, T2 and the standard error of R2 by DESPOT2 on those signals, with R1
  and B1+ from the R1 family; for magnitude-only data (``despot2-fm``) by the joint fit of every
  phase-cycle magnitude instead.
"""

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
    OutputMultiObject,
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.bssfp import (
    FINITE_PULSE_T1_SHARE,
    FINITE_PULSE_T2_SHARE,
    fit_bssfp_magnitude,
    fit_despot2,
    fit_ellipse,
    geometric_off_resonance,
    geometric_solution,
    magnitude_combination,
)
from ..core.noise import correct_noise_floor, remove_orthogonal_noise
from ..io.derivatives import write_nifti
from ..io.errors import BIDSInputError
from ..io.images import check_phase_radians, load_volume, load_volumes, same_grid
from ..io.resample import resample_to_reference
from ._noise import measure_air_noise

LOGGER = logging.getLogger("qmri_workflows.interfaces")

COMPLEX_COMBINATIONS = ("geometric", "ellipse")
"""Band-free combinations that need magnitude and phase."""
MAGNITUDE_COMBINATIONS = ("rms", "max")
"""Band-reduced combinations of magnitude-only data (not band-free: DESPOT2 on them is biased)."""
JOINT_MAGNITUDE_FIT = "despot2-fm"
"""Magnitude-only data fitted cycle by cycle (DESPOT2-FM): no band-free signal, the phase cycles go to the fit."""
COMBINATIONS = (*COMPLEX_COMBINATIONS, *MAGNITUDE_COMBINATIONS, JOINT_MAGNITUDE_FIT)
"""Every value of ``combination`` (the first, ``geometric``, is the default)."""

XIANG_HOFF_REFERENCE = (
    "Xiang QS, Hoff MN. Banding artifact removal for bSSFP imaging with an elliptical signal model. "
    "Magn Reson Med 2014;71:927-933. doi:10.1002/mrm.25098"
)
BJORK_REFERENCE = (
    "Björk M, Ingle RR, Gudmundson E, Stoica P, Nishimura DG, Barral JK. Parameter estimation approach to "
    "banding artifact reduction in balanced steady-state free precession. Magn Reson Med 2014;72:880-892. "
    "doi:10.1002/mrm.24986"
)
PLANET_REFERENCE = (
    "Shcherbakova Y, van den Berg CAT, Moonen CTW, Bartels LW. PLANET: an ellipse fitting approach for "
    "simultaneous T1 and T2 mapping using phase-cycled balanced steady-state free precession. Magn Reson Med "
    "2018;79:711-722. doi:10.1002/mrm.26717"
)
DESPOT2_REFERENCES = (
    "Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient recalled acquisition in "
    "the steady state. Magn Reson Med 2003;49:515-526. doi:10.1002/mrm.10407",
    "Deoni SCL. Transverse relaxation time (T2) mapping in the brain with off-resonance correction using "
    "phase-cycled steady-state free precession imaging. J Magn Reson Imaging 2009;30:411-417. "
    "doi:10.1002/jmri.21849",
)
FINITE_PULSE_REFERENCE = (
    "Bieri O, Scheffler K. SSFP signal with finite RF pulses. Magn Reson Med 2009;62:1232-1241. doi:10.1002/mrm.22116"
)
#: Sidecar key (project convention, not BIDS) of the duration (s) of the bSSFP excitation pulse.
FINITE_PULSE_KEY = "RFPulseDuration"
COMBINATION_REFERENCES = {
    "geometric": (XIANG_HOFF_REFERENCE,),
    "ellipse": (BJORK_REFERENCE, PLANET_REFERENCE),
    "rms": (),
    "max": (),
    JOINT_MAGNITUDE_FIT: (),
}
COMBINATION_ALGORITHMS = {
    "geometric": "geometric solution (least-squares intersection of the chords joining opposite phase cycles), "
    "replaced by the complex sum where the chords are within 5 deg of parallel or the intersection lies "
    "outside the ellipse; off-resonance from where it cuts each chord",
    "ellipse": "elliptical signal model fitted to the complex phase cycles (algebraic fit, then "
    "Levenberg-Marquardt of K, a, b and the off-resonance angle); band-free signal |K|",
    "rms": "magnitude-only data: root mean square over the phase cycles (band-reduced, NOT band-free: a residual "
    "modulation with off-resonance remains and its level differs from the band-free signal, so DESPOT2 on it "
    "is biased; acquire phase images for the geometric solution)",
    "max": "magnitude-only data: maximum over the phase cycles (band-reduced, NOT band-free: a residual "
    "modulation with off-resonance remains and its level differs from the band-free signal, so DESPOT2 on it "
    "is biased; acquire phase images for the geometric solution)",
    JOINT_MAGNITUDE_FIT: "none: every phase-cycle magnitude goes to the joint DESPOT2-FM fit (see "
    "EstimationAlgorithm); the root mean square over the cycles (band-reduced) only starts it",
}
#: Why the joint fit's standard error of denoised cycles is too large. The per-cycle model of finite
#: pulses leaves a misfit of about 2.4 % of the signal (1 ms pulses, TR 5 ms, noiseless steady state)
#: that the residuals count as noise; denoising lowers the noise, not that misfit. With instantaneous
#: pulses there is no such misfit (same phantom, denoised: median SE 0.18 1/s, SD 0.31 with R1's
#: noise), so the note is for finite pulses only.
JOINT_DENOISED_SE_CAVEAT = (
    "; the phase cycles are denoised and the residuals keep the misfit of the model's finite-pulse "
    "approximation while the noise is lowered, so the standard error overstates R2's random error "
    "(3 mm phantom, 1 ms pulses, SNR 20: median about 2 x the SD of R2 in white matter; about 1 x "
    "without denoising)"
)
R2_ALGORITHMS = {
    "linear": "DESPOT2 on the band-free signal: regression S/sin(a) = m S/tan(a) + c, E2^2 = (E1 - m)/(1 - m E1)",
    "nonlinear": "DESPOT2 on the band-free signal: least squares of the band-free magnitudes over amplitude and R2 "
    "(Gauss-Newton, amplitude projected out), started from the DESPOT2 regression",
    JOINT_MAGNITUDE_FIT: "DESPOT2-FM on magnitude-only data: least squares of the magnitudes of every phase cycle and "
    "flip angle, M0 |bSSFP signal(R1, R2, off-resonance, B1+ x flip angle)|, over M0 >= 0 (projected out), R2 and "
    "the off-resonance (Levenberg-Marquardt finishing the best of 4-iteration searches from the 5 best of 12 "
    "off-resonances over 1/TR, R2 starting from DESPOT2 on the root mean square of the cycles)",
}


# --------------------------------------------------------------------------------------------------
# band-free signal
# --------------------------------------------------------------------------------------------------
def _complex_signals(magnitudes, phases, phase_scale):
    """Complex64 phase cycles from float32 magnitudes and stored phases (radians = phases x scale).

    The images are float32 on disk, so single precision loses nothing they hold; it halves the
    memory of the largest array of the step and its cos/sin cost (the core casts each chunk to
    complex128 for the combination itself).
    """
    radians = np.multiply(phases, np.float32(phase_scale), dtype=np.float32)
    signals = np.empty(magnitudes.shape, dtype=np.complex64)
    signals.real = np.cos(radians)
    signals.imag = np.sin(radians, out=radians)
    signals.real *= magnitudes
    signals.imag *= magnitudes
    return signals


class _BandFreeBSSFPInputSpec(BaseInterfaceInputSpec):
    magnitude_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="magnitude of every phase cycle of every flip angle, flip angle by flip angle, the cycles of each "
        "in the order of phase_increments",
    )
    phase_files = InputMultiObject(File(exists=True), desc="phase images in the same order (complex combinations)")
    phase_scale = traits.Float(desc="radians per stored phase unit (from the query)")
    flip_angles = traits.List(traits.Float, mandatory=True, desc="nominal flip angle (deg) of each flip angle")
    phase_increments = traits.List(traits.Float, mandatory=True, desc="RF phase-cycling increments (deg)")
    repetition_time = traits.Float(mandatory=True, desc="TR (s)")
    combination = traits.Enum(
        *COMBINATIONS,
        usedefault=True,
        desc=f"how the phase cycles are combined ({JOINT_MAGNITUDE_FIT}: the root mean square, and every cycle's "
        "magnitude written for the joint fit)",
    )
    reference_file = File(exists=True, mandatory=True, desc="an image on the map grid")
    mask_file = File(exists=True, desc="brain mask on the map grid (used when the bSSFP shares that grid)")
    pulse_duration = traits.Float(
        0.0, usedefault=True, desc="RF pulse duration (s): the off-resonance is corrected for the precession during it"
    )
    b1_file = File(exists=True, desc="B1+ ratio on the map grid, for the actual flip angle of that correction")
    n_coils = traits.Int(1, usedefault=True, desc="receive channels combined by root-sum-of-squares in the magnitudes")
    raw_magnitudes = traits.Bool(
        True,
        usedefault=True,
        desc="the magnitudes are the scanner's root-sum-of-squares images (False: denoised, their noise floor "
        "already removed): with n_coils > 1 the noise power of the channel directions orthogonal to the signal is "
        "removed before the complex signals are formed",
    )
    noise_map_file = File(
        exists=True, desc="per-channel noise SD of the phase cycles, voxel by voxel, on their grid (else: the air's)"
    )
    chunk_size = traits.Int(100_000, usedefault=True, nohash=True, desc="voxels per chunk")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads working on chunks at once")


class _BandFreeBSSFPOutputSpec(TraitedSpec):
    band_free_files = OutputMultiObject(File(exists=True), desc="band-free magnitude per flip angle, map grid")
    cycle_files = OutputMultiObject(
        File(exists=True),
        desc=f"{JOINT_MAGNITUDE_FIT} only: every phase-cycle magnitude (flip angle by flip angle), its noise floor "
        "removed when raw, on the map grid",
    )
    offresonance_file = File(exists=True, desc="off-resonance (Hz, modulo 1/TR) on the map grid; complex data only")
    noise_sigma = traits.Float(
        desc="per-channel noise SD of the phase cycles, from the air (NaN if unknown): with root-sum-of-squares "
        "data, the noise SD per part of the combined complex signal"
    )
    metadata = traits.Dict(desc="sidecar fields")


class BandFreeBSSFP(SimpleInterface):
    """Band-free bSSFP signal per flip angle, and the off-resonance frequency.

    Complex data (magnitude and phase): ``geometric`` (:func:`~qmri_workflows.core.bssfp.geometric_solution`,
    regularised by the complex sum; off-resonance from
    :func:`~qmri_workflows.core.bssfp.geometric_off_resonance`) or ``ellipse``
    (:func:`~qmri_workflows.core.bssfp.fit_ellipse`). Magnitude-only data: ``rms`` or ``max``
    (:func:`~qmri_workflows.core.bssfp.magnitude_combination`), the best combinations without phase,
    which are band-reduced, not band-free, and give no off-resonance (complex data combined by
    ``rms``/``max`` still get it from the cycles).

    With ``pulse_duration`` > 0 each flip angle's frequency is corrected for the precession during
    the RF pulse (:func:`~qmri_workflows.core.bssfp.finite_pulse_off_resonance`) at the actual flip
    angle (nominal times ``b1_file``; nominal without it).

    The off-resonance of the flip angles is averaged as phasors :math:`e^{2\\pi i f TR}` weighted by
    the squared band-free signal, so it stays defined modulo 1/TR, in [-1/(2TR), 1/(2TR)). When the
    bSSFP lies on another grid than the maps, the band-free signals are resampled linearly and the
    off-resonance by nearest neighbour (a wrapped frequency must not be interpolated).

    Root-sum-of-squares magnitudes of ``n_coils`` > 1 channels paired with the combined phase are
    not complex Gaussian data: their floor makes the band-free signal read high where it is weak,
    and DESPOT2's R2 low (-12 % in the pallidum of a 3 mm phantom at SNR 20 with 8 channels). Raw
    magnitudes of complex data therefore lose the noise power of the channel directions orthogonal
    to the signal first (:func:`~qmri_workflows.core.noise.remove_orthogonal_noise`), with the
    noise map when given, else the noise SD of the air; the sidecar's ``NoiseFloorCorrection``
    says which. The ``rms`` combination of raw magnitudes instead loses the whole floor,
    ``2 N sigma^2``, from its mean square over the cycles (:func:`~qmri_workflows.core.noise.correct_noise_floor`),
    which leaves that mean square unbiased with or without phase; ``max`` has no closed form and
    keeps its floor.

    ``despot2-fm`` (magnitude-only data, for the joint fit of :class:`FitDESPOT2`): the band-free
    files hold the root mean square (the fit's start) and ``cycle_files`` every cycle's magnitude,
    each sample of raw magnitudes less its whole floor ``2 N sigma^2`` in its square
    (:func:`~qmri_workflows.core.noise.correct_noise_floor`).
    """

    input_spec = _BandFreeBSSFPInputSpec
    output_spec = _BandFreeBSSFPOutputSpec

    def _run_interface(self, runtime):
        combination = self.inputs.combination
        flips = list(self.inputs.flip_angles)
        increments = np.deg2rad(np.asarray(self.inputs.phase_increments, dtype=float))
        n_flip, n_cycle = len(flips), increments.size
        magnitude_files = list(self.inputs.magnitude_files)
        if len(magnitude_files) != n_flip * n_cycle:
            raise ValueError(f"{len(magnitude_files)} magnitude files for {n_flip} flip angles x {n_cycle} cycles")
        has_phase = isdefined(self.inputs.phase_files) and len(self.inputs.phase_files) > 0
        if combination in COMPLEX_COMBINATIONS and not has_phase:
            raise BIDSInputError(
                f"--bssfp-combination {combination} needs the phase of every phase cycle (part-phase images), "
                f"and {magnitude_files[0]} has none; add them or use --bssfp-combination rms"
            )
        scale = self.inputs.phase_scale if isdefined(self.inputs.phase_scale) else None
        if has_phase and (scale is None or not np.isfinite(scale) or scale <= 0):
            raise BIDSInputError(
                f"phase image {self.inputs.phase_files[0]}: invalid phase scale {scale!r} (need a positive number)"
            )
        tr = self.inputs.repetition_time
        source = nib.load(magnitude_files[0])
        reference = nib.load(self.inputs.reference_file)
        on_map_grid = same_grid(source.shape, source.affine, reference.shape, reference.affine)
        shape = source.shape[:3]
        mask = None
        if on_map_grid and isdefined(self.inputs.mask_file):
            mask = load_volume(self.inputs.mask_file, reference=source) > 0

        pulse_duration = float(self.inputs.pulse_duration)
        b1 = self._b1_on_source_grid(source, on_map_grid) if pulse_duration > 0 and has_phase else None

        band_free, phasor, weight_sum = [], np.zeros(shape, complex), np.zeros(shape)
        cycles = []
        ill_conditioned = 0
        chunking = {"chunk_size": self.inputs.chunk_size, "n_jobs": self.inputs.num_threads}
        for index in range(n_flip):
            files = magnitude_files[index * n_cycle : (index + 1) * n_cycle]
            magnitudes = load_volumes(files, reference=source, require_variation=True)
            if index == 0:
                air = self._air_noise(magnitudes[..., 0], source)
                floor_sigma, floor_note = self._floor_sigma(source, air, has_phase, combination)
            phases = None
            if has_phase:
                phase_files = list(self.inputs.phase_files)[index * n_cycle : (index + 1) * n_cycle]
                phases = load_volumes(phase_files, reference=source)
                # the query read the units of the first phase cycle only, and trusts a sidecar "Units"
                for cycle, phase_file in enumerate(phase_files):
                    check_phase_radians(phases[..., cycle] * np.float32(scale), phase_file, scale, image="phase cycle")
            # NaN/Inf samples are missing data: the voxel gets NaN
            finite = np.isfinite(magnitudes).all(axis=-1)
            if phases is not None:
                finite &= np.isfinite(phases).all(axis=-1)
            fitted = finite if mask is None else (finite & mask)
            # only the fitted voxels, as (n_voxel, n_cycle): a third of the volume in a head
            voxel_magnitudes = magnitudes[fitted]
            del magnitudes
            voxel_sigma = None
            if floor_sigma is not None:
                voxel_sigma = floor_sigma[fitted] if np.ndim(floor_sigma) else floor_sigma
            if voxel_sigma is not None and combination == JOINT_MAGNITUDE_FIT:
                # the joint fit reads each sample: each loses the whole floor, 2 N sigma^2, from its square
                voxel_magnitudes = correct_noise_floor(
                    voxel_magnitudes, np.expand_dims(voxel_sigma, -1), n_coils=self.inputs.n_coils
                )
            elif voxel_sigma is not None and combination != "rms":
                voxel_magnitudes = remove_orthogonal_noise(
                    voxel_magnitudes, np.expand_dims(voxel_sigma, -1), n_coils=self.inputs.n_coils
                )
            signals = None
            if phases is not None:
                signals = _complex_signals(voxel_magnitudes, phases[fitted], scale)
                del phases
            finite_pulse = {}
            if b1 is not None:
                actual = np.deg2rad(flips[index]) * (1.0 if b1 is False else b1[fitted])
                finite_pulse = {"flip_angle": actual, "pulse_duration": pulse_duration}
            value, off_resonance = self._combine(
                signals, voxel_magnitudes, combination, increments, tr, chunking, finite_pulse
            )
            if combination == "geometric":
                value, gs_weight = value
                ill_conditioned += int((gs_weight < 1).sum())
            elif combination == "rms" and voxel_sigma is not None:
                # the mean square over cycles is unbiased once the whole 2 N sigma^2 is taken off
                value = correct_noise_floor(value, voxel_sigma, n_coils=self.inputs.n_coils)
            full = np.full(shape, np.nan)
            full[fitted] = value
            band_free.append(full)
            if combination == JOINT_MAGNITUDE_FIT:
                for cycle in range(n_cycle):
                    full = np.full(shape, np.nan, dtype=np.float32)
                    full[fitted] = voxel_magnitudes[:, cycle]
                    cycles.append(full)
            if off_resonance is not None:
                weight = value**2
                phasor[fitted] += weight * np.exp(2j * np.pi * off_resonance * tr)
                weight_sum[fitted] += weight

        metadata = {
            "BandFreeCombination": COMBINATION_ALGORITHMS[combination],
            "PhaseCyclingIncrement": [float(v) for v in self.inputs.phase_increments],
            "FlipAngle": flips,
            "RepetitionTimeExcitation": tr,
        }
        if combination == "geometric":
            metadata["ComplexSumVoxels"] = ill_conditioned
        if floor_note is not None:
            metadata["NoiseFloorCorrection"] = floor_note
        if b1 is not None:
            metadata["OffResonanceFinitePulse"] = (
                f"corrected for the precession during the {pulse_duration * 1e3:g} ms RF pulses at the "
                + ("actual flip angle (B1+ map)" if b1 is not False else "nominal flip angle (no B1+ map)")
            )
        files = []
        for index, values in enumerate(band_free):
            files.append(
                self._on_map_grid(
                    values, source, reference, on_map_grid, "linear", f"bandfree_{index}.nii", runtime.cwd
                )
            )
        self._results["band_free_files"] = files
        if cycles:
            self._results["cycle_files"] = [
                self._on_map_grid(values, source, reference, on_map_grid, "linear", f"cycle_{index}.nii", runtime.cwd)
                for index, values in enumerate(cycles)
            ]
        if weight_sum.any():
            with np.errstate(invalid="ignore", divide="ignore"):
                frequency = np.where(weight_sum > 0, np.angle(phasor) / (2 * np.pi * tr), np.nan)
            self._results["offresonance_file"] = self._on_map_grid(
                frequency, source, reference, on_map_grid, "nearest", "offresonance.nii", runtime.cwd
            )
        self._results["noise_sigma"] = math.nan if air.sigma is None else air.sigma
        self._results["metadata"] = metadata
        return runtime

    def _air_noise(self, image, source):
        voxel_size = tuple(float(v) for v in source.header.get_zooms()[:3])
        noise = measure_air_noise(image, voxel_size=voxel_size, n_coils=self.inputs.n_coils)
        if noise.sigma is None:
            LOGGER.info("R2: no noise level for the standard error (%s)", noise.problem)
        return noise

    def _floor_sigma(self, source, air, has_phase, combination):
        """(noise SD for the floor removal: a map on the bSSFP grid, a number, or None; the sidecar's note)."""
        n_coils = self.inputs.n_coils
        if combination == "max" and not has_phase:
            return None, None  # no closed form for the floor of a maximum; the sidecar says it is biased
        if not self.inputs.raw_magnitudes:
            return None, "none here: the denoising step removed the noise floor"
        if combination == JOINT_MAGNITUDE_FIT:
            removed = (
                f"each phase-cycle magnitude ({n_coils} channel(s)): its noise power 2 N sigma^2 removed from its "
                "square before the joint fit "
            )
        elif combination == "rms":
            removed = (
                f"root mean square over the phase cycles: the noise power of the magnitudes ({n_coils} channel(s)), "
                "2 N sigma^2, removed from the mean square "
            )
        elif n_coils == 1:
            return None, "none needed: one receive channel, the complex signal's noise is Gaussian"
        else:
            removed = (
                f"root-sum-of-squares magnitudes of {n_coils} channels: the noise power of the {n_coils - 1} channel "
                "directions orthogonal to the signal, 2 (N - 1) sigma^2, removed before the complex signals are "
                "formed "
            )
        if isdefined(self.inputs.noise_map_file):
            sigma_map = load_volume(self.inputs.noise_map_file, reference=source)
            sigma_map = np.where(np.isfinite(sigma_map) & (sigma_map > 0), sigma_map, np.float32(0))
            if sigma_map.any():
                return sigma_map, removed + "(sigma from the noise map)"
        if air.sigma is not None:
            return air.sigma, removed + "(sigma from the air)"
        return None, f"none: no noise level ({air.problem}); the magnitudes are used as they are"

    def _b1_on_source_grid(self, source, on_map_grid):
        """B1+ ratio on the bSSFP grid (float32), or False without a B1+ map (nominal flip angles)."""
        if not isdefined(self.inputs.b1_file):
            return False
        if on_map_grid:
            b1 = load_volume(self.inputs.b1_file, reference=source)
        else:
            image = resample_to_reference(self.inputs.b1_file, source, kind="linear", name=self.inputs.b1_file)
            b1 = np.asarray(image.dataobj, dtype=np.float32)
        # outside the B1+ map's support (NaN, 0) the nominal flip angle is the best guess
        return np.where(np.isfinite(b1) & (b1 > 0), b1, np.float32(1.0))

    @staticmethod
    def _combine(signals, magnitudes, combination, increments, tr, chunking, finite_pulse):
        """(band-free magnitude, off-resonance Hz or None) of voxels ``(n, n_cycle)``.

        For ``geometric`` the first item is ``(magnitude, weight of the geometric solution)``;
        ``finite_pulse`` holds the ``flip_angle`` and ``pulse_duration`` keywords of the frequency's
        finite-pulse correction (empty: none).
        """
        if combination == "geometric":
            value, weight = geometric_solution(signals, increments, return_weight=True, **chunking)
            off_resonance, _ = geometric_off_resonance(
                signals, increments, tr, band_free=value, **finite_pulse, **chunking
            )
            return (np.abs(value), weight), off_resonance
        if combination == "ellipse":
            fit = fit_ellipse(signals, increments, tr, **finite_pulse, **chunking)
            return np.abs(fit.amplitude), fit.off_resonance
        method = "rms" if combination == JOINT_MAGNITUDE_FIT else combination
        value = magnitude_combination(magnitudes.astype(np.float64), method=method)
        if signals is None:
            return value, None
        # complex data combined by magnitude: the off-resonance still comes from the cycles
        try:
            off_resonance, _ = geometric_off_resonance(signals, increments, tr, **finite_pulse, **chunking)
        except ValueError:  # cycles not in opposite pairs: no closed form
            off_resonance = fit_ellipse(signals, increments, tr, **finite_pulse, **chunking).off_resonance
        return value, off_resonance

    def _on_map_grid(self, values, source, reference, on_map_grid, kind, name, cwd):
        image = nib.Nifti1Image(np.asarray(values, dtype=np.float32), source.affine)
        if not on_map_grid:
            image = resample_to_reference(image, reference, kind=kind, name=self.inputs.magnitude_files[0])
        path = os.path.join(cwd, name)
        return str(write_nifti(path, np.asarray(image.dataobj, dtype=np.float32), image.affine))


# --------------------------------------------------------------------------------------------------
# DESPOT2
# --------------------------------------------------------------------------------------------------
class _FitDESPOT2InputSpec(BaseInterfaceInputSpec):
    band_free_files = InputMultiObject(File(exists=True), mandatory=True, desc="band-free signal per flip angle")
    flip_angles = traits.List(traits.Float, mandatory=True, desc="nominal flip angle (deg) of each file")
    repetition_time = traits.Float(mandatory=True, desc="TR (s)")
    r1_file = File(exists=True, mandatory=True, desc="R1 (1/s) on the map grid")
    b1_file = File(exists=True, desc="B1+ ratio (1 = nominal) on the map grid")
    b1_note = Str(desc="why there is no b1_file (recorded in the sidecar)")
    b1_source = Str(desc="where b1_file comes from (the R1 family's B1Correction: measured, estimated ...)")
    mask_file = File(exists=True, desc="voxels to fit (0 elsewhere)")
    method = traits.Enum("nonlinear", "linear", usedefault=True, desc="DESPOT2 estimator")
    combination = traits.Enum(
        *COMBINATIONS,
        usedefault=True,
        desc=f"how the band-free signals were made ({JOINT_MAGNITUDE_FIT}: the joint fit of cycle_files instead)",
    )
    cycle_files = InputMultiObject(
        File(exists=True),
        desc=f"{JOINT_MAGNITUDE_FIT}: every phase-cycle magnitude, flip angle by flip angle, the cycles of each in "
        "the order of phase_increments (BandFreeBSSFP's cycle_files)",
    )
    phase_increments = traits.List(traits.Float, desc=f"RF phase-cycling increments (deg), for {JOINT_MAGNITUDE_FIT}")
    pulse_duration = traits.Float(
        0.0, usedefault=True, desc="RF pulse duration (s) for the finite-pulse correction; 0: instantaneous pulses"
    )
    pulse_duration_source = Str(desc="where pulse_duration comes from (recorded in the sidecar)")
    offresonance_file = File(exists=True, desc="off-resonance (Hz) on the map grid, for the finite-pulse correction")
    noise_sigma = traits.Float(desc="noise SD of one phase-cycle image (NaN: unknown)")
    denoised = traits.Bool(
        False,
        usedefault=True,
        desc="the phase cycles were NLM-denoised: the noise of the air (that of the raw images) is not theirs, "
        "and is not used for the standard error",
    )
    start_r2_file = File(
        exists=True,
        desc=f"{JOINT_MAGNITUDE_FIT}: R2 (1/s) of an earlier fit of the same cycles (with a slightly different R1), "
        "to start from instead of searching the off-resonance grid",
    )
    start_offresonance_file = File(
        exists=True,
        desc=f"{JOINT_MAGNITUDE_FIT}: the off-resonance (Hz) that earlier fit found (its fitted_offresonance_file)",
    )
    chunk_size = traits.Int(200_000, usedefault=True, nohash=True, desc="voxels per chunk")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads fitting chunks at once")


class _FitDESPOT2OutputSpec(TraitedSpec):
    r2_file = File(exists=True, desc="R2 (1/s); NaN where undetermined, 0 outside the mask")
    t2_file = File(exists=True, desc="T2 (s) = 1/R2; NaN where R2 is undetermined or not positive")
    r2_stderr_file = File(exists=True, desc="standard error of R2 (1/s); NaN where unknown")
    fitted_offresonance_file = File(
        exists=True, desc=f"{JOINT_MAGNITUDE_FIT} only: the off-resonance (Hz) the joint fit found; NaN elsewhere"
    )
    metadata = traits.Dict(desc="sidecar fields")


class FitDESPOT2(SimpleInterface):
    """R2 and T2 by DESPOT2 on band-free bSSFP signals (:func:`qmri_workflows.core.bssfp.fit_despot2`).

    R1 and B1+ come from the R1 family (DESPOT1 on the spoiled GRE); errors in them propagate to R2
    (DESPOT2 at 15 and 50 deg, TR 5 ms: B1+ 10 % high moves R2 by about -19 %, 10 % low by +26 %;
    R1 10 % high by +10 %: ``tests/core/test_bssfp.py``). The standard error
    uses the residuals with more than two flip angles; with two it uses the noise SD of one phase
    cycle measured in the air, an approximation of the band-free signal's noise (the geometric
    solution of four cycles has about the noise of one cycle, more where the chords are nearly
    parallel).

    With ``pulse_duration`` > 0 the model is corrected for finite RF pulses
    (:func:`qmri_workflows.core.bssfp.finite_pulse_equivalent`), using the off-resonance map when
    given; the sidecar records the duration (``RFPulseDuration``, s) and the correction.

    ``combination="despot2-fm"`` (magnitude-only data): no band-free signal exists, so R2 comes
    from the joint fit of every phase-cycle magnitude (``cycle_files``,
    :func:`qmri_workflows.core.bssfp.fit_bssfp_magnitude`, DESPOT2-FM) with the off-resonance
    as a free parameter (the finite-pulse correction included); ``method`` is not used, and the
    standard error comes from the residuals (``n_flip x n_cycle`` magnitudes, three unknowns).
    """

    input_spec = _FitDESPOT2InputSpec
    output_spec = _FitDESPOT2OutputSpec

    def _run_interface(self, runtime):
        flips = np.asarray(self.inputs.flip_angles, dtype=float)
        if len(self.inputs.band_free_files) != flips.size:
            raise ValueError(f"{len(self.inputs.band_free_files)} band-free files for {flips.size} flip angles")
        if np.unique(flips).size < 2:
            raise BIDSInputError(
                f"DESPOT2 needs at least two different bSSFP flip angles, got {flips.tolist()} deg "
                f"({', '.join(self.inputs.band_free_files)})"
            )
        reference = nib.load(self.inputs.band_free_files[0])
        # float32 as stored: the fit converts each chunk of fitted voxels to float64 itself
        signals = load_volumes(self.inputs.band_free_files, reference=reference)
        shape = signals.shape[:3]
        mask = np.ones(shape, dtype=bool)
        if isdefined(self.inputs.mask_file):
            mask = load_volume(self.inputs.mask_file, reference=reference) > 0
        r1 = load_volume(self.inputs.r1_file, reference=reference)
        metadata = {}
        if isdefined(self.inputs.b1_file):
            b1 = load_volume(self.inputs.b1_file, reference=reference)
            b1[~(b1 > 0)] = np.nan
            metadata["B1Correction"] = "B1+ map of the R1 family (actual / nominal flip angle)" + (
                f"; R1's: {self.inputs.b1_source}" if isdefined(self.inputs.b1_source) else ""
            )
        else:
            b1 = np.ones(shape, dtype=np.float32)
            note = self.inputs.b1_note if isdefined(self.inputs.b1_note) else "no B1+ map"
            metadata["B1Correction"] = f"none: {note}; nominal flip angles assumed (R2 and R1 both biased)"
            LOGGER.info("R2: not corrected for B1+ (%s)", note)

        joint = self.inputs.combination == JOINT_MAGNITUDE_FIT
        if joint:
            signals = self._cycles(reference, flips.size)
        finite_signal = np.isfinite(signals).all(axis=(-2, -1) if joint else -1)
        usable_r1 = np.isfinite(r1) & (r1 > 0)
        fitted = mask & finite_signal & usable_r1 & np.isfinite(b1)
        sigma = None
        # Non-local means lowered the noise by a factor that varies from voxel to voxel; the air keeps
        # the raw noise, so a standard error from it would overstate the uncertainty.
        raw_noise = isdefined(self.inputs.noise_sigma) and np.isfinite(self.inputs.noise_sigma)
        if flips.size == 2 and raw_noise and not self.inputs.denoised and not joint:
            sigma = float(self.inputs.noise_sigma)
        pulse_duration, off_resonance = self._finite_pulse(reference, metadata)
        # only the voxels of ``fitted`` are read (mask), so the others need no placeholder values
        fit = self._joint_fit if joint else fit_despot2
        result = fit(
            signals,
            np.deg2rad(flips),
            self.inputs.repetition_time,
            r1,
            b1=b1,
            sigma=sigma,
            method=self.inputs.method,
            pulse_duration=pulse_duration,
            off_resonance=off_resonance,
            mask=fitted,
            chunk_size=self.inputs.chunk_size,
            n_jobs=self.inputs.num_threads,
        )

        def inside(values):
            return np.where(mask, np.where(fitted, values, np.nan), 0.0).astype(np.float32)

        r2 = inside(result.r2)
        stderr = inside(np.where(np.isfinite(result.r2_se), result.r2_se, np.nan))
        with np.errstate(divide="ignore", invalid="ignore"):
            t2 = np.where(mask, np.where(r2 > 0, 1.0 / r2, np.nan), 0.0).astype(np.float32)
        affine = reference.affine
        for key, name, data in (("r2_file", "R2map.nii", r2), ("t2_file", "T2map.nii", t2),
                                ("r2_stderr_file", "R2map_stderr.nii", stderr)):  # fmt: skip
            self._results[key] = str(write_nifti(os.path.join(runtime.cwd, name), data, affine))
        if joint:
            frequency = np.where(fitted, result.off_resonance, np.nan).astype(np.float32)
            self._results["fitted_offresonance_file"] = str(
                write_nifti(os.path.join(runtime.cwd, "offresonance_fit.nii"), frequency, affine)
            )

        counts = {
            "FittedVoxels": int(fitted.sum()),
            "NonFiniteInputVoxels": int((mask & ~finite_signal).sum()),
            "UndefinedR1Voxels": int((mask & ~usable_r1).sum()),
            "UndefinedB1Voxels": int((mask & ~np.isfinite(b1)).sum()),
            "NonPositiveR2Voxels": int((mask & fitted & ~(r2 > 0)).sum()),
        }
        fitted_count = max(counts["FittedVoxels"], 1)
        for key, what in (
            ("NonFiniteInputVoxels", "have no band-free signal (NaN/Inf in a phase cycle)"),
            ("UndefinedR1Voxels", "have no R1"),
            ("UndefinedB1Voxels", "lie outside the B1+ map"),
            ("NonPositiveR2Voxels", "have R2 <= 0 (kept in the R2 map; T2 is NaN)"),
        ):
            if counts[key]:
                LOGGER.warning(
                    "R2: %d voxel(s) (%.1f %% of the fitted) %s", counts[key], 100.0 * counts[key] / fitted_count, what
                )
        combination = self.inputs.combination
        self._results["metadata"] = {
            "EstimationAlgorithm": f"{R2_ALGORITHMS[combination if joint else self.inputs.method]}; "
            f"band-free signal per flip angle: {COMBINATION_ALGORITHMS[combination]}; R1 (and B1+) from DESPOT1 on "
            "the spoiled GRE",
            "EstimationReference": list(
                DESPOT2_REFERENCES
                + COMBINATION_REFERENCES[combination]
                + ((FINITE_PULSE_REFERENCE,) if pulse_duration > 0 else ())
            ),
            "R2StandardErrorNote": (
                f"from the residuals of the joint fit ({signals.shape[-2] * signals.shape[-1]} magnitudes, three "
                "unknowns)" + (JOINT_DENOISED_SE_CAVEAT if self.inputs.denoised and pulse_duration > 0 else "")
                if joint
                else "from the residuals of the fit (more than two flip angles)"
                if flips.size > 2
                else "none, NaN: two flip angles leave no residual, and the phase cycles are denoised (the noise "
                "measured in the air is that of the raw images, not theirs)"
                if self.inputs.denoised
                else "from the noise SD of one phase cycle in the air, taken as that of the band-free signal "
                "(approximate); NaN when unknown"
            ),
            **metadata,
            **counts,
        }
        return runtime

    def _cycles(self, reference, n_flip):
        """The phase-cycle magnitudes on the map grid, float32 (x, y, z, n_flip, n_cycle)."""
        n_cycle = len(self.inputs.phase_increments) if isdefined(self.inputs.phase_increments) else 0
        files = list(self.inputs.cycle_files) if isdefined(self.inputs.cycle_files) else []
        if n_cycle == 0 or len(files) != n_flip * n_cycle:
            raise ValueError(
                f"{JOINT_MAGNITUDE_FIT} needs cycle_files for {n_flip} flip angles x the phase_increments, got "
                f"{len(files)} files and {n_cycle} increments"
            )
        cycles = load_volumes(files, reference=reference)
        return cycles.reshape(cycles.shape[:3] + (n_flip, n_cycle))

    def _joint_fit(self, cycles, flip_angles, tr, r1, *, b1, sigma, method, pulse_duration, off_resonance, **chunking):
        """:func:`fit_bssfp_magnitude` with :func:`fit_despot2`'s call (``method``, ``off_resonance``: unused).

        With ``start_r2_file`` and ``start_offresonance_file`` (a refit after R1 moved a little) each
        voxel starts from the earlier minimum, not from the search over the off-resonance grid that
        costs most of the first fit; voxels without a finite start are searched as before.
        """
        chunking["chunk_size"] = min(chunking["chunk_size"], 50_000)
        starts = {}
        if isdefined(self.inputs.start_r2_file) and isdefined(self.inputs.start_offresonance_file):
            reference = nib.load(self.inputs.start_r2_file)
            r2_start = load_volume(self.inputs.start_r2_file).astype(np.float64)
            frequency = load_volume(self.inputs.start_offresonance_file, reference=reference).astype(np.float64)
            starts = {"r2_start": r2_start, "off_resonance_start": frequency}
        return fit_bssfp_magnitude(
            cycles,
            flip_angles,
            np.deg2rad(np.asarray(self.inputs.phase_increments, dtype=float)),
            tr,
            r1,
            b1=b1,
            sigma=sigma,
            pulse_duration=pulse_duration,
            **starts,
            **chunking,
        )

    def _finite_pulse(self, reference, metadata):
        """Pulse duration (s) and off-resonance map (Hz or None) of the finite-pulse correction."""
        pulse_duration = float(self.inputs.pulse_duration)
        tr = float(self.inputs.repetition_time)
        if not (math.isfinite(pulse_duration) and 0.0 <= pulse_duration < tr):
            raise BIDSInputError(
                f"RF pulse duration {pulse_duration!r} s is not in [0, TR = {tr:g} s) (bSSFP "
                f"{self.inputs.band_free_files[0]}); give it in seconds ({FINITE_PULSE_KEY} or --bssfp-pulse-duration)"
            )
        source = self.inputs.pulse_duration_source if isdefined(self.inputs.pulse_duration_source) else "given"
        metadata[FINITE_PULSE_KEY] = pulse_duration
        if pulse_duration == 0.0:
            metadata["FinitePulseCorrection"] = f"none: instantaneous RF pulses assumed ({source})"
            return pulse_duration, None
        off_resonance = None
        if isdefined(self.inputs.offresonance_file):
            off_resonance = load_volume(self.inputs.offresonance_file, reference=reference).astype(np.float64)
            off_resonance[~np.isfinite(off_resonance)] = 0.0
        frequency = "the off-resonance map (modulo 1/TR)" if off_resonance is not None else "on resonance (0 Hz)"
        if self.inputs.combination == JOINT_MAGNITUDE_FIT:
            frequency = "the off-resonance the joint fit finds (the equivalent applied to every phase cycle)"
        metadata["FinitePulseCorrection"] = (
            f"rectangular RF pulses of {pulse_duration * 1e3:g} ms ({source}): band-free signal modelled with "
            f"E2 over TR - {FINITE_PULSE_T2_SHARE:.3g} TRF, E1 over TR + {FINITE_PULSE_T1_SHARE:.3g} TRF "
            f"tan^2(a/2) and the flip angle reduced by the off-resonance during the pulse, from {frequency}"
        )
        return pulse_duration, off_resonance
