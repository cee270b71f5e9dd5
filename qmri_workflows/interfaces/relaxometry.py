"""Nipype interfaces for B1+ (transmit field) and R1 mapping.

* :class:`AFIFlipAngleMap` -- the AFI pair to a ``TB1map`` (percent of the nominal flip angle) on the
  map grid.
* :class:`ReadTB1map` -- a pre-computed ``TB1map`` (raw ``fmap`` or ``--derivatives``; already on the map grid), read by
  its ``Units`` and written in percent.
* :class:`FitR1` -- DESPOT1 from one TE = 0 intercept (or single-echo image) per flip angle,
  B1-corrected and corrected for imperfect RF spoiling.
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
    SimpleInterface,
    Str,
    TraitedSpec,
    isdefined,
    traits,
)

from ..core.relaxometry import (
    DEFAULT_TISSUE_T2,
    afi_flip_angle_ratio,
    afi_t1_bias,
    dam_flip_angle_ratio,
    fit_r1,
    spoiling_protocol,
    trusted_voxels,
)
from ..io.derivatives import write_nifti
from ..io.errors import BIDSInputError
from ..io.images import load_volume, load_volumes, same_grid
from ..io.query.derivatives import tb1map_scale
from ..io.query.fieldmaps import TFL_HEAD_FRACTION
from ..io.resample import resample_to_reference
from ._noise import measure_air_noise

LOGGER = logging.getLogger("qmri_workflows.interfaces")

DAM_REFERENCE = (
    "Insko EK, Bolinger L. Mapping of the radiofrequency field. J Magn Reson A 1993;103:82-85; Stollberger R, "
    "Wach P. Imaging of the active B1 field in vivo. Magn Reson Med 1996;35:246-251"
)
TFL_REFERENCE = (
    "Chung S, Kim D, Breton E, Axel L. Rapid B1+ mapping using a preconditioning RF pulse with TurboFLASH "
    "readout. Magn Reson Med 2010;64:439-446"
)
AFI_REFERENCE = (
    "Yarnykh VL. Actual flip-angle imaging in the pulsed steady state: a method for rapid "
    "three-dimensional mapping of the transmitted radiofrequency field. Magn Reson Med 2007;57:192-200"
)
DESPOT1_REFERENCES = (
    "Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient recalled acquisition "
    "in the steady state. Magn Reson Med 2003;49:515-526",
    "Helms G, Dathe H, Dechent P. Quantitative FLASH MRI at 3T using a rational approximation of the "
    "Ernst equation. Magn Reson Med 2008;59:667-672",
    "Chang L-C, Koay CG, Basser PJ, Pierpaoli C. Linear least-squares method for unbiased estimation of "
    "T1 from SPGR signals. Magn Reson Med 2008;60:496-501",
)
SPOILING_REFERENCES = (
    "Preibisch C, Deichmann R. Influence of RF spoiling on the stability and accuracy of T1 mapping based "
    "on spoiled FLASH with varying flip angles. Magn Reson Med 2009;61:125-135",
    "Baudrexel S, Noeth U, Schuere JR, Deichmann R. T1 mapping with the variable flip angle technique: a "
    "simple correction for insufficient spoiling of transverse magnetization. Magn Reson Med "
    "2018;79:3082-3092",
)

R1_METHODS = {
    "exact": "two_angle",
    "linear": "linear",
    "nonlinear": "nonlinear",
}
R1_ALGORITHMS = {
    "exact": "DESPOT1, exact two-angle solution of the Ernst equation at the actual flip angles",
    "linear": "DESPOT1, linearised Ernst equation (S/sin a vs S/tan a) fitted by weighted least squares "
    "(Chang 2008 weights, iterated) at the actual flip angles",
    "nonlinear": "DESPOT1, non-linear least squares of the Ernst equation at the actual flip angles "
    "(Levenberg-Marquardt from the weighted linear fit)",
}


# --------------------------------------------------------------------------------------------------
# B1+ from a pair of images (AFI, double-angle method)
# --------------------------------------------------------------------------------------------------
class _PairInputSpec(BaseInterfaceInputSpec):
    reference_file = File(exists=True, desc="image on the map grid; without it the map stays on the pair's grid")
    smoothing_fwhm = traits.Float(8.0, usedefault=True, desc="FWHM (mm) of the normalised-convolution smoothing")
    min_signal_fraction = traits.Float(
        0.05, usedefault=True, desc="first-image voxels below this fraction of its 99th percentile are not trusted"
    )
    n_coils = traits.Int(1, usedefault=True, desc="receive channels combined by root-sum-of-squares")


class _PairOutputSpec(TraitedSpec):
    tb1map_file = File(exists=True, desc="B1+ in percent of the nominal flip angle, on the map grid")
    metadata = traits.Dict(desc="sidecar fields")


class _FlipAnglePairMap(SimpleInterface):
    """B1+ map (percent of nominal) from two magnitude images whose ratio gives the flip angle.

    Subclasses name the two files (:meth:`_pair`) and estimate the ratio map on the pair's grid
    (:meth:`_estimate`, a core function returning an :class:`~qmri_workflows.core.relaxometry.AFIMap`);
    here: the noise SD of each image, measured in the air around the head of the first (the
    second's head may be too dark to find the air by), so that the core removes the magnitude
    noise floor first (without measurable air noise the ratio is taken as it is, and the sidecar
    says so; the air gives the floor's power ``2 N sigma^2`` as a whole, so a wrong ``n_coils``
    does not bias it), then the smooth map brought onto the map grid by linear interpolation (NaN
    outside the pair's field of view) and the sidecar.
    """

    output_spec = _PairOutputSpec
    what = "pair"  # in messages
    key = "Pair"  # in sidecar keys

    def _pair(self):
        raise NotImplementedError

    def _estimate(self, signal_1, signal_2, voxel_size, noise_sigma):
        raise NotImplementedError

    def _method_metadata(self):
        raise NotImplementedError

    def _run_interface(self, runtime):
        first, second = self._pair()
        first_image = nib.load(first)
        signal_1, signal_2 = load_volumes([first, second], reference=first_image, require_variation=True).transpose(
            3, 0, 1, 2
        )
        non_finite = ~(np.isfinite(signal_1) & np.isfinite(signal_2))
        voxel_size = tuple(float(v) for v in first_image.header.get_zooms()[:3])
        noise_sigma, floor_note = self._noise_sigma(signal_1, signal_2, voxel_size)
        try:
            estimate = self._estimate(
                np.where(non_finite, np.nan, signal_1), np.where(non_finite, np.nan, signal_2), voxel_size, noise_sigma
            )
        except ValueError as error:
            raise BIDSInputError(f"{self.what} {first}, {second}: {error}") from error
        percent = (100.0 * estimate.b1).astype(np.float32)
        affine = first_image.affine
        if isdefined(self.inputs.reference_file) and not _on_grid(first_image, self.inputs.reference_file):
            resampled = resample_to_reference(
                nib.Nifti1Image(percent, affine), self.inputs.reference_file, kind="linear", name=first
            )
            percent, affine = np.asarray(resampled.dataobj, dtype=np.float32), resampled.affine
        self._results["tb1map_file"] = str(write_nifti(os.path.join(runtime.cwd, "TB1map.nii"), percent, affine))
        n_valid = int(estimate.valid.sum())
        if non_finite.any():
            LOGGER.warning(
                "B1+: %d voxel(s) of the %s hold NaN/Inf; they are filled from their neighbours",
                non_finite.sum(),
                self.what,
            )
        self._results["metadata"] = {
            "Units": "percent",
            **self._method_metadata(),
            f"Valid{self.key}Voxels": n_valid,
            f"Filled{self.key}Voxels": int(estimate.valid.size - n_valid),
            "NonFiniteInputVoxels": int(non_finite.sum()),
            "NoiseFloorCorrection": floor_note,
        }
        return runtime

    def _map_options(self, voxel_size, noise_sigma):
        """Keywords the core's ratio-map functions share."""
        return {
            "voxel_size": voxel_size,
            "smoothing_fwhm": self.inputs.smoothing_fwhm,
            "min_signal_fraction": self.inputs.min_signal_fraction,
            "noise_sigma": noise_sigma,
            "n_coils": self.inputs.n_coils,
        }

    def _smoothing_text(self, first):
        return (
            f"voxels below {self.inputs.min_signal_fraction:g} x the 99th percentile of {first} or with an "
            f"impossible ratio discarded; normalised convolution (Gaussian FWHM {self.inputs.smoothing_fwhm:g} mm, "
            f"weights {first}^2) smooths and fills them; resampled linearly onto the map grid"
        )

    def _noise_sigma(self, signal_1, signal_2, voxel_size):
        """Noise SD of each image in the air of the first image (the second image's head may be too
        dark to find the air by), and the sidecar's note; None without measurable air noise."""
        n_coils = self.inputs.n_coils
        first = measure_air_noise(signal_1, voxel_size=voxel_size, n_coils=n_coils)
        if first.sigma is None:
            return None, f"none: {first.problem}"
        second = measure_air_noise(signal_2, voxel_size=voxel_size, n_coils=n_coils, air=first.air)
        if second.sigma is None:
            return None, f"none: in the second image ({self._pair()[1]}), {second.problem}"
        sigma = [first.sigma, second.sigma]
        return sigma, (
            f"sqrt(M^2 - 2 N sigma^2) with N = {n_coils} channel(s) and the noise SD in the air "
            f"({sigma[0]:.4g} and {sigma[1]:.4g}), before the ratio"
        )


class _AFIFlipAngleMapInputSpec(_PairInputSpec):
    tr1_file = File(exists=True, mandatory=True, desc="AFI image after the shorter TR (acq-tr1)")
    tr2_file = File(exists=True, mandatory=True, desc="AFI image after the longer TR (acq-tr2)")
    repetition_time_1 = traits.Float(mandatory=True, desc="TR1 (s)")
    repetition_time_2 = traits.Float(mandatory=True, desc="TR2 (s), > TR1")
    flip_angle = traits.Float(mandatory=True, desc="nominal flip angle (deg) of the AFI pulses")


class AFIFlipAngleMap(_FlipAnglePairMap):
    """B1+ map (percent of nominal) from an AFI pair (:func:`qmri_workflows.core.relaxometry.afi_flip_angle_ratio`
    on the AFI grid; the rest as :class:`_FlipAnglePairMap`)."""

    input_spec = _AFIFlipAngleMapInputSpec
    what = "AFI pair"
    key = "AFI"

    def _pair(self):
        return self.inputs.tr1_file, self.inputs.tr2_file

    def _estimate(self, signal_1, signal_2, voxel_size, noise_sigma):
        return afi_flip_angle_ratio(
            signal_1,
            signal_2,
            self.inputs.repetition_time_1,
            self.inputs.repetition_time_2,
            math.radians(self.inputs.flip_angle),
            **self._map_options(voxel_size, noise_sigma),
        )

    def _method_metadata(self):
        return {
            "EstimationAlgorithm": (
                "AFI: actual flip angle arccos((r n - 1)/(n - r)), r = S(TR2)/S(TR1), n = TR2/TR1, over the "
                f"nominal; {self._smoothing_text('S(TR1)')}"
            ),
            "EstimationReference": AFI_REFERENCE,
            "FlipAngle": self.inputs.flip_angle,
            "RepetitionTimeExcitation": [self.inputs.repetition_time_1, self.inputs.repetition_time_2],
        }


#: Share of the head a B1+ map reads above FOLD_MARGIN x its method's limit beyond which it may be
#: folded back there (the double-angle method at pi/a2, the tfl_b1map at 180 deg)
FOLD_SHARE = 0.01
FOLD_MARGIN = 0.9


def _fold_note(share, reading, folding, source):
    """The sidecar's FoldCheck: ``share`` of the head near the limit (``reading`` says what), and above
    :data:`FOLD_SHARE` what folding means (``folding``), logged as a warning naming ``source``."""
    text = f"{100 * share:.2g} % of {reading}"
    if share <= FOLD_SHARE:
        return text
    text += f"; {folding}"
    LOGGER.warning("B1+ (%s): %s", source, text)
    return text


class _DAMFlipAngleMapInputSpec(_PairInputSpec):
    flip1_file = File(exists=True, mandatory=True, desc="image at the smaller nominal flip angle (flip-1)")
    flip2_file = File(exists=True, mandatory=True, desc="image at the larger nominal flip angle (flip-2)")
    flip_angles = traits.Tuple(traits.Float, traits.Float, mandatory=True, desc="nominal flip angles (deg), a1 < a2")
    repetition_time = traits.Float(mandatory=True, desc="TR (s) of the double-angle images")
    vfa_files = InputMultiObject(
        File(exists=True),
        desc="one spoiled gradient echo per VFA flip angle, all at one echo time (e.g. each flip angle's first "
        "echo): their T1 removes the double-angle reading's T1 bias voxel by voxel",
    )
    vfa_flip_angles = traits.List(traits.Float, desc="nominal flip angle (deg) of each vfa_files image")
    vfa_repetition_time = traits.Float(desc="TR (s) of the VFA images")
    vfa_phase_increment = traits.Float(
        desc="RF-spoiling increment (deg) of the VFA images: their T1 is corrected for imperfect spoiling (else not)"
    )
    vfa_gradient_moment = traits.Float(desc="SpoilingGradientMoment (mT s/m) of the VFA images")
    t1_rounds = traits.Int(12, usedefault=True, desc="most rounds of T1 (VFA, at the current B1+) and B1+ (at that T1)")
    t1_note = Str(desc="why there are no vfa_files (for the sidecar)")


class DAMFlipAngleMap(_FlipAnglePairMap):
    """B1+ map (percent of nominal) from a double-angle pair
    (:func:`qmri_workflows.core.relaxometry.dam_flip_angle_ratio`; the rest as
    :class:`_FlipAnglePairMap`).

    A double-angle TR is rarely long against every T1, and the long-TR reading is then high by an
    amount that differs between tissues (60/120 deg, TR 2 s: +5 % in white matter, +10 % in grey
    matter, +24 % in CSF), which the smoothing would mix. With VFA images the ratio is read at each
    voxel's T1 instead: T1 by DESPOT1 from the VFA images at the current B1+ map (corrected for
    imperfect spoiling when the increment is known: without, the 3 mm phantom's map reads -0.9 %
    instead of -0.1 %), then B1+ at that T1,
    until a round changes B1+ by less than 0.1 % of nominal in 99 % of the trusted voxels or for
    ``t1_rounds`` rounds; the sidecar says how many. Plain rounds shrink the change about 3-fold, so
    from the third on each step is stretched by the measured rate (four or five rounds on the
    phantom at TR 2 s instead of eight; 1 mm: 53 s with another job on the 2 cores, 1.76 GiB,
    ``benchmarks/bench_dam.py``).
    Without VFA images the long-TR model is used and the sidecar says so.
    """

    input_spec = _DAMFlipAngleMapInputSpec
    what = "double-angle pair"
    key = "DAM"

    def _pair(self):
        return self.inputs.flip1_file, self.inputs.flip2_file

    def _estimate(self, signal_1, signal_2, voxel_size, noise_sigma):
        estimate = self._estimate_at_t1(signal_1, signal_2, voxel_size, noise_sigma)
        self._fold_note = self._fold_check(estimate)
        return estimate

    def _fold_check(self, estimate):
        """The sidecar's FoldCheck, with a warning when the field may pass pi/a2.

        Magnitudes cannot tell B1 a2 = pi + x from pi - x, so a field above pi/a2 (1.5 for 60/120
        deg, within reach at 7 T) reads as 2 pi/a2 - B1 without any sign in the ratio: only many
        voxels read close to the limit betray it (none on a 3 T head; B1+ peaking at 1.65 put 28 %
        of the brain above 0.9 x the limit and read the centre 11 % low).
        """
        limit = math.pi / math.radians(self.inputs.flip_angles[1])
        near = estimate.valid & (estimate.b1_raw > FOLD_MARGIN * limit)
        share = float(near.sum()) / max(int(estimate.valid.sum()), 1)
        return _fold_note(
            share,
            f"the trusted voxels read B1+ above {FOLD_MARGIN:g} x the method's limit pi/a2 = {100 * limit:.0f} % of "
            "nominal",
            f"where the field exceeds the limit the double-angle method folds back ({100 * limit:.0f} + x % reads "
            f"as {100 * limit:.0f} - x %), so the map may be low where it is brightest: check it, or map B1+ with "
            "smaller flip angles",
            f"double-angle pair {self.inputs.flip1_file}",
        )

    def _estimate_at_t1(self, signal_1, signal_2, voxel_size, noise_sigma):
        flip_1, flip_2 = (math.radians(angle) for angle in self.inputs.flip_angles)
        options = self._map_options(voxel_size, noise_sigma)
        estimate = dam_flip_angle_ratio(signal_1, signal_2, flip_1, flip_2, **options)
        if not (isdefined(self.inputs.vfa_files) and len(self.inputs.vfa_files) >= 2):
            why_not = self.inputs.t1_note if isdefined(self.inputs.t1_note) else "no VFA images for T1"
            self._t1_note = f"none: {why_not}; long-TR model (full relaxation between excitations)"
            return estimate
        vfa_image = nib.load(self.inputs.vfa_files[0])
        vfa = load_volumes(list(self.inputs.vfa_files), reference=vfa_image)
        same = _on_grid(vfa_image, self.inputs.flip1_file)
        strong = np.isfinite(vfa).all(axis=-1) & trusted_voxels(vfa[..., 0], 0.05)
        vfa = np.where(strong[..., None], vfa, 0.0)  # DESPOT1 of the head alone, every round
        spoiling = {}
        if isdefined(self.inputs.vfa_phase_increment):
            # the VFA's imperfect spoiling biases its T1 by a few percent, the map by about 1 %
            moment = self.inputs.vfa_gradient_moment if isdefined(self.inputs.vfa_gradient_moment) else None
            # one iteration of the correction: the T1 it leaves moves B1+ by well under 0.1 %
            spoiling["n_spoiling_iterations"] = 1
            spoiling["spoiling"] = spoiling_protocol(
                np.deg2rad(self.inputs.vfa_flip_angles),
                self.inputs.vfa_repetition_time,
                phase_increment_deg=self.inputs.vfa_phase_increment,
                gradient_moment=moment,
            )
        # Fixed point B1 = F(B1): F reads the ratio at the T1 that DESPOT1 gives at B1. Plain
        # rounds shrink the change by a steady factor rho (about 0.3 on the phantom), so after two
        # of them each step is stretched by 1 / (1 - rho): four or five rounds instead of eight on
        # the phantom.
        current, stretch = estimate.b1, 1.0
        change, previous_change, rounds = math.nan, math.nan, 0
        while rounds < self.inputs.t1_rounds:
            rounds += 1
            b1 = current if same else self._moved(current, self.inputs.flip1_file, self.inputs.vfa_files[0])
            fit = fit_r1(
                vfa,
                np.deg2rad(self.inputs.vfa_flip_angles),
                self.inputs.vfa_repetition_time,
                b1=np.where(strong & np.isfinite(b1), b1, 1.0),
                mask=strong,
                **spoiling,
            )
            with np.errstate(divide="ignore", invalid="ignore"):
                t1 = np.where(strong & (fit.r1 > 0), 1.0 / fit.r1, np.nan)
            if not same:
                t1 = self._moved(t1, self.inputs.vfa_files[0], self.inputs.flip1_file)
            estimate = dam_flip_angle_ratio(
                signal_1, signal_2, flip_1, flip_2, repetition_time=self.inputs.repetition_time, t1=t1, **options
            )
            step = estimate.b1 - current
            change = float(np.nanpercentile(np.abs(step)[estimate.valid], 99))
            if change < 1e-3:
                break
            if rounds == 2 and previous_change > 0:
                rho = min(max(change / previous_change, 0.0), 0.75)
                stretch = 1.0 / (1.0 - rho)
            previous_change = change
            current = current + stretch * step
        self._t1_note = (
            f"ratio read at each voxel's T1 (Ernst signals at TR {self.inputs.repetition_time:g} s), T1 by DESPOT1 "
            f"of the {len(self.inputs.vfa_files)} VFA images at the current B1+ "
            + (
                f"(corrected for imperfect spoiling, increment {self.inputs.vfa_phase_increment:g} deg)"
                if spoiling
                else "(not corrected for imperfect spoiling: no increment known)"
            )
            + f"; {rounds} round(s), the last "
            f"changed B1+ by at most {100 * change:.2g} % of nominal in 99 % of the trusted voxels"
        )
        return estimate

    @staticmethod
    def _moved(values, source_file, target_file):
        """``values`` on the grid of ``source_file`` brought linearly onto that of ``target_file``."""
        image = nib.Nifti1Image(np.asarray(values, dtype=np.float32), nib.load(source_file).affine)
        return np.asarray(resample_to_reference(image, target_file, kind="linear", name=source_file).dataobj)

    def _method_metadata(self):
        flip_1, flip_2 = self.inputs.flip_angles
        return {
            "EstimationAlgorithm": (
                "double-angle method: actual flip angle B1 a1 solving S(a2)/S(a1) = sin(B1 a2)/sin(B1 a1) x "
                "(1 - E1 cos(B1 a1))/(1 - E1 cos(B1 a2)), E1 = exp(-TR/T1), over the nominal; "
                f"{self._smoothing_text('S(a1)')}"
            ),
            "EstimationReference": DAM_REFERENCE,
            "FlipAngle": [flip_1, flip_2],
            "RepetitionTimeExcitation": self.inputs.repetition_time,
            "T1Correction": self._t1_note,
            "FoldCheck": self._fold_note,
        }


def _on_grid(image, reference_file):
    reference = nib.load(reference_file)
    return same_grid(image.shape[:3], image.affine, reference.shape[:3], reference.affine)


class _ReadTB1mapInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the TB1map on the map grid")
    units = Str(desc="its sidecar's Units; undefined when the sidecar has none")
    source_name = Str(desc="the original file (for messages and provenance)")


class _ReadTB1mapOutputSpec(TraitedSpec):
    tb1map_file = File(exists=True, desc="B1+ in percent of the nominal flip angle")
    metadata = traits.Dict(desc="how the unit was read")


class ReadTB1map(SimpleInterface):
    """A user TB1map in percent of nominal, whatever its unit (see :func:`tb1map_scale`)."""

    input_spec = _ReadTB1mapInputSpec
    output_spec = _ReadTB1mapOutputSpec

    def _run_interface(self, runtime):
        name = self.inputs.source_name if isdefined(self.inputs.source_name) else self.inputs.in_file
        values, affine = self._load(name)
        scale, how = self._scale(values, name)
        percent = np.where(values > 0, 100.0 * scale * values, np.nan).astype(np.float32)
        self._results["tb1map_file"] = str(write_nifti(os.path.join(runtime.cwd, "TB1map.nii"), percent, affine))
        self._results["metadata"] = {
            "Units": "percent",
            "B1Source": str(name),
            "B1UnitsRead": how,
            **self._method_metadata(),
        }
        return runtime

    def _load(self, name):
        """``(values, affine)`` of the map on the grid it is written on."""
        return load_volume(self.inputs.in_file), nib.load(self.inputs.in_file).affine

    def _scale(self, values, name):
        """``(factor to the ratio actual / nominal, how the unit was read)``."""
        return tb1map_scale(values, self.inputs.units if isdefined(self.inputs.units) else None, name)

    def _method_metadata(self):
        return {}


class _ReadTFLMapInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the famp image of a Siemens tfl_b1map, on any grid")
    reference_file = File(exists=True, desc="an image on the map grid, onto which famp is brought (default: in_file's)")
    anat_file = File(
        exists=True, desc="the tfl_b1map's reference image (acq-anat, any grid): the head of the fold check"
    )
    prep_angle = traits.Float(mandatory=True, desc="nominal preparation (saturation) flip angle (deg)")
    angle_source = Str(mandatory=True, desc="where prep_angle comes from (sidecar FlipAngle or the option)")
    source_name = Str(desc="the original famp file (for messages and provenance)")


def _fill_from_neighbours(values):
    """``values`` with each non-finite voxel that has a finite one among its 26 neighbours set to
    their mean (one pass: holes close, masks grow by one voxel)."""
    from scipy import ndimage

    finite = np.isfinite(values)
    box = np.ones((3, 3, 3))
    total = ndimage.convolve(np.where(finite, values, 0.0).astype(np.float64), box, mode="constant")
    count = ndimage.convolve(finite.astype(np.float64), box, mode="constant")
    fill = ~finite & (count > 0)
    filled = values.copy()
    filled[fill] = total[fill] / count[fill]
    return filled


class ReadTFLMap(ReadTB1map):
    """B1+ (percent of nominal) from the flip-angle map of a Siemens ``tfl_b1map``: famp holds 10 x
    the actual preparation angle (deg), so B1+ = famp / (10 x nominal angle); read as a TB1map is
    (brought linearly onto the grid of ``reference_file``, not smoothed).

    famp values of 0 or below are no flip angle (the scanner masks the background with 0; a
    preparation that does not tip is not a head's B1+) and count as missing while famp is
    resampled: interpolated into the head's edge from a coarser famp, as a TB1map's values are,
    they read B1+ low there (-12 % median, 5th percentile -32 % at the brain's edge on the 3 mm
    phantom with a masked 5 mm famp). Each missing voxel with a finite neighbour (of 26) takes
    their mean first, on famp's own grid: holes in the head close whatever the grids (on the map
    grid nothing would fill them), and a mask's edge moves one famp voxel out, so that the brain's
    edge is covered (B1+ is smooth over a voxel); the resampling then fills from finite neighbours
    within one famp voxel (:func:`~qmri_workflows.io.resample.resample_to_reference`).
    """

    input_spec = _ReadTFLMapInputSpec

    def _load(self, name):
        image = nib.load(self.inputs.in_file)
        famp = load_volume(self.inputs.in_file)
        famp = _fill_from_neighbours(np.where(famp > 0, famp, np.nan).astype(np.float32))
        grid = nib.Nifti1Image(famp, image.affine)
        if isdefined(self.inputs.reference_file):
            grid = resample_to_reference(grid, self.inputs.reference_file, kind="linear", name=str(name))
            famp = np.asarray(grid.dataobj, dtype=np.float32)
        self._fold_note = self._fold_check(famp, grid, name)
        return famp, grid.affine

    def _head(self, famp, grid):
        """The head on the map grid: where the tfl_b1map's own reference has signal, else the map
        grid's image (whose noise floor may pass the threshold: the median filter keeps it quiet)."""
        if isdefined(self.inputs.anat_file):
            # min_coverage 0: famp's own resampling has warned about a field of view they share
            anat = resample_to_reference(self.inputs.anat_file, grid, kind="linear", min_coverage=0.0)
            signal = np.asarray(anat.dataobj)
        elif isdefined(self.inputs.reference_file):
            signal = load_volume(self.inputs.reference_file)
        else:
            return np.isfinite(famp)
        return trusted_voxels(signal, TFL_HEAD_FRACTION) & np.isfinite(famp)

    def _fold_check(self, famp, grid, name):
        """The sidecar's FoldCheck, with a warning when the preparation may pass 180 deg.

        famp is arccos of the saturated / reference signal, within 0-180 deg: an actual angle of
        180 + x deg reads as 180 - x (B1+ 2.25 at 80 deg, within reach at 7 T), and near 180 deg,
        where the cosine is flat, noise moves the angle most. Only many voxels read close to the
        limit betray it (none on a 3 T head: B1+ 1.22 is 98 deg at 80 deg).
        """
        from scipy import ndimage

        # a fold is a smooth region; famp of noise (arccos of noise ratios, anywhere in 0-180 deg) is
        # not, and a 3-voxel median filter removes it (8 % of the phantom's head above 162 deg -> 0.01 %)
        angles = ndimage.median_filter(np.nan_to_num(famp, nan=0.0), size=3)[self._head(famp, grid)] / 10.0
        limit = FOLD_MARGIN * 180.0
        share = float(np.mean(angles > limit)) if angles.size else 0.0
        return _fold_note(
            share,
            f"the head reads a preparation angle above {limit:g} deg",
            "famp cannot exceed 180 deg and folds back (180 + x deg reads as 180 - x deg), so B1+ may be low "
            f"where it is highest (above {180 / self.inputs.prep_angle:.3g} of nominal at {self.inputs.prep_angle:g} "
            "deg): check the map, or map B1+ with a smaller preparation angle",
            f"Siemens tfl_b1map {name}",
        )

    def _scale(self, values, name):
        angle = self.inputs.prep_angle
        return 1.0 / (10.0 * angle), f"famp / 10 / {angle:g} deg (angle from {self.inputs.angle_source})"

    def _method_metadata(self):
        return {
            "EstimationAlgorithm": (
                "Siemens tfl_b1map (saturation-prepared TurboFLASH): B1+ = famp / (10 x nominal preparation angle "
                f"{self.inputs.prep_angle:g} deg, from {self.inputs.angle_source}); resampled linearly onto the map "
                "grid, not smoothed"
            ),
            "EstimationReference": TFL_REFERENCE,
            "PreparationFlipAngle": self.inputs.prep_angle,
            "FoldCheck": self._fold_note,
        }


# --------------------------------------------------------------------------------------------------
# R1
# --------------------------------------------------------------------------------------------------
class _FitR1InputSpec(BaseInterfaceInputSpec):
    signal_files = InputMultiObject(
        File(exists=True),
        mandatory=True,
        desc="one image per flip angle: TE = 0 intercepts (ESTATICS S0) or single-echo images",
    )
    flip_angles = traits.List(traits.Float, mandatory=True, desc="nominal flip angle (deg) of each file")
    repetition_time = traits.Float(mandatory=True, desc="TR (s), shared by the flip angles")
    mask_file = File(exists=True, desc="voxels to fit (0 elsewhere)")
    b1_file = File(exists=True, desc="B1+ in percent of nominal on the grid of the signals (TB1map)")
    b1_note = Str(desc="why there is no b1_file (recorded in the sidecar)")
    b1_description = Str(desc="where b1_file comes from, when not a measured map (recorded in the sidecar)")
    afi_repetition_times = traits.List(
        traits.Float, minlen=2, maxlen=2, desc="TR1, TR2 (s) of the AFI pair b1_file comes from"
    )
    afi_flip_angle = traits.Float(
        desc="nominal AFI flip angle (deg); with afi_repetition_times, the AFI "
        "formula's finite-T1 bias is removed with the fitted T1"
    )
    method = traits.Enum("linear", "exact", "nonlinear", usedefault=True, desc="DESPOT1 estimator")
    spoiling_correction = traits.Bool(True, usedefault=True, desc="correct for imperfect RF spoiling")
    phase_increment = traits.Float(desc="SpoilingRFPhaseIncrement (deg) of the sidecar")
    manufacturer = Str(desc="Manufacturer of the sidecar (vendor default increment)")
    gradient_moment = traits.Float(desc="SpoilingGradientMoment (mT s/m) of the sidecar")
    tissue_t2 = traits.Float(
        DEFAULT_TISSUE_T2, usedefault=True, desc="T2 (s) the spoiling correction assumes without R2 or R2* maps"
    )
    r2_file = File(exists=True, desc="R2 (1/s) on the grid of the signals: each voxel's T2 for the spoiling correction")
    r2star_file = File(
        exists=True,
        desc="R2* (1/s) of the ESTATICS fit: a per-voxel T2 prior for the spoiling correction where no R2 "
        "is given, and (with r2star_stderr_file and echo_times) the noise of the intercepts",
    )
    r2star_stderr_file = File(exists=True, desc="standard error of R2* (1/s) of the ESTATICS fit")
    echo_times = traits.List(
        traits.List(traits.Float), desc="echo times (s) of each flip angle's intercept fit, in the order of the files"
    )
    field_strength = traits.Float(3.0, usedefault=True, desc="B0 (T), for the T2 prior from R2*")
    b1_units = traits.Enum(
        "percent", "ratio", usedefault=True, desc="unit of b1_file: percent of nominal (TB1map) or ratio"
    )
    signal_kind = Str("TE = 0 intercepts", usedefault=True, desc="what the signal files are (provenance)")
    noise_sigma = traits.Float(desc="noise SD of the signals, for the standard error")
    n_coils = traits.Int(
        1, usedefault=True, desc="receive channels (root-sum-of-squares), for the noise measured in the air"
    )
    denoised = traits.Bool(
        False,
        usedefault=True,
        desc="the signals are NLM-denoised single-echo images: the noise of the air (that of the raw images) "
        "is not their noise, and is not used for the standard error",
    )
    chunk_size = traits.Int(200_000, usedefault=True, nohash=True, desc="voxels per chunk")
    num_threads = traits.Int(1, usedefault=True, nohash=True, desc="threads fitting chunks at once")


class _FitR1OutputSpec(TraitedSpec):
    r1_file = File(exists=True, desc="R1 (1/s); NaN where undetermined, 0 outside the mask")
    t1_file = File(exists=True, desc="T1 (s) = 1/R1; NaN where R1 is undetermined")
    m0_file = File(exists=True, desc="M0 (arbitrary units, receive field included)")
    r1_stderr_file = File(exists=True, desc="standard error of R1 (1/s); NaN where unknown")
    b1_file = File(exists=True, desc="B1+ ratio (1 = nominal) the fit used, on the map grid")
    metadata = traits.Dict(desc="sidecar fields")


def spoiling_choice(enabled, phase_increment, manufacturer):
    """``(increment_deg or None, source)``: which spoiling increment a correction uses, or why none.

    Parameters
    ----------
    enabled : bool
        Whether the correction is asked for.
    phase_increment : float or None
        ``SpoilingRFPhaseIncrement`` (deg) of the sidecar.
    manufacturer : str or None
        ``Manufacturer`` of the sidecar.
    """
    from ..core.relaxometry import VENDOR_PHASE_INCREMENT_DEG

    if not enabled:
        return None, "none: turned off (--no-spoiling-correction)"
    if phase_increment is not None:
        return float(phase_increment), f"SpoilingRFPhaseIncrement {float(phase_increment):g} deg (sidecar)"
    key = (manufacturer or "").strip().lower()
    vendor = next((name for name in VENDOR_PHASE_INCREMENT_DEG if key.startswith(name)), None)
    if vendor is not None:
        increment = VENDOR_PHASE_INCREMENT_DEG[vendor]
        return increment, f"{increment:g} deg, default of Manufacturer {manufacturer!r} (no SpoilingRFPhaseIncrement)"
    return None, (
        "none: the GRE sidecars give no SpoilingRFPhaseIncrement and no known Manufacturer (Siemens, GE, "
        f"Philips; got {manufacturer!r}); R1 is not corrected for imperfect spoiling (biased low by a few "
        'percent): add "SpoilingRFPhaseIncrement" (deg) to the sidecars, or pass --no-spoiling-correction '
        "to silence this"
    )


class FitR1(SimpleInterface):
    """R1, T1 and M0 by DESPOT1 (:func:`qmri_workflows.core.relaxometry.fit_r1`).

    The flip angles are scaled by the B1+ map when one is given, and the signals corrected for
    imperfect RF spoiling by the EPG of the protocol (:mod:`qmri_workflows.core.relaxometry.spoiling`)
    with the sidecar's increment (or the vendor default), at each voxel's T2: 1/R2 of ``r2_file``,
    else inferred from ``r2star_file`` (:func:`~qmri_workflows.core.relaxometry.t2_prior_from_r2star`),
    else the tissue T2 ``tissue_t2``. The standard error of R1 propagates the covariance of the
    ESTATICS intercepts (``r2star_file``, ``r2star_stderr_file``, ``echo_times``), else the given
    ``noise_sigma``, the residuals (more than two flip angles) or the noise of the air (not for
    ``denoised`` images: NaN). Voxels with a non-finite signal or B1+ get NaN; their counts go to the
    log and into ``metadata``.
    """

    input_spec = _FitR1InputSpec
    output_spec = _FitR1OutputSpec

    def _run_interface(self, runtime):
        flips = np.asarray(self.inputs.flip_angles, dtype=float)
        if len(self.inputs.signal_files) != flips.size:
            raise ValueError(f"{len(self.inputs.signal_files)} signal files for {flips.size} flip angles")
        if np.unique(flips).size < 2:
            raise BIDSInputError(
                f"R1 needs at least two different flip angles, got {flips.tolist()} deg "
                f"({', '.join(self.inputs.signal_files)})"
            )
        method = self.inputs.method
        if method == "exact" and flips.size != 2:
            raise ValueError(
                f"--r1-method exact solves two flip angles, the data have {flips.size}; use linear or nonlinear"
            )
        reference = nib.load(self.inputs.signal_files[0])
        signals = load_volumes(self.inputs.signal_files, reference=reference).astype(np.float64)
        shape = signals.shape[:3]
        mask = np.ones(shape, dtype=bool)
        if isdefined(self.inputs.mask_file):
            mask = load_volume(self.inputs.mask_file, reference=reference) > 0

        metadata = {}
        if isdefined(self.inputs.b1_file):
            b1_scale = 100.0 if self.inputs.b1_units == "percent" else 1.0
            b1 = load_volume(self.inputs.b1_file, reference=reference).astype(np.float64) / b1_scale
            b1 = np.where(b1 > 0, b1, np.nan)
            metadata["B1Correction"] = (
                self.inputs.b1_description
                if isdefined(self.inputs.b1_description)
                else "TB1map (actual / nominal flip angle)"
            )
        else:
            b1 = np.ones(shape)
            note = self.inputs.b1_note if isdefined(self.inputs.b1_note) else "no B1+ map"
            metadata["B1Correction"] = f"none: {note}; nominal flip angles assumed"
            # the plan said so already, with its reason; the sidecar records it
            LOGGER.info("R1: not corrected for B1+ (%s)", note)

        increment, source = spoiling_choice(
            self.inputs.spoiling_correction,
            self.inputs.phase_increment if isdefined(self.inputs.phase_increment) else None,
            self.inputs.manufacturer if isdefined(self.inputs.manufacturer) else None,
        )
        protocol = None
        if increment is not None:
            protocol = spoiling_protocol(
                np.deg2rad(flips),
                self.inputs.repetition_time,
                phase_increment_deg=increment,
                gradient_moment=self.inputs.gradient_moment if isdefined(self.inputs.gradient_moment) else None,
            )
            t2, t2_source = self._spoiling_t2(reference, shape)
            metadata["SpoilingCorrection"] = (
                f"signals divided by EPG / Ernst ratio of the protocol (quadratic RF spoiling, spoiler "
                f"{protocol.gradient_dephasing:g} cycles/mm per TR, diffusion {protocol.diffusion:g} mm^2/s) at "
                f"{t2_source['summary']}, iterated with the T1 estimate"
            )
            metadata["SpoilingCorrectionT2"] = t2_source["kind"]
            metadata["SpoilingCorrectionT2Description"] = t2_source["description"]
            if t2_source["kind"] == "tissue":
                metadata["SpoilingTissueT2"] = self.inputs.tissue_t2
        else:
            t2 = self.inputs.tissue_t2
            metadata["SpoilingCorrection"] = "none"
            if self.inputs.spoiling_correction:
                LOGGER.warning("R1: %s", source)
        metadata["SpoilingRFPhaseIncrementUsed"] = increment
        metadata["SpoilingRFPhaseIncrementSource"] = source

        finite = np.isfinite(signals).all(axis=-1) & np.isfinite(b1)
        fitted = mask & finite
        sigma, covariance, noise_source = self._signal_noise(signals, reference, flips.size, fitted)
        if isdefined(self.inputs.b1_file) and isdefined(self.inputs.afi_repetition_times):
            b1 = self._unbias_afi(signals, flips, b1, fitted)
            metadata["B1Correction"] += (
                "; the AFI formula's finite-TR/T1 bias removed at each voxel's T1 (ideal-spoiling AFI signal)"
            )
        result = fit_r1(
            np.where(fitted[..., None], signals, 0.0),
            np.deg2rad(flips),
            self.inputs.repetition_time,
            b1=np.where(fitted, b1, 1.0),
            method=R1_METHODS[method],
            spoiling=protocol,
            t2=np.where(fitted, t2, DEFAULT_TISSUE_T2) if np.ndim(t2) else t2,
            sigma=sigma,
            signal_covariance=covariance,
            mask=fitted,
            chunk_size=self.inputs.chunk_size,
            n_jobs=self.inputs.num_threads,
        )

        def inside(values):
            # 0 outside the brain mask; NaN inside where undetermined (non-finite input included)
            return np.where(mask, np.where(fitted, values, np.nan), 0.0).astype(np.float32)

        r1 = inside(result.r1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = np.where(mask, np.where(r1 > 0, 1.0 / r1, np.nan), 0.0).astype(np.float32)
        cwd, affine = runtime.cwd, reference.affine
        for key, name, data in (
            ("r1_file", "R1map.nii", r1),
            ("t1_file", "T1map.nii", t1),
            ("m0_file", "M0map.nii", inside(result.m0)),
            ("r1_stderr_file", "R1map_stderr.nii", inside(result.r1_se)),
            ("b1_file", "B1ratio.nii", np.where(np.isfinite(b1), b1, np.nan).astype(np.float32)),
        ):
            self._results[key] = str(write_nifti(os.path.join(cwd, name), data, affine))

        counts = {
            "FittedVoxels": int(fitted.sum()),
            "NonFiniteInputVoxels": int((mask & ~np.isfinite(signals).all(axis=-1)).sum()),
            "UndefinedB1Voxels": int((mask & ~np.isfinite(b1)).sum()),
            "UndeterminedR1Voxels": int((mask & ~np.isfinite(r1)).sum()),
        }
        _log_counts(counts)
        self._results["metadata"] = {
            "EstimationAlgorithm": f"{R1_ALGORITHMS[method]}, from the {self.inputs.signal_kind} of each flip angle",
            "EstimationReference": list(DESPOT1_REFERENCES + (SPOILING_REFERENCES if protocol else ())),
            "FlipAngle": flips.tolist(),
            "RepetitionTimeExcitation": self.inputs.repetition_time,
            **metadata,
            **counts,
        }
        self._results["metadata"]["R1StandardErrorSource"] = noise_source
        return runtime

    def _spoiling_t2(self, reference, shape):
        """T2 (s) the spoiling correction uses, a map or the tissue value, and where it comes from."""
        from ..core.relaxometry import t2_prior_from_r2star

        prior = None
        if isdefined(self.inputs.r2star_file):
            r2star = load_volume(self.inputs.r2star_file, reference=reference).astype(np.float64)
            prior = t2_prior_from_r2star(r2star, self.inputs.field_strength)
        if isdefined(self.inputs.r2_file):
            r2 = load_volume(self.inputs.r2_file, reference=reference).astype(np.float64)
            measured = np.isfinite(r2) & (r2 > 0)
            fallback = prior if prior is not None else np.full(shape, self.inputs.tissue_t2)
            with np.errstate(divide="ignore"):
                t2 = np.where(measured, 1.0 / np.where(measured, r2, 1.0), fallback)
            elsewhere = (
                "T2 inferred from R2* (see SpoilingCorrectionT2 'r2star')"
                if prior is not None
                else f"tissue T2 {self.inputs.tissue_t2:g} s"
            )
            return t2, {
                "kind": "R2map",
                "summary": "each voxel's own T2 (1/R2 of the R2 map)",
                "description": f"T2 = 1/R2 of the R2 map in every voxel with a positive R2; {elsewhere} elsewhere",
            }
        if prior is not None:
            return prior, {
                "kind": "r2star",
                "summary": "a per-voxel T2 inferred from R2* (no R2 map)",
                "description": (
                    "T2 inferred from the voxel's R2* at "
                    f"{self.inputs.field_strength:g} T: R2 = 12.5 1/s (T2 80 ms) at R2* 19 1/s (3 T), plus half of "
                    "any R2* difference (R2 and R2' rise with iron with similar slopes, Gelman et al. Radiology "
                    "1999;210:759), R2' scaled with the field; see core.relaxometry.spoiling.t2_prior_from_r2star"
                ),
            }
        return self.inputs.tissue_t2, {
            "kind": "tissue",
            "summary": f"one tissue T2 of {self.inputs.tissue_t2:g} s (no R2 or R2* map)",
            "description": (
                f"one tissue T2 of {self.inputs.tissue_t2:g} s in every voxel (single-echo data give no R2* "
                "and no R2 map was made): iron-rich nuclei keep about +2 %, long-T2 lesions up to -2 %"
            ),
        }

    def _signal_noise(self, signals, reference, n_flip, fitted):
        """``(sigma, covariance, description)`` of the signals' noise for the R1 standard error."""
        from ..core.crlb import estatics_intercept_covariance

        if isdefined(self.inputs.r2star_file) and isdefined(self.inputs.r2star_stderr_file):
            if not isdefined(self.inputs.echo_times) or len(self.inputs.echo_times) != n_flip:
                raise ValueError("r2star_stderr_file needs echo_times, one list per flip angle")
            width = max(len(echoes) for echoes in self.inputs.echo_times)
            echo_times = np.full((n_flip, width), np.nan)
            for row, echoes in enumerate(self.inputs.echo_times):
                echo_times[row, : len(echoes)] = echoes
            r2star = load_volume(self.inputs.r2star_file, reference=reference).astype(np.float64)
            stderr = load_volume(self.inputs.r2star_stderr_file, reference=reference).astype(np.float64)
            # where R1 is fitted, in chunks: per-echo float64 temporaries of a 1 mm brain take ~0.25 GB each
            covariance = np.full(signals.shape + (n_flip,), np.nan, dtype=np.float32)
            where = np.flatnonzero(fitted)
            flat_signals, flat_r2star = signals.reshape(-1, n_flip), r2star.reshape(-1)
            flat_stderr, flat_covariance = stderr.reshape(-1), covariance.reshape(-1, n_flip, n_flip)
            for start in range(0, where.size, self.inputs.chunk_size):
                part = where[start : start + self.inputs.chunk_size]
                flat_covariance[part] = estatics_intercept_covariance(
                    flat_signals[part], flat_r2star[part], echo_times, r2star_stderr=flat_stderr[part]
                )
            return (
                None,
                covariance,
                (
                    "covariance of the TE = 0 intercepts propagated through the DESPOT1 fit (Fisher information); "
                    "the intercepts' noise is that of the ESTATICS fit (its residuals, or the air), recovered from "
                    "the R2* standard error"
                ),
            )
        if isdefined(self.inputs.noise_sigma):
            return self.inputs.noise_sigma, None, f"given noise SD {self.inputs.noise_sigma:g} of every signal"
        if n_flip > 2:
            return None, None, "residuals of the DESPOT1 fit (more flip angles than parameters)"
        if self.inputs.denoised:
            # Non-local means lowered the noise by a factor that varies from voxel to voxel; the air
            # keeps the raw noise, so a standard error from it would overstate the uncertainty.
            problem = "the images are denoised, and the noise measured in the air is that of the raw images, not theirs"
            LOGGER.info("R1: no standard error (%s)", problem)
            return None, None, f"none, NaN: two flip angles leave no residual, and {problem}"
        noise = measure_air_noise(
            signals[..., -1], voxel_size=reference.header.get_zooms()[:3], n_coils=self.inputs.n_coils
        )
        if noise.sigma is not None:
            return (
                noise.sigma,
                None,
                f"noise SD {noise.sigma:g} measured in the air of the images (same for every signal)",
            )
        LOGGER.info("R1: no standard error (%s)", noise.problem)
        return None, None, f"none, NaN: two flip angles leave no residual, and {noise.problem}"

    def _unbias_afi(self, signals, flips, b1, fitted):
        """B1+ map without the first-order AFI formula's T1 bias, at the T1 of a quick first fit.

        The bias changes by ~0.1 % of itself when T1 changes by a few percent, so one uncorrected
        (no spoiling correction) preliminary fit is enough.
        """
        preliminary = fit_r1(
            np.where(fitted[..., None], signals, 0.0),
            np.deg2rad(flips),
            self.inputs.repetition_time,
            b1=np.where(fitted, b1, 1.0),
            mask=fitted,
            chunk_size=self.inputs.chunk_size,
            n_jobs=self.inputs.num_threads,
        )
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = np.where(preliminary.r1 > 0, 1.0 / preliminary.r1, np.nan)
        tr1, tr2 = self.inputs.afi_repetition_times
        factor = afi_t1_bias(np.where(fitted, b1, 1.0), t1, tr1, tr2, math.radians(self.inputs.afi_flip_angle))
        return np.where(fitted, b1 / factor, b1)


def _log_counts(counts):
    fitted = max(counts["FittedVoxels"], 1)
    for key, what in (
        ("NonFiniteInputVoxels", "hold NaN/Inf in a signal image: R1 is NaN there"),
        ("UndefinedB1Voxels", "lie outside the B1+ map (or it is not positive there): R1 is NaN there"),
        ("UndeterminedR1Voxels", "have no R1 (non-finite input, or signals the Ernst equation cannot fit)"),
    ):
        if counts[key]:
            LOGGER.warning(
                "R1: %d voxel(s) (%.1f %% of the fitted) %s", counts[key], 100.0 * counts[key] / fitted, what
            )
