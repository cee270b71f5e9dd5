"""Loading images for the interfaces: unusable images are input errors naming the file."""

import numpy as np
import pytest

from qmri_workflows.io.errors import BIDSInputError
from qmri_workflows.io.images import check_phase_radians, load_volume
from tests.bids_factory import write_image


@pytest.mark.parametrize(
    "content, message",
    [
        (0.0, "holds only zeros"),
        (412.0, "the same value \\(412\\) in every voxel"),
        (np.nan, "holds no finite value"),
        (np.inf, "holds no finite value"),
    ],
    ids=["zeros", "constant", "nan", "inf"],
)
def test_image_without_signal_is_an_input_error_naming_the_file(tmp_path, content, message):
    path = write_image(tmp_path / "sub-01_echo-2_MEGRE.nii.gz", np.full((6, 5, 4), content))
    with pytest.raises(BIDSInputError, match=message) as raised:
        load_volume(path, require_variation=True)
    assert str(path) in str(raised.value)
    assert "export" in str(raised.value)  # and how to fix it


def test_zeros_with_nan_blocks_are_still_no_signal(tmp_path):
    data = np.zeros((6, 5, 4))
    data[:2] = np.nan
    path = write_image(tmp_path / "zeros.nii.gz", data)
    with pytest.raises(BIDSInputError, match="only zeros and 40 NaN/Inf"):
        load_volume(path, require_variation=True)


def test_constant_images_that_need_no_signal_and_partial_nan_load(tmp_path):
    # A mask (or a flat field map) may be constant; NaN blocks in a magnitude are left to the fit.
    constant = write_image(tmp_path / "mask.nii.gz", np.ones((6, 5, 4)), dtype=np.uint8)
    assert (load_volume(constant) == 1).all()
    data = np.random.default_rng(0).uniform(100, 200, (6, 5, 4))
    data[:3, :3] = np.nan
    loaded = load_volume(write_image(tmp_path / "blocks.nii.gz", data), require_variation=True)
    assert np.isnan(loaded).sum() == 3 * 3 * 4


def test_gzipped_images_load_the_same_through_isal_and_nibabel(tmp_path):
    """The fast inflate path returns exactly what nibabel reads, scaling and NIfTI-2 included."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    data = rng.integers(-2000, 2000, (12, 10, 8)).astype(np.int16)
    for image_class in (nib.Nifti1Image, nib.Nifti2Image):
        image = image_class(data, np.diag([1.5, 1.5, 2.0, 1.0]))
        image.header.set_slope_inter(0.25, 10.0)
        path = tmp_path / f"{image_class.__name__}.nii.gz"
        nib.save(image, path)
        expected = nib.load(path).get_fdata(dtype=np.float32)
        np.testing.assert_array_equal(load_volume(path), expected)


def test_damaged_gzip_data_are_an_input_error_naming_the_file(tmp_path):
    path = write_image(tmp_path / "echo.nii.gz", np.random.default_rng(1).random((20, 20, 20)))
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BIDSInputError, match="echo.nii.gz"):
        load_volume(path)


@pytest.mark.parametrize(
    "stored, scale, what",
    [
        (np.arange(-4096, 4096, 3, dtype=float), 1.0, "scanner integers labelled radians"),
        (np.linspace(-np.pi, np.pi, 200), np.pi / 180, "radians labelled degrees"),
        (np.linspace(-np.pi, np.pi, 200), np.pi / 4096, "radians read as Siemens integers"),
    ],
)
def test_phase_that_is_not_wrapped_radians_after_its_factor_is_refused_with_the_file(stored, scale, what):
    with pytest.raises(BIDSInputError, match=r'cycle-2_part-phase\.nii is not wrapped phase.*"Units" of its values'):
        check_phase_radians(stored * scale, "cycle-2_part-phase.nii", scale, image="phase cycle")
    check_phase_radians(np.linspace(-np.pi, np.pi, 200), "any.nii", 1.0)  # radians pass
