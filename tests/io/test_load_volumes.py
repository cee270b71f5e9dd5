"""io.images.load_volumes: several files on one grid read by threads into one array."""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.io.errors import BIDSInputError
from qmri_workflows.io.images import load_volume, load_volumes


def _write(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return str(path)


@pytest.fixture
def echoes(tmp_path):
    rng = np.random.default_rng(3)
    return [_write(tmp_path / f"echo{i}.nii.gz", rng.random((7, 6, 5), dtype=np.float32) * (i + 1)) for i in range(5)]


@pytest.mark.parametrize("max_threads", [1, 3, None])
def test_volumes_stack_in_file_order(echoes, max_threads):
    volumes = load_volumes(echoes, max_threads=max_threads)
    assert volumes.shape == (7, 6, 5, 5) and volumes.dtype == np.float32
    for index, path in enumerate(echoes):
        np.testing.assert_array_equal(volumes[..., index], load_volume(path))


def test_dtype_and_single_volume_4d_file(tmp_path):
    data = np.arange(7 * 6 * 5, dtype=np.int16).reshape(7, 6, 5)
    paths = [_write(tmp_path / "a.nii", data), _write(tmp_path / "b.nii.gz", data[..., None] * 2)]
    volumes = load_volumes(paths, dtype=np.float64)
    assert volumes.dtype == np.float64
    np.testing.assert_array_equal(volumes[..., 1], 2 * data)


def test_first_file_off_the_grid_is_named(echoes, tmp_path):
    shifted = np.eye(4)
    shifted[0, 3] = 2.0
    off_grid = _write(tmp_path / "shifted.nii.gz", np.ones((7, 6, 5), np.float32), shifted)
    other = _write(tmp_path / "other.nii.gz", np.ones((7, 6, 4), np.float32))
    with pytest.raises(BIDSInputError, match="shifted.nii.gz"):
        load_volumes([echoes[0], off_grid, echoes[1], other], reference=nib.load(echoes[0]))


def test_no_file_is_an_error():
    with pytest.raises(ValueError, match="at least one file"):
        load_volumes([])


def test_require_variation_reaches_every_file(echoes, tmp_path):
    flat = _write(tmp_path / "flat.nii.gz", np.zeros((7, 6, 5), np.float32))
    load_volumes([echoes[0], flat])  # a constant image may be a mask
    with pytest.raises(BIDSInputError, match="flat.nii.gz"):
        load_volumes([echoes[0], flat], require_variation=True)
