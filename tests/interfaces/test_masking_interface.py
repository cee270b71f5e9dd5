"""BrainMask as a real Nipype node: a head gives a checked mask; a mask that fails the sanity
checks stops the node with the images and the problems named (or warns, when asked to)."""

import logging

import nibabel as nib
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from qmri_workflows.interfaces.masking import BrainMask, BrainMaskCheckError
from tests.bids_factory import write_image
from tests.core.test_mask_geometries import dice, ellipsoidal_head

VOXEL_MM = 4.0
AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])


def _write(tmp_path, name, data):
    return str(write_image(tmp_path / name, data, shape=data.shape, affine=AFFINE))


def _hollow_head(shape=(40, 44, 36)):
    """A bright shell with nothing inside (a scalp without a brain): its mask holds air."""
    grid = np.indices(shape) - np.array(shape)[:, None, None, None] / 2
    radius = np.sqrt(((grid / np.array([16, 18, 14])[:, None, None, None]) ** 2).sum(0))
    noise = np.random.default_rng(0).normal(0, 3.0, (2,) + shape)
    return np.hypot(np.where((radius < 1) & (radius > 0.8), 100.0, 0.0) + noise[0], noise[1])


def test_node_writes_a_mask_that_passes_the_checks(tmp_path):
    # Two "flip angles" of the same head, as the pipeline passes the first echoes.
    image, truth, _ = ellipsoidal_head(VOXEL_MM, skull_mm=7.0, seed=1)
    files = [_write(tmp_path, "flip1.nii.gz", image), _write(tmp_path, "flip2.nii.gz", 0.6 * image)]
    node = pe.Node(BrainMask(in_files=files), name="mask", base_dir=str(tmp_path / "work"))
    result = node.run().outputs
    mask = np.asarray(nib.load(result.out_mask).dataobj) > 0
    assert dice(mask, truth) >= 0.95
    assert result.problems == []


def test_failed_sanity_check_stops_with_the_files_and_problems_named(tmp_path):
    path = _write(tmp_path, "sub-01_echo-1_flip-1_part-mag_VFA.nii.gz", _hollow_head())
    with pytest.raises(BrainMaskCheckError) as raised:
        BrainMask(in_files=[path]).run(cwd=str(tmp_path))
    message = str(raised.value)
    assert "sub-01_echo-1_flip-1_part-mag_VFA.nii.gz" in message
    assert "sanity checks" in message and "skull" in message
    # ... and the fix: a mask of one's own, where it goes.
    assert "--derivatives" in message and "sub-01/anat/sub-01_desc-brain_mask.nii.gz" in message
    assert not (tmp_path / "brain_mask.nii.gz").exists()


def test_failed_sanity_check_can_warn_instead(tmp_path, caplog):
    path = _write(tmp_path, "hollow.nii.gz", _hollow_head())
    with caplog.at_level(logging.WARNING, logger="nipype.interface"):
        result = BrainMask(in_files=[path], on_failed_check="warn").run(cwd=str(tmp_path))
    assert result.outputs.problems
    assert any("hollow.nii.gz" in record.getMessage() for record in caplog.records)


def test_users_mask_is_used_and_a_failed_check_only_warns(tmp_path, caplog):
    # The user's mask replaces the automatic one, even where the automatic one would be refused.
    path = _write(tmp_path, "hollow.nii.gz", _hollow_head())
    user_mask = np.zeros(_hollow_head().shape, dtype=np.uint8)
    user_mask[18:22, 20:24, 16:20] = 1  # a speck: under 5 % of the head
    mask_path = str(
        write_image(tmp_path / "mask.nii.gz", user_mask, shape=user_mask.shape, affine=AFFINE, dtype=np.uint8)
    )
    with caplog.at_level(logging.WARNING, logger="nipype.interface"):
        result = BrainMask(in_files=[path], user_mask_file=mask_path).run(cwd=str(tmp_path))
    assert np.array_equal(np.asarray(nib.load(result.outputs.out_mask).dataobj) > 0, user_mask > 0)
    assert any("% of the head" in problem for problem in result.outputs.problems)
    assert any("mask.nii.gz given with --derivatives" in record.getMessage() for record in caplog.records)
