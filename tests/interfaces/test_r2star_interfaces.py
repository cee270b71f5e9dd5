"""FitR2star and BrainMask as real Nipype nodes on closed-form echoes."""

import os

import nibabel as nib
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from qmri_workflows.interfaces.r2star import FitR2star
from tests.bids_factory import write_image

ECHO_TIMES = (0.003, 0.006, 0.009, 0.012)


def _echoes(tmp_path, r2star, s0_by_flip):
    files, tes, flips = [], [], []
    for flip, s0 in s0_by_flip.items():
        for index, te in enumerate(ECHO_TIMES):
            files.append(
                str(
                    write_image(
                        tmp_path / f"flip{flip}_echo{index}.nii.gz", s0 * np.exp(-r2star * te), shape=r2star.shape
                    )
                )
            )
            tes.append(te)
            flips.append(flip)
    return files, tes, flips


def test_fit_node_recovers_r2star_and_one_s0_per_flip_angle(tmp_path):
    shape = (6, 5, 4)
    r2star = np.random.default_rng(1).uniform(5.0, 80.0, shape)
    r2star[0, 0, 0] = -10.0  # rising signal (noise in CSF can do this): T2* is undefined
    s0 = {21.0: np.full(shape, 800.0), 6.0: np.full(shape, 500.0)}
    files, tes, flips = _echoes(tmp_path, r2star, s0)
    mask = np.ones(shape, dtype=np.uint8)
    mask[-1] = 0
    mask_file = str(write_image(tmp_path / "mask.nii.gz", mask, shape=shape, dtype=np.uint8))

    node = pe.Node(
        FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips, mask_file=mask_file),
        name="fit",
        base_dir=str(tmp_path / "work"),
    )
    result = node.run().outputs
    fitted = np.asarray(nib.load(result.r2star_file).dataobj)
    inside = mask > 0
    np.testing.assert_allclose(fitted[inside], r2star[inside], rtol=1e-4, atol=1e-3)
    assert np.all(fitted[~inside] == 0)

    t2star = np.asarray(nib.load(result.t2star_file).dataobj)
    assert np.isnan(t2star[0, 0, 0])
    positive = inside & (r2star > 0)
    np.testing.assert_allclose(t2star[positive], 1 / r2star[positive], rtol=1e-4)
    assert np.all(t2star[~inside] == 0)

    assert result.flip_angles == [6.0, 21.0]  # S0 maps in ascending flip angle
    for path, expected in zip(result.s0_files, (500.0, 800.0)):
        np.testing.assert_allclose(np.asarray(nib.load(path).dataobj)[inside], expected, rtol=1e-4)
    assert result.metadata["FlipAngle"] == [6.0, 21.0]
    assert result.metadata["EchoTime"] == pytest.approx(list(ECHO_TIMES))


def test_non_finite_samples_are_left_out_counted_and_logged(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bare interface writes its maps into the current directory
    shape = (6, 5, 4)
    r2star = np.random.default_rng(2).uniform(5.0, 80.0, shape)
    r2star[0, 0, 0] = -10.0
    files, tes, flips = _echoes(tmp_path, r2star, {6.0: np.full(shape, 500.0), 21.0: np.full(shape, 800.0)})
    damaged = {1: np.s_[2:4, 1:3, :], 5: np.s_[2:4, 1:3, :2]}  # same voxels in two files: 16 voxels
    for index, block in damaged.items():
        data = np.asarray(nib.load(files[index]).dataobj)
        data[block] = np.nan if index == 1 else np.inf
        write_image(files[index], data, shape=shape)
    lost = np.zeros(shape, bool)
    lost[5, 4, 3] = True  # all echoes but one lost: R2* undetermined
    for path in files[1:]:
        data = np.asarray(nib.load(path).dataobj)
        data[lost] = np.nan
        write_image(path, data, shape=shape)

    caplog.set_level("INFO", logger="qmri_workflows.interfaces")
    result = FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips).run().outputs
    fitted = np.asarray(nib.load(result.r2star_file).dataobj)
    stderr = np.asarray(nib.load(result.r2star_stderr_file).dataobj)
    t2star = np.asarray(nib.load(result.t2star_file).dataobj)
    np.testing.assert_allclose(fitted[~lost], r2star[~lost], rtol=1e-4, atol=1e-3)
    assert np.isnan(fitted[lost]).all() and np.isnan(stderr[lost]).all() and np.isnan(t2star[lost]).all()
    assert np.isfinite(stderr[~lost]).all() and (stderr[~lost] < 1e-2).all()  # noiseless echoes
    assert result.metadata["NonFiniteInputVoxels"] == 2 * 2 * 4 + 1
    assert result.metadata["UndeterminedR2starVoxels"] == 1
    assert result.metadata["NegativeR2starVoxels"] == 1
    assert result.metadata["NonSignificantR2starVoxels"] == 1  # the negative one
    assert result.metadata["FittedVoxels"] == np.prod(shape)
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "17 voxel(s) hold NaN/Inf" in warning[0]
    assert "flip6.0_echo1 (17), flip21.0_echo1 (9)" in warning[0]  # most first


@pytest.mark.parametrize("content", [0.0, 250.0])  # all-NaN: tests/io/test_images.py
def test_echo_without_signal_is_an_input_error_naming_it(tmp_path, content, monkeypatch):
    from qmri_workflows.io.errors import BIDSInputError

    monkeypatch.chdir(tmp_path)

    shape = (6, 5, 4)
    files, tes, flips = _echoes(tmp_path, np.full(shape, 20.0) + np.arange(4), {6.0: np.full(shape, 500.0)})
    write_image(files[2], np.full(shape, content), shape=shape)
    with pytest.raises(BIDSInputError, match=f"{files[2]} holds"):
        FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips).run()


def test_warning_about_non_finite_samples_names_the_worst_files_only(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shape = (6, 5, 4)
    s0 = {flip: np.full(shape, 500.0) for flip in (4.0, 8.0, 16.0)}
    files, tes, flips = _echoes(tmp_path, np.random.default_rng(3).uniform(10.0, 30.0, shape), s0)
    for index, path in enumerate(files):  # file i loses i + 1 voxels of its first slice
        data = np.asarray(nib.load(path).dataobj)
        data[np.unravel_index(np.arange(index + 1), shape)] = np.nan
        write_image(path, data, shape=shape)
    caplog.set_level("WARNING", logger="qmri_workflows.interfaces")
    FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips).run()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    worst = [f"{os.path.basename(path).split('.nii')[0]} ({index + 1})" for index, path in enumerate(files)][::-1]
    assert ", ".join(worst[:4]) in warning
    assert warning.endswith(f"and {len(files) - 4} more file(s)")
