"""Resampling onto the map grid through world coordinates, against analytic fields and label truth."""

import nibabel as nib
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from qmri_workflows.io.errors import BIDSInputError
from qmri_workflows.io.images import load_volume
from qmri_workflows.io.resample import PartialCoverageWarning, load_on_grid, resample_to_reference
from tests.bids_factory import write_image

MAP_VOXEL_MM = 1.5
MAP_SHAPE = (40, 44, 36)  # 60 x 66 x 54 mm
FIELD_VOXEL_MM = 4.0
FIELD_SHAPE = (16, 17, 13)


def _affine(voxel_mm, centre_mm, shape, rotation=None):
    """Affine whose grid is centred on ``centre_mm`` (world), axes rotated by ``rotation``."""
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) * voxel_mm
    affine[:3, 3] = np.asarray(centre_mm) - affine[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return affine


MAP_AFFINE = _affine(MAP_VOXEL_MM, (2.0, -10.0, 15.0), MAP_SHAPE)
# 17 degrees about a direction off every axis, and shifted by several mm from the map centre
FIELD_ROTATION = Rotation.from_rotvec(np.deg2rad(17) * np.array([1.0, 2.0, -0.5]) / np.sqrt(5.25)).as_matrix()
FIELD_AFFINE = _affine(FIELD_VOXEL_MM, (9.0, -4.0, 5.0), FIELD_SHAPE, FIELD_ROTATION)


def _world(shape, affine):
    index = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1)
    return index @ affine[:3, :3].T + affine[:3, 3]


def _b1_field(world):
    """Smooth transmit field: 1 + 0.2 * Gaussian bump (sigma 20 mm, 0.6 %/mm at its steepest)."""
    centre = np.array([5.0, -8.0, 12.0])
    return 1.0 + 0.2 * np.exp(-np.sum((world - centre) ** 2, axis=-1) / (2 * 20.0**2))


def _source_coordinates(target_shape, target_affine, source_affine):
    world = _world(target_shape, target_affine)
    return (world - source_affine[:3, 3]) @ np.linalg.inv(source_affine[:3, :3]).T


def _within(coordinates, low, high_from_end, shape):
    return np.all((coordinates >= low) & (coordinates <= np.asarray(shape) - 1 - high_from_end), axis=-1)


def _field_of_view(coordinates, shape, slack=2e-3):
    """Voxels clearly inside / clearly outside the source voxel box (its edge is fuzzy by 1e-3 voxel)."""
    inside = _within(coordinates, -0.5 + slack, -0.5 + slack, shape)
    outside = ~_within(coordinates, -0.5 - slack, -0.5 - slack, shape)
    return inside, outside


def test_coarse_rotated_b1_field_comes_back_within_one_percent():
    field = _b1_field(_world(FIELD_SHAPE, FIELD_AFFINE))
    source = nib.Nifti1Image(field.astype(np.float32), FIELD_AFFINE)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)

    resampled = resample_to_reference(source, reference, kind="linear")

    assert resampled.shape == MAP_SHAPE and np.allclose(resampled.affine, MAP_AFFINE)
    values = np.asarray(resampled.dataobj)
    assert values.dtype == np.float32
    coordinates = _source_coordinates(MAP_SHAPE, MAP_AFFINE, FIELD_AFFINE)
    # interpolation is defined between the outermost voxel centres; the outermost half voxel of the
    # field of view (inside the one-coarse-voxel border allowed) repeats the edge value instead
    interpolated = _within(coordinates, 0, 0, FIELD_SHAPE)
    in_field_of_view, outside = _field_of_view(coordinates, FIELD_SHAPE)
    assert 0.3 < interpolated.mean() < 0.95  # the overlap is partial, so the edges are exercised
    truth = _b1_field(_world(MAP_SHAPE, MAP_AFFINE))
    relative_error = np.abs(values[interpolated] / truth[interpolated] - 1)
    assert relative_error.max() < 0.01
    assert np.all(np.isfinite(values[in_field_of_view]))
    assert np.all(np.isnan(values[outside]))


def test_linear_fields_are_reproduced_exactly():
    """Trilinear interpolation is exact for a linear function: any affine slip shows up here."""
    gradient = np.array([0.004, -0.003, 0.002])  # per mm
    field = 1.0 + _world(FIELD_SHAPE, FIELD_AFFINE) @ gradient
    source = nib.Nifti1Image(field, FIELD_AFFINE)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)

    values = np.asarray(resample_to_reference(source, reference).dataobj)

    interpolated = _within(_source_coordinates(MAP_SHAPE, MAP_AFFINE, FIELD_AFFINE), 0, 0, FIELD_SHAPE)
    truth = 1.0 + _world(MAP_SHAPE, MAP_AFFINE) @ gradient
    np.testing.assert_allclose(values[interpolated], truth[interpolated], rtol=0, atol=2e-5)


def test_non_finite_source_voxels_are_bridged_but_not_spread():
    shape = (12, 12, 12)
    source_affine = _affine(2.0, (0, 0, 0), shape)
    gradient = np.array([0.01, 0.02, -0.01])
    field = 1.0 + _world(shape, source_affine) @ gradient
    field[5, 5, 5] = np.inf  # one lost voxel (any non-finite value counts as missing)
    field[8:10, 8:10, 8:10] = np.nan  # a lost block
    # reference voxel centres halfway between source centres: each sees 8 neighbours, weight 1/8 each
    reference_affine = source_affine.copy()
    reference_affine[:3, 3] += 1.0
    reference = nib.Nifti1Image(np.zeros((11, 11, 11), np.float32), reference_affine)

    single_volume_4d = nib.Nifti1Image(field[..., np.newaxis], source_affine)
    values = np.asarray(resample_to_reference(single_volume_4d, reference).dataobj)

    # the lone Inf is bridged by its 7 finite neighbours (the renormalised mean of a linear field)
    around_single = values[4:6, 4:6, 4:6]
    assert np.all(np.isfinite(around_single))
    truth = 1.0 + _world((11, 11, 11), reference_affine) @ gradient
    np.testing.assert_allclose(around_single, truth[4:6, 4:6, 4:6], atol=0.02)
    # the reference voxel at the block centre sees only NaN; its neighbours see 4/8 NaN or less
    assert np.isnan(values[8, 8, 8])
    assert np.isnan(values).sum() == 1


def test_nearest_keeps_label_values_and_picks_the_nearest_voxel():
    labels = np.random.default_rng(3).choice(np.array([0, 3, 7, 12], dtype=np.int16), size=FIELD_SHAPE)
    source = nib.Nifti1Image(labels, FIELD_AFFINE)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)

    resampled = np.asarray(resample_to_reference(source, reference, kind="nearest").dataobj)

    assert resampled.dtype == np.int16
    assert set(np.unique(resampled)) <= {0, 3, 7, 12}
    coordinates = _source_coordinates(MAP_SHAPE, MAP_AFFINE, FIELD_AFFINE)
    in_field_of_view, outside = _field_of_view(coordinates, FIELD_SHAPE)
    nearest = np.clip(np.rint(coordinates[in_field_of_view]).astype(int), 0, np.array(FIELD_SHAPE) - 1)
    np.testing.assert_array_equal(resampled[in_field_of_view], labels[tuple(nearest.T)])
    assert np.all(resampled[outside] == 0)


def _block_majority(labels, block):
    """Most frequent label in each block x block x block cube (ties: smallest label)."""
    n = np.array(labels.shape) // block
    cubes = labels.reshape(n[0], block, n[1], block, n[2], block).transpose(0, 2, 4, 1, 3, 5)
    cubes = cubes.reshape(-1, block**3)
    counts = np.stack([np.bincount(cube, minlength=labels.max() + 1) for cube in cubes])
    return counts.argmax(axis=1).reshape(n)


@pytest.mark.parametrize("block", [2, 3])
def test_majority_of_fine_labels_matches_block_majority(block):
    rng = np.random.default_rng(block)
    coarse_shape = (8, 7, 6)
    fine_shape = tuple(block * n for n in coarse_shape)
    # mostly blocky labels, with a sprinkle of other labels the majority must outvote
    labels = np.repeat(np.repeat(np.repeat(rng.integers(0, 4, coarse_shape), block, 0), block, 1), block, 2)
    flipped = rng.random(fine_shape) < 0.35
    labels[flipped] = rng.integers(0, 4, flipped.sum())
    labels = labels.astype(np.int16)
    fine_affine = _affine(1.0, (3.0, -2.0, 7.0), fine_shape, np.diag([-1.0, 1.0, 1.0]))  # LAS, like DICOM
    coarse_affine = _affine(float(block), (3.0, -2.0, 7.0), coarse_shape, np.diag([-1.0, 1.0, 1.0]))
    source = nib.Nifti1Image(labels, fine_affine)
    reference = nib.Nifti1Image(np.zeros(coarse_shape, np.float32), coarse_affine)

    majority = np.asarray(resample_to_reference(source, reference, kind="majority").dataobj)
    nearest = np.asarray(resample_to_reference(source, reference, kind="nearest").dataobj)

    truth = _block_majority(labels, block)
    np.testing.assert_array_equal(majority, truth)
    assert np.mean(nearest != truth) > 0.1  # the test can tell majority from nearest


def test_majority_from_a_coarser_grid_is_nearest():
    labels = np.random.default_rng(5).integers(0, 5, FIELD_SHAPE).astype(np.uint8)
    source = nib.Nifti1Image(labels, FIELD_AFFINE)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)
    majority = np.asarray(resample_to_reference(source, reference, kind="majority").dataobj)
    nearest = np.asarray(resample_to_reference(source, reference, kind="nearest").dataobj)
    assert majority.dtype == np.uint8
    np.testing.assert_array_equal(majority, nearest)


def test_field_of_view_without_overlap_is_a_clear_error(tmp_path):
    far_away = _affine(FIELD_VOXEL_MM, (400.0, 0.0, 0.0), FIELD_SHAPE, FIELD_ROTATION)
    path = write_image(tmp_path / "sub-01_TB1map.nii.gz", np.ones(FIELD_SHAPE), affine=far_away)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)
    with pytest.raises(BIDSInputError, match=r"sub-01_TB1map\.nii\.gz does not overlap.*qform/sform"):
        resample_to_reference(path, reference)
    with pytest.raises(BIDSInputError, match="sub-01_TB1map"):
        load_on_grid(path, reference, kind="nearest")


def test_small_coverage_warns_and_leaves_the_rest_nan():
    # shift the map grid so that about a fifth of it stays under the field
    shifted = _affine(MAP_VOXEL_MM, (9.0 + 48.0, -4.0, 5.0), MAP_SHAPE)
    source = nib.Nifti1Image(np.ones(FIELD_SHAPE, np.float32), _affine(FIELD_VOXEL_MM, (9.0, -4.0, 5.0), FIELD_SHAPE))
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), shifted)
    with pytest.warns(PartialCoverageWarning, match="covers only"):
        values = np.asarray(resample_to_reference(source, reference).dataobj)
    assert 0.05 < np.isfinite(values).mean() < 0.5
    np.testing.assert_array_equal(values[np.isfinite(values)], 1.0)


def test_identical_grids_return_the_data_untouched(tmp_path):
    data = np.random.default_rng(0).uniform(50, 150, MAP_SHAPE).astype(np.float32)
    path = write_image(tmp_path / "b1.nii.gz", data, shape=MAP_SHAPE, affine=MAP_AFFINE)
    # a shift far below the grid tolerance: interpolation would change every random value a little
    almost = MAP_AFFINE.copy()
    almost[:3, 3] += 1e-4
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), almost)

    np.testing.assert_array_equal(load_on_grid(path, reference), load_volume(path))
    as_float64 = load_on_grid(path, reference, kind="nearest", dtype=np.float64)
    assert as_float64.dtype == np.float64
    np.testing.assert_array_equal(as_float64, load_volume(path, dtype=np.float64))
    np.testing.assert_array_equal(np.asarray(resample_to_reference(path, reference).dataobj), data)
    labels = np.asarray(resample_to_reference(path, reference, kind="majority").dataobj)
    np.testing.assert_array_equal(labels, data)


def test_load_on_grid_casts_and_refuses_integer_linear(tmp_path):
    labels = np.random.default_rng(1).integers(0, 3, FIELD_SHAPE)
    path = write_image(tmp_path / "dseg.nii.gz", labels, shape=FIELD_SHAPE, affine=FIELD_AFFINE, dtype=np.int16)
    reference = nib.Nifti1Image(np.zeros(MAP_SHAPE, np.float32), MAP_AFFINE)
    mask = load_on_grid(path, reference, kind="nearest", dtype=np.uint8)
    assert mask.dtype == np.uint8 and mask.shape == MAP_SHAPE
    assert set(np.unique(mask)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="float dtype"):
        load_on_grid(path, reference, kind="linear", dtype=np.int16)
    with pytest.raises(ValueError, match="unknown resampling kind"):
        load_on_grid(path, reference, kind="cubic")
