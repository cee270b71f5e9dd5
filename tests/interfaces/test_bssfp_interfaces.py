"""bSSFP interfaces (band-free signal, DESPOT2) against known relaxation rates and frequencies."""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.core.bssfp import band_free_signal, magnitude_combination
from qmri_workflows.core.signal import bssfp_signal
from qmri_workflows.interfaces.bssfp import BandFreeBSSFP, FitDESPOT2
from qmri_workflows.io.derivatives import write_nifti
from qmri_workflows.io.errors import BIDSInputError

SHAPE = (16, 12, 6)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
TR = 0.005
FLIPS = (15.0, 50.0)
CYCLES = (0.0, 90.0, 180.0, 270.0)


def _truth():
    """R1, R2, B1+, M0 and a frequency sweeping a full 1/TR (in-brain values)."""
    x = np.linspace(0, 1, SHAPE[0])[:, None, None]
    y = np.linspace(0, 1, SHAPE[1])[None, :, None]
    z = np.linspace(0, 1, SHAPE[2])[None, None, :]
    ones = np.ones(SHAPE)
    r1 = (0.6 + 0.8 * y) * ones
    r2 = (5.0 + 10.0 * z + 2.0 * y) * ones
    b1 = (0.85 + 0.3 * z) * ones
    frequency = (-1 / (2 * TR) + x * (1 - 1 / SHAPE[0]) / TR) * ones
    return r1, r2, b1, 1000.0 * ones, frequency


def _write_series(tmp_path, with_phase=True, cycles=CYCLES):
    r1, r2, b1, m0, frequency = _truth()
    magnitudes, phases = [], []
    for flip_index, flip in enumerate(FLIPS, start=1):
        for increment in cycles:
            signal = bssfp_signal(
                m0, r1, r2, np.deg2rad(flip), TR, off_resonance=2 * np.pi * frequency * TR,
                phase_increment=np.deg2rad(increment), b1=b1,
            ) * np.exp(0.4j)  # fmt: skip
            stem = tmp_path / f"acq-bssfp{int(increment):03d}_flip-{flip_index}"
            magnitudes.append(str(write_nifti(f"{stem}_mag.nii", np.abs(signal).astype(np.float32), AFFINE)))
            phases.append(str(write_nifti(f"{stem}_phase.nii", np.angle(signal).astype(np.float32), AFFINE)))
    return magnitudes, (phases if with_phase else None)


def _band_free(tmp_path, combination, *, reference=None, with_phase=True, cycles=CYCLES):
    magnitudes, phases = _write_series(tmp_path, with_phase, cycles)
    node = BandFreeBSSFP(
        magnitude_files=magnitudes,
        flip_angles=list(FLIPS),
        phase_increments=list(cycles),
        repetition_time=TR,
        combination=combination,
        reference_file=reference or magnitudes[0],
    )
    if phases:
        node.inputs.phase_files = phases
        node.inputs.phase_scale = 1.0
    work = tmp_path / f"work_{combination}"
    work.mkdir()
    return node.run(cwd=str(work)).outputs


@pytest.mark.parametrize("combination", ["geometric", "ellipse"])
def test_band_free_signal_and_offresonance_are_exact(tmp_path, combination):
    r1, r2, b1, m0, frequency = _truth()
    outputs = _band_free(tmp_path, combination)
    inexact = 0
    for index, flip in enumerate(FLIPS):
        measured = np.asarray(nib.load(outputs.band_free_files[index]).dataobj)
        error = np.abs(measured / band_free_signal(m0, r1, r2, np.deg2rad(flip), TR, b1=b1) - 1)
        # the geometric solution gives way to the complex sum where its chords are nearly parallel
        assert error.max() < (0.02 if combination == "geometric" else 2e-4)
        inexact += int((error > 2e-4).sum())
    assert inexact <= outputs.metadata.get("ComplexSumVoxels", 0)
    field = np.asarray(nib.load(outputs.offresonance_file).dataobj, dtype=float)
    error = np.angle(np.exp(2j * np.pi * (field - frequency) * TR)) / (2 * np.pi * TR)
    assert np.abs(error).max() < 0.05  # Hz, of a 200 Hz period


@pytest.mark.parametrize("combination", ["geometric", "ellipse"])
def test_despot2_interface_recovers_r2_with_r1_and_b1(tmp_path, combination):
    r1, r2, b1, _, _ = _truth()
    outputs = _band_free(tmp_path, combination)
    mask = np.ones(SHAPE, dtype=np.uint8)
    mask[0] = 0
    files = {
        name: str(write_nifti(str(tmp_path / f"{name}.nii"), data.astype(np.float32), AFFINE))
        for name, data in (("r1", r1), ("b1", b1), ("mask", mask))
    }
    work = tmp_path / "fit"
    work.mkdir()
    fit = FitDESPOT2(
        band_free_files=outputs.band_free_files,
        flip_angles=list(FLIPS),
        repetition_time=TR,
        r1_file=files["r1"],
        b1_file=files["b1"],
        mask_file=files["mask"],
        noise_sigma=float("nan"),
    ).run(cwd=str(work))
    estimate = np.asarray(nib.load(fit.outputs.r2_file).dataobj, dtype=float)
    assert np.all(estimate[0] == 0)  # outside the mask
    error = np.abs(estimate[1:] / r2[1:] - 1)
    # exact but where the geometric solution gave way to the complex sum (long T2, some frequencies)
    assert np.median(error) < 1e-4 and error.max() < 0.03
    assert int((error > 1e-3).sum()) <= 2 * outputs.metadata.get("ComplexSumVoxels", 0)
    t2 = np.asarray(nib.load(fit.outputs.t2_file).dataobj, dtype=float)
    np.testing.assert_allclose(t2[1:], 1 / estimate[1:], rtol=1e-5)
    assert fit.outputs.metadata["FittedVoxels"] == int(mask.sum())
    assert fit.outputs.metadata["B1Correction"].startswith("B1+ map")

    # without B1+, the nominal flip angles bias R2 (by far more than the 2 % target)
    work = tmp_path / "fit_nob1"
    work.mkdir()
    uncorrected = FitDESPOT2(
        band_free_files=outputs.band_free_files,
        flip_angles=list(FLIPS),
        repetition_time=TR,
        r1_file=files["r1"],
        b1_note="no B1+ data",
    ).run(cwd=str(work))
    biased = np.asarray(nib.load(uncorrected.outputs.r2_file).dataobj, dtype=float)
    assert np.median(np.abs(biased / r2 - 1)) > 0.05
    assert uncorrected.outputs.metadata["B1Correction"].startswith("none: no B1+ data")


def test_band_free_on_another_grid_is_resampled(tmp_path):
    reference = str(write_nifti(str(tmp_path / "ref.nii"), np.ones((8, 6, 3), np.float32), np.diag([4, 4, 4, 1.0])))
    outputs = _band_free(tmp_path, "geometric", reference=reference)
    for path in (*outputs.band_free_files, outputs.offresonance_file):
        image = nib.load(path)
        assert image.shape == (8, 6, 3) and np.allclose(image.affine, np.diag([4, 4, 4, 1.0]))


def test_magnitude_only_gives_rms_and_no_offresonance(tmp_path):
    outputs = _band_free(tmp_path, "rms", with_phase=False)
    assert len(outputs.band_free_files) == 2
    assert not outputs.offresonance_file
    assert outputs.metadata["BandFreeCombination"].startswith("magnitude-only")


def test_geometric_without_phase_is_refused_with_the_file(tmp_path):
    with pytest.raises(BIDSInputError, match="needs the phase of every phase cycle.*acq-bssfp000_flip-1_mag"):
        _band_free(tmp_path, "geometric", with_phase=False)


def test_phase_cycle_not_in_the_units_of_the_series_is_refused_with_the_file(tmp_path):
    """The query reads the units of the first phase cycle only, and trusts a sidecar's "Units": a
    cycle in Siemens integers under a factor of 1 (radians) was combined as radians, silently."""
    magnitudes, phases = _write_series(tmp_path)
    wrong = phases[2]
    radians = np.asarray(nib.load(wrong).dataobj)
    write_nifti(wrong, np.round(radians / np.pi * 4096).astype(np.float32), AFFINE)
    node = BandFreeBSSFP(
        magnitude_files=magnitudes,
        phase_files=phases,
        phase_scale=1.0,
        flip_angles=list(FLIPS),
        phase_increments=list(CYCLES),
        repetition_time=TR,
        combination="geometric",
        reference_file=magnitudes[0],
    )
    with pytest.raises(BIDSInputError, match=r"acq-bssfp180_flip-1_phase\.nii is not wrapped phase in the units"):
        node.run(cwd=str(tmp_path))


def test_complex_data_combined_by_magnitude_still_give_the_offresonance(tmp_path):
    """Cycles not in opposite pairs (no closed form): the off-resonance comes from the ellipse fit."""
    frequency = _truth()[4]
    outputs = _band_free(tmp_path, "rms", cycles=(0.0, 60.0, 150.0, 250.0))
    field = np.asarray(nib.load(outputs.offresonance_file).dataobj, dtype=float)
    error = np.angle(np.exp(2j * np.pi * (field - frequency) * TR)) / (2 * np.pi * TR)
    assert np.abs(error).max() < 0.05


@pytest.mark.parametrize("combination", ["geometric", "ellipse"])
def test_offresonance_is_corrected_for_finite_pulses_at_the_actual_flip_angle(tmp_path, combination):
    """1 ms pulses (the phantom's exact steady state), B1+ 0.85-1.15: the map within 0.03 Hz (geometric)."""
    from qmri_workflows.phantom.bssfp_steady_state import bssfp_steady_state

    r1, r2, b1, m0, frequency = _truth()
    magnitudes, phases = [], []
    for flip_index, flip in enumerate(FLIPS, start=1):
        for increment in CYCLES:
            signal = bssfp_steady_state(
                m0, r1, r2, np.deg2rad(flip), TR, off_resonance=frequency, phase_increment=np.deg2rad(increment),
                b1=b1, pulse_duration=0.001,
            ) * np.exp(0.4j)  # fmt: skip
            stem = tmp_path / f"acq-bssfp{int(increment):03d}_flip-{flip_index}"
            magnitudes.append(str(write_nifti(f"{stem}_mag.nii", np.abs(signal).astype(np.float32), AFFINE)))
            phases.append(str(write_nifti(f"{stem}_phase.nii", np.angle(signal).astype(np.float32), AFFINE)))
    b1_file = str(write_nifti(str(tmp_path / "b1.nii"), b1.astype(np.float32), AFFINE))
    # within ~1 Hz of +-1/(2 TR) a frequency aliases to the other side (finite_pulse_off_resonance)
    inside = np.abs(frequency) < 95.0
    errors = {}
    for label, extra in (("corrected", {"pulse_duration": 0.001, "b1_file": b1_file}), ("uncorrected", {})):
        node = BandFreeBSSFP(
            magnitude_files=magnitudes, phase_files=phases, phase_scale=1.0, flip_angles=list(FLIPS),
            phase_increments=list(CYCLES), repetition_time=TR, combination=combination, reference_file=magnitudes[0],
            **extra,
        )  # fmt: skip
        work = tmp_path / f"work_{label}"
        work.mkdir()
        outputs = node.run(cwd=str(work)).outputs
        field = np.asarray(nib.load(outputs.offresonance_file).dataobj, dtype=float)
        error = np.angle(np.exp(2j * np.pi * (field - frequency) * TR)) / (2 * np.pi * TR)
        errors[label] = np.abs(error[inside]).max()
        if label == "corrected":
            assert "actual flip angle" in outputs.metadata["OffResonanceFinitePulse"]
        else:
            assert "OffResonanceFinitePulse" not in outputs.metadata
    print(f"\n{combination}: max |off-resonance error| {errors}")
    assert errors["corrected"] < (0.03 if combination == "geometric" else 1.2)
    if combination == "geometric":
        assert errors["uncorrected"] > 10 * errors["corrected"]


def _head_array_series(tmp_path, sigma, n_channels, rng):
    """Phase cycles of a box head in air seen by ``n_channels`` receive channels, channel by channel:
    complex sensitivities, complex Gaussian noise of SD ``sigma`` in each, the magnitude combined by
    root-sum-of-squares and the phase that of the projection on the sensitivities (as scanners
    export it). Returns the files, the head's interior and its true band-free signals."""
    shape = (36, 36, 18)
    head = np.zeros(shape, bool)
    head[6:-6, 6:-6, 3:-3] = True
    frequency = np.broadcast_to(np.linspace(-90.0, 90.0, shape[0])[:, None, None], shape)
    sensitivity = rng.uniform(0.3, 1.0, n_channels) * np.exp(1j * rng.uniform(-np.pi, np.pi, n_channels))
    sensitivity /= np.linalg.norm(sensitivity)
    magnitudes, phases, truths = [], [], []
    for flip_index, flip in enumerate(FLIPS, start=1):
        truths.append(band_free_signal(1000.0, 1.0, 14.0, np.deg2rad(flip), TR))
        for increment in CYCLES:
            signal = np.where(
                head,
                bssfp_signal(
                    1000.0, 1.0, 14.0, np.deg2rad(flip), TR, off_resonance=2 * np.pi * frequency * TR,
                    phase_increment=np.deg2rad(increment),
                ),
                0.0,
            )  # fmt: skip
            noise = rng.normal(0.0, sigma, shape + (n_channels, 2)) @ np.array([1.0, 1.0j])
            channels = signal[..., None] * sensitivity + noise
            stem = tmp_path / f"acq-bssfp{int(increment):03d}_flip-{flip_index}"
            rss = np.sqrt(np.sum(np.abs(channels) ** 2, axis=-1))
            combined_phase = np.angle(channels @ sensitivity.conj())
            magnitudes.append(str(write_nifti(f"{stem}_mag.nii", rss.astype(np.float32), AFFINE)))
            phases.append(str(write_nifti(f"{stem}_phase.nii", combined_phase.astype(np.float32), AFFINE)))
    interior = np.zeros(shape, bool)
    interior[8:-8, 8:-8, 5:-5] = True
    return magnitudes, phases, interior, truths


def test_noise_floor_of_many_channels_is_removed_before_the_complex_combination(tmp_path):
    """Root-sum-of-squares magnitudes with the combined phase are not Gaussian complex data: their
    floor lifts the band-free signal where it is weak (here by 2.1 % at 15 deg, 15 sigma, and 4.3 %
    at 50 deg, 11 sigma), and DESPOT2's R2 then reads low. With ``n_coils`` the floor goes first,
    measured in the air or taken from a noise map (+0.4 % and +0.2 % left)."""
    sigma, n_channels = 6.0, 8
    magnitudes, phases, interior, truths = _head_array_series(tmp_path, sigma, n_channels, np.random.default_rng(8))
    noise_map = str(write_nifti(str(tmp_path / "noise.nii"), np.full(interior.shape, sigma, np.float32), AFFINE))
    errors, outputs = {}, {}
    for name, options in (
        ("one channel assumed", {"n_coils": 1}),
        ("air", {"n_coils": n_channels}),
        ("noise map", {"n_coils": n_channels, "noise_map_file": noise_map}),
    ):
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        result = BandFreeBSSFP(
            magnitude_files=magnitudes, phase_files=phases, phase_scale=1.0, flip_angles=list(FLIPS),
            phase_increments=list(CYCLES), repetition_time=TR, reference_file=magnitudes[0], **options,
        ).run(cwd=str(work)).outputs  # fmt: skip
        outputs[name] = result
        errors[name] = [
            float(np.median(np.asarray(nib.load(path).dataobj)[interior] / truth - 1))
            for path, truth in zip(result.band_free_files, truths)
        ]
    print(f"\nband-free signal error per flip angle, 8 channels: {errors}")
    assert errors["one channel assumed"][1] > 0.03
    for name in ("air", "noise map"):
        assert max(abs(error) for error in errors[name]) < 0.005
        assert outputs[name].metadata["NoiseFloorCorrection"].endswith(f"(sigma from the {name})")
    assert outputs["one channel assumed"].metadata["NoiseFloorCorrection"].startswith("none needed: one receive")
    # with the channels known, the air gives the noise per channel: that of the combined complex signal
    assert outputs["air"].noise_sigma == pytest.approx(sigma, rel=0.05)


def test_denoised_phase_cycles_keep_their_magnitudes(tmp_path):
    """Denoised magnitudes have lost their floor already: none is removed twice."""
    sigma, n_channels = 6.0, 8
    magnitudes, phases, interior, truths = _head_array_series(tmp_path, sigma, n_channels, np.random.default_rng(9))
    values = {}
    for raw in (True, False):
        work = tmp_path / f"raw_{raw}"
        work.mkdir()
        result = BandFreeBSSFP(
            magnitude_files=magnitudes, phase_files=phases, phase_scale=1.0, flip_angles=list(FLIPS),
            phase_increments=list(CYCLES), repetition_time=TR, reference_file=magnitudes[0], n_coils=n_channels,
            raw_magnitudes=raw,
        ).run(cwd=str(work)).outputs  # fmt: skip
        values[raw] = np.asarray(nib.load(result.band_free_files[1]).dataobj)[interior]
        if not raw:
            assert result.metadata["NoiseFloorCorrection"].startswith("none here: the denoising step")
    assert np.median(values[False] / values[True] - 1) > 0.02


def test_floor_left_in_place_says_why(tmp_path):
    """Noiseless cycles filling the field of view: no air to measure the noise in."""
    magnitudes, phases = _write_series(tmp_path)
    result = BandFreeBSSFP(
        magnitude_files=magnitudes, phase_files=phases, phase_scale=1.0, flip_angles=list(FLIPS),
        phase_increments=list(CYCLES), repetition_time=TR, reference_file=magnitudes[0], n_coils=8,
    ).run(cwd=str(tmp_path)).outputs  # fmt: skip
    note = result.metadata["NoiseFloorCorrection"]
    assert note.startswith("none: no noise level (only") and "air voxels" in note, note
    assert np.isnan(result.noise_sigma)


@pytest.mark.parametrize("n_channels", [1, 8])
def test_root_mean_square_of_magnitudes_loses_the_whole_noise_floor(tmp_path, n_channels):
    """The mean square of raw magnitudes over the cycles is the signal's plus 2 N sigma^2: removed,
    the magnitude-only combination reads the root mean square of the noiseless cycles (within
    0.5 %), with or without phase images; left, it reads high."""
    sigma = 6.0
    magnitudes, phases, interior, _ = _head_array_series(tmp_path, sigma, n_channels, np.random.default_rng(10))
    noiseless = [
        magnitude_combination(
            np.abs(
                bssfp_signal(
                    1000.0, 1.0, 14.0, np.deg2rad(flip), TR,
                    off_resonance=2 * np.pi * np.linspace(-90.0, 90.0, 36)[:, None, None] * TR,
                    phase_increment=np.deg2rad(np.asarray(CYCLES)),
                )
            ),
            method="rms",
        )
        for flip in FLIPS
    ]  # fmt: skip
    errors = {}
    for name, options in (
        ("magnitude only", {}),
        ("with phase", {"phase_files": phases, "phase_scale": 1.0}),
        ("denoised", {"raw_magnitudes": False}),
    ):
        work = tmp_path / name.replace(" ", "_")
        work.mkdir()
        result = BandFreeBSSFP(
            magnitude_files=magnitudes, flip_angles=list(FLIPS), phase_increments=list(CYCLES),
            repetition_time=TR, reference_file=magnitudes[0], combination="rms", n_coils=n_channels, **options,
        ).run(cwd=str(work)).outputs  # fmt: skip
        errors[name] = [
            float(
                np.median(
                    np.asarray(nib.load(path).dataobj)[interior] / np.broadcast_to(truth, interior.shape)[interior]
                )
                - 1
            )
            for path, truth in zip(result.band_free_files, noiseless)
        ]
        note = result.metadata["NoiseFloorCorrection"]
        if name == "denoised":
            assert note.startswith("none here: the denoising step")
        else:
            assert note.startswith("root mean square over the phase cycles") and note.endswith("(sigma from the air)")
    print(f"\nrms combination error per flip angle, {n_channels} channel(s): {errors}")
    for name in ("magnitude only", "with phase"):
        assert max(abs(error) for error in errors[name]) < 0.005
    # the floor left in place (these magnitudes are raw, not denoised) lifts the weaker flip angle
    assert errors["denoised"][0] > (0.015 if n_channels == 8 else 0.0015)


def _fit_joint(tmp_path, name, band_free, combination, **files):
    """FitDESPOT2 of ``combination`` on BandFreeBSSFP's outputs ``band_free`` (R1, B1+ ... as files)."""
    work = tmp_path / name
    work.mkdir()
    options = {}
    if combination == "despot2-fm":
        options = {"cycle_files": band_free.cycle_files, "phase_increments": list(CYCLES)}
    return FitDESPOT2(
        band_free_files=band_free.band_free_files, flip_angles=list(FLIPS), repetition_time=TR,
        combination=combination, **files, **options,
    ).run(cwd=str(work)).outputs  # fmt: skip


def test_magnitude_only_joint_fit_recovers_r2(tmp_path):
    """``despot2-fm``: BandFreeBSSFP passes every cycle's magnitude on, FitDESPOT2 fits them at
    once with the off-resonance: R2 exact over a full 1/TR of frequencies and B1+ 0.85-1.15, where
    DESPOT2 on the root mean square of the same magnitudes errs by up to 30 %."""
    r1, r2, b1, _, _ = _truth()
    outputs = _band_free(tmp_path, "despot2-fm", with_phase=False)
    assert len(outputs.cycle_files) == len(FLIPS) * len(CYCLES)
    assert outputs.metadata["BandFreeCombination"].startswith("none: every phase-cycle magnitude")
    files = {
        f"{name}_file": str(write_nifti(str(tmp_path / f"{name}.nii"), data.astype(np.float32), AFFINE))
        for name, data in (("r1", r1), ("b1", b1))
    }
    fit = _fit_joint(tmp_path, "fit", outputs, "despot2-fm", **files)
    estimate = np.asarray(nib.load(fit.r2_file).dataobj, dtype=float)
    assert np.abs(estimate / r2 - 1).max() < 1e-4
    assert fit.metadata["EstimationAlgorithm"].startswith("DESPOT2-FM on magnitude-only data")
    assert fit.metadata["R2StandardErrorNote"].startswith("from the residuals of the joint fit (8 magnitudes")
    assert "denoised" not in fit.metadata["R2StandardErrorNote"]
    # denoised cycles: the residuals keep the finite-pulse model's misfit, not the noise, and the
    # note says so (with instantaneous pulses there is no such misfit)
    denoised = _fit_joint(tmp_path, "fit_denoised", outputs, "despot2-fm", denoised=True, **files)
    assert "denoised" not in denoised.metadata["R2StandardErrorNote"]
    pulsed = _fit_joint(tmp_path, "fit_pulsed", outputs, "despot2-fm", denoised=True, pulse_duration=0.001, **files)
    assert "the phase cycles are denoised" in pulsed.metadata["R2StandardErrorNote"]
    assert "overstates R2's random error" in pulsed.metadata["R2StandardErrorNote"]
    assert np.nanmax(np.asarray(nib.load(fit.r2_stderr_file).dataobj)) < 1e-3 * r2.min()
    rms = _fit_joint(tmp_path, "fit_rms", _band_free(tmp_path, "rms", with_phase=False), "rms", **files)
    assert np.abs(np.asarray(nib.load(rms.r2_file).dataobj) / r2 - 1).max() > 0.1


def test_magnitude_only_joint_fit_of_many_channels_loses_the_noise_floor_per_sample(tmp_path):
    """Eight-channel root-sum-of-squares cycles (SD 6 per channel, band-free signal 11-15 sigma):
    each sample loses 2 N sigma^2 from its square before the joint fit (sigma from the air), and R2
    is within 2 % (median over the head's interior); with the floor left (taken as denoised), R2
    reads further off."""
    magnitudes, _, interior, _ = _head_array_series(tmp_path, 6.0, 8, np.random.default_rng(12))
    files = {"r1_file": str(write_nifti(str(tmp_path / "r1.nii"), np.ones((36, 36, 18), np.float32), AFFINE))}
    errors = {}
    for name, raw in (("raw", True), ("floor left", False)):
        work = tmp_path / f"band_free_{raw}"
        work.mkdir()
        outputs = BandFreeBSSFP(
            magnitude_files=magnitudes, flip_angles=list(FLIPS), phase_increments=list(CYCLES), repetition_time=TR,
            reference_file=magnitudes[0], combination="despot2-fm", n_coils=8, raw_magnitudes=raw,
        ).run(cwd=str(work)).outputs  # fmt: skip
        if raw:
            note = outputs.metadata["NoiseFloorCorrection"]
            assert note.startswith("each phase-cycle magnitude (8 channel(s))")
            assert note.endswith("(sigma from the air)")
        fit = _fit_joint(tmp_path, f"fit_{raw}", outputs, "despot2-fm", **files)
        errors[name] = float(np.median(np.asarray(nib.load(fit.r2_file).dataobj)[interior]) / 14.0 - 1)
    print(f"\nDESPOT2-FM median R2 error, 8 channels: {errors}")
    assert abs(errors["raw"]) < 0.02
    assert abs(errors["floor left"]) > 2 * abs(errors["raw"])


def test_magnitude_only_refit_starts_from_the_first_fit(tmp_path):
    """The R2 family refits with the R1 of its refit, a little different: started from the first
    fit's R2 and off-resonance (no search over the grid of starts), the refit lands where a fit
    from scratch at the new R1 does, on noisy eight-channel cycles."""
    magnitudes, _, interior, _ = _head_array_series(tmp_path, 6.0, 8, np.random.default_rng(13))
    work = tmp_path / "band_free"
    work.mkdir()
    outputs = BandFreeBSSFP(
        magnitude_files=magnitudes, flip_angles=list(FLIPS), phase_increments=list(CYCLES), repetition_time=TR,
        reference_file=magnitudes[0], combination="despot2-fm", n_coils=8,
    ).run(cwd=str(work)).outputs  # fmt: skip

    def r1_file(value, name):
        return str(write_nifti(str(tmp_path / f"{name}.nii"), np.full((36, 36, 18), value, np.float32), AFFINE))

    first = _fit_joint(tmp_path, "first", outputs, "despot2-fm", r1_file=r1_file(1.0, "r1"))
    assert first.fitted_offresonance_file
    moved = r1_file(1.03, "r1_moved")
    scratch = _fit_joint(tmp_path, "scratch", outputs, "despot2-fm", r1_file=moved)
    warm = _fit_joint(
        tmp_path, "warm", outputs, "despot2-fm", r1_file=moved,
        start_r2_file=first.r2_file, start_offresonance_file=first.fitted_offresonance_file,
    )  # fmt: skip
    from_scratch, from_first = (np.asarray(nib.load(fit.r2_file).dataobj)[interior] for fit in (scratch, warm))
    difference = np.abs(from_first / from_scratch - 1)
    print(
        f"\nwarm-started refit against a fit from scratch: median {np.median(difference):.1e}, "
        f"max {difference.max():.1e}"
    )
    assert np.median(difference) < 1e-5 and np.percentile(difference, 99) < 1e-3
