"""DenoiseCollection, and FitR2star on denoised data, as real Nipype nodes."""

import logging
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.interfaces.denoise import DenoiseCollection
from qmri_workflows.interfaces.r2star import FitR2star
from qmri_workflows.io.errors import BIDSInputError
from tests.bids_factory import write_image

SHAPE = (40, 40, 32)
ECHO_TIMES = (0.003, 0.006, 0.009, 0.012)
AFFINE = np.diag([3.0, 3.0, 3.0, 1.0])


def _cwd(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    return str(folder)


def _collection(tmp_path, sigma, seed=0, kept=None, integer=False):
    """Two flip angles x 4 echoes of an ellipsoid head in air; returns files, TEs, flips, amplitudes, head.

    ``kept``: voxels kept, the others zero-filled (as a scanner's or converter's mask); ``integer``:
    magnitudes rounded to integers (as scanners store them).
    """
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    head = sum((g / 0.7) ** 2 for g in grid) < 1
    r2star = np.where(sum(g**2 for g in grid) < 0.15, 30.0, 18.0)
    rng = np.random.default_rng(seed)
    files, tes, flips, amplitudes = [], [], [], []
    for flip, s0 in ((6.0, 100.0), (21.0, 60.0)):
        for index, te in enumerate(ECHO_TIMES):
            amplitude = np.where(head, s0 * np.exp(-r2star * te), 0.0)
            noisy = np.abs(amplitude + sigma * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE)))
            if integer:
                noisy = np.round(noisy)
            if kept is not None:
                noisy = np.where(kept, noisy, 0.0)
            path = tmp_path / f"flip{int(flip)}_echo{index + 1}.nii.gz"
            files.append(str(write_image(path, noisy, shape=SHAPE, affine=AFFINE)))
            tes.append(te)
            flips.append(flip)
            amplitudes.append(amplitude)
    return files, tes, flips, np.stack(amplitudes, -1), head


def test_denoise_node_lowers_the_error_and_measures_the_noise(tmp_path):
    files, tes, flips, amplitudes, head = _collection(tmp_path, sigma=5.0)
    mask_file = str(write_image(tmp_path / "mask.nii.gz", head, shape=SHAPE, affine=AFFINE, dtype=np.uint8))
    result = (
        DenoiseCollection(magnitude_files=files, echo_times=tes, flip_angles=flips, mask_file=mask_file)
        .run(cwd=_cwd(tmp_path, "work"))
        .outputs
    )
    assert len(result.denoised_files) == len(files) and result.applied is True
    denoised = np.stack([np.asarray(nib.load(path).dataobj) for path in result.denoised_files], -1)
    raw = np.stack([np.asarray(nib.load(path).dataobj) for path in files], -1)
    error = {name: np.sqrt(np.mean((data - amplitudes)[head] ** 2)) for name, data in (("raw", raw), ("ms", denoised))}
    assert error["ms"] < 0.6 * error["raw"], error
    np.testing.assert_array_equal(denoised[~head], raw[~head])  # outside the mask: untouched
    noise_map = np.asarray(nib.load(result.noise_map_file).dataobj)
    assert np.abs(noise_map[head] / 5.0 - 1).max() < 0.10
    assert result.metadata["DenoisingMethod"] == "multispectral"
    assert abs(result.metadata["NoiseStandardDeviationAir"] / 5.0 - 1) < 0.10
    assert abs(result.metadata["EffectiveNumberOfCoilsAir"] - 1) < 0.1


def test_noiseless_images_pass_through_with_a_reason(tmp_path):
    files, tes, flips, *_ = _collection(tmp_path, sigma=0.0)
    result = DenoiseCollection(magnitude_files=files, method="nlm").run(cwd=_cwd(tmp_path, "work")).outputs
    assert result.denoised_files == files
    assert result.metadata["Denoising"].startswith("none: ")
    # the fits must know the images are raw (R2's band-free step then removes their noise floor)
    assert result.applied is False


def test_zero_filled_background_of_integer_images(tmp_path):
    """Real magnitudes: integers, with the background zeroed beyond a few mm of the head. The zeros
    hold no noise: the noise is measured in the air left (it was 0, and denoising was skipped as
    for simulated data), and the noise map in the head is right (it was 40 % low)."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    kept = sum((g / 0.9) ** 2 for g in grid) < 1
    files, tes, flips, _, head = _collection(tmp_path, sigma=5.0, kept=kept, integer=True)
    result = (
        DenoiseCollection(magnitude_files=files, echo_times=tes, flip_angles=flips, method="none")
        .run(cwd=_cwd(tmp_path, "work"))
        .outputs
    )
    assert abs(result.metadata["NoiseStandardDeviationAir"] / 5.0 - 1) < 0.10, result.metadata
    noise_map = np.asarray(nib.load(result.noise_map_file).dataobj)
    assert np.abs(noise_map[head] / 5.0 - 1).max() < 0.10


def test_skull_stripped_images_pass_through_saying_the_background_is_zero_filled(tmp_path, caplog):
    files, *_ = _collection(tmp_path, sigma=3.0, kept=_collection_head())
    with caplog.at_level(logging.WARNING, logger="qmri_workflows.interfaces"):
        result = DenoiseCollection(magnitude_files=files, method="nlm").run(cwd=_cwd(tmp_path, "work")).outputs
    assert result.denoised_files == files
    assert result.metadata["Denoising"].startswith("none: ")
    # the fits must know the images are raw (R2's band-free step then removes their noise floor)
    assert result.applied is False and "zero-filled" in result.metadata["Denoising"]
    assert "noise_sigma" not in result.metadata["Denoising"]  # FitR2star's remedy, not this node's
    # the warning names the images, so that a user of many subjects knows which were not denoised
    assert any("Denoising skipped" in r.getMessage() and files[0] in r.getMessage() for r in caplog.records)


def test_nonlinear_r2star_fit_without_air_asks_for_noise_sigma(tmp_path):
    """The same skull-stripped images: the non-linear fit needs the noise floor, and says how to give it."""
    files, tes, flips, *_ = _collection(tmp_path, sigma=3.0, kept=_collection_head())
    fit = FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips, method="nls")
    with pytest.raises(ValueError, match="background is zero-filled .*: give noise_sigma explicitly"):
        fit.run(cwd=_cwd(tmp_path, "work"))


def _collection_head():
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return sum((g / 0.7) ** 2 for g in grid) < 1


def test_nls_on_denoised_data_models_no_noise_floor(tmp_path):
    files, tes, flips, *_ = _collection(tmp_path, sigma=2.0)
    common = dict(magnitude_files=files, echo_times=tes, flip_angles=flips, method="nls")
    raw = FitR2star(**common).run(cwd=_cwd(tmp_path, "raw")).outputs.metadata
    denoised = FitR2star(**common, denoised=True).run(cwd=_cwd(tmp_path, "denoised")).outputs.metadata
    assert "including the noise floor" in raw["EstimationAlgorithm"]
    assert "NoiseStandardDeviationPerChannel" in raw
    assert "without a noise floor" in denoised["EstimationAlgorithm"]
    assert "NoiseStandardDeviationPerChannel" not in denoised


def test_a_missing_sample_reaches_the_fit_as_missing(tmp_path, caplog):
    """A NaN sample inside the head stays NaN through denoising, so that FitR2star leaves it out
    and counts it, as on the raw images, instead of fitting a value made from its neighbours."""
    files, tes, flips, _, head = _collection(tmp_path, sigma=3.0)
    image = nib.load(files[2])
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[20, 20, 16] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), files[2])
    mask_file = str(write_image(tmp_path / "mask.nii.gz", head, shape=SHAPE, affine=AFFINE, dtype=np.uint8))
    result = (
        DenoiseCollection(magnitude_files=files, echo_times=tes, flip_angles=flips, mask_file=mask_file)
        .run(cwd=_cwd(tmp_path, "work"))
        .outputs
    )
    denoised = np.stack([np.asarray(nib.load(path).dataobj) for path in result.denoised_files], -1)
    assert np.isnan(denoised[20, 20, 16, 2]) and np.isfinite(np.delete(denoised[20, 20, 16], 2)).all()
    assert np.isfinite(denoised[head]).sum() == head.sum() * len(files) - 1
    common = dict(echo_times=tes, flip_angles=flips)
    raw_name = os.path.basename(files[2]).split(".nii")[0]
    for name, inputs in (("raw", files), ("denoised", result.denoised_files)):
        caplog.clear()
        fit = FitR2star(magnitude_files=inputs, **common, denoised=name == "denoised").run(cwd=_cwd(tmp_path, name))
        assert fit.outputs.metadata["NonFiniteInputVoxels"] == 1, name
        # the warning names the input file, not the node's denoised copy of it
        (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert f"{raw_name} (1)" in warning and "denoised" not in warning, warning


def _complex_cycles(tmp_path, sigma, seed=5, phase_scale=1.0):
    """Four 'phase cycles' at two flip angles: complex images whose phase varies across the head."""
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    head = sum((g / 0.7) ** 2 for g in grid) < 1
    rng = np.random.default_rng(seed)
    magnitude_files, phase_files, truths = [], [], []
    for flip, level in ((15.0, 60.0), (50.0, 40.0)):
        for cycle in range(4):
            # a smooth off-resonance pattern: each cycle sees its own phase and a band-like dip
            phase = 2.0 * grid[0] + 1.5 * grid[1] + cycle * np.pi / 2
            amplitude = np.where(head, level * (0.6 + 0.4 * np.cos(phase + grid[2]) ** 2), 0.0)
            truth = amplitude * np.exp(1j * phase)
            noisy = truth + sigma * (rng.standard_normal(SHAPE) + 1j * rng.standard_normal(SHAPE))
            name = f"flip{int(flip)}_cycle{cycle}"
            magnitude_files.append(str(write_image(tmp_path / f"{name}_mag.nii.gz", np.abs(noisy), shape=SHAPE,
                                                   affine=AFFINE)))  # fmt: skip
            stored = np.angle(noisy) / phase_scale
            phase_files.append(str(write_image(tmp_path / f"{name}_phase.nii.gz", stored, shape=SHAPE, affine=AFFINE)))
            truths.append(truth)
    return magnitude_files, phase_files, np.stack(truths, -1), head


def test_complex_collection_comes_out_with_denoised_magnitude_and_phase(tmp_path):
    """Phase files given: the real and imaginary parts are denoised, the phase too (radians, scale 1)."""
    scale = np.pi / 4096  # scanner integers to radians
    magnitude_files, phase_files, truth, head = _complex_cycles(tmp_path, sigma=4.0, phase_scale=scale)
    mask_file = str(write_image(tmp_path / "mask.nii.gz", head, shape=SHAPE, affine=AFFINE, dtype=np.uint8))
    result = (
        DenoiseCollection(magnitude_files=magnitude_files, phase_files=phase_files, phase_scale=scale,
                          mask_file=mask_file)
        .run(cwd=_cwd(tmp_path, "work"))
        .outputs
    )  # fmt: skip
    assert result.denoised_phase_scale == 1.0
    assert result.metadata["DenoisingComplex"] is True

    def stack(paths, factor=1.0):
        return np.stack([np.asarray(nib.load(path).dataobj, dtype=float) * factor for path in paths], -1)

    raw = stack(magnitude_files) * np.exp(1j * stack(phase_files, scale))
    denoised = stack(result.denoised_files) * np.exp(1j * stack(result.denoised_phase_files))
    inner = ndimage.binary_erosion(head, iterations=2)
    error = {name: float(np.sqrt(np.mean(np.abs(values - truth)[inner] ** 2))) for name, values in
             (("raw", raw), ("denoised", denoised))}  # fmt: skip
    print(f"\ncomplex RMSE: {error}")
    assert error["denoised"] < 0.5 * error["raw"]
    # the averaged real and imaginary parts carry no noise floor: the magnitude is not biased up
    assert np.mean(np.abs(denoised)[inner]) == pytest.approx(np.mean(np.abs(truth)[inner]), rel=0.01)
    assert np.mean(np.abs(raw)[inner]) > np.mean(np.abs(truth)[inner])


def test_complex_collection_with_a_wrong_phase_scale_is_an_input_error(tmp_path):
    magnitude_files, phase_files, _, _ = _complex_cycles(tmp_path, sigma=4.0, phase_scale=np.pi / 4096)
    with pytest.raises(BIDSInputError, match="not one turn of radians"):
        DenoiseCollection(magnitude_files=magnitude_files, phase_files=phase_files, phase_scale=1.0).run(
            cwd=_cwd(tmp_path, "work")
        )
