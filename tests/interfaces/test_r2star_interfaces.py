"""FitR2star and BrainMask as real Nipype nodes on closed-form echoes."""

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
            files.append(str(write_image(tmp_path / f"flip{flip}_echo{index}.nii.gz",
                                         s0 * np.exp(-r2star * te), shape=r2star.shape)))
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

    node = pe.Node(FitR2star(magnitude_files=files, echo_times=tes, flip_angles=flips,
                             mask_file=mask_file), name="fit", base_dir=str(tmp_path / "work"))
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
