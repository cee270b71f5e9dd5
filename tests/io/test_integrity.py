"""Damaged image files are found from their header and size, before any voxel is read."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.io.errors import BIDSInputError
from qmri_workflows.io.integrity import check_image_file


def _image(path, shape=(20, 21, 22)):
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize("name", ["whole.nii", "whole.nii.gz"])
def test_whole_files_pass(tmp_path, name):
    check_image_file(_image(tmp_path / name))


def test_a_file_written_in_several_gzip_members_passes(tmp_path):
    plain = _image(tmp_path / "plain.nii").read_bytes()
    target = tmp_path / "members.nii.gz"
    with open(target, "wb") as handle:  # as pigz or bgzip write: independent members, one after another
        for start in range(0, len(plain), 7000):
            handle.write(gzip.compress(plain[start : start + 7000]))
    assert nib.load(target).get_fdata().shape == (20, 21, 22)
    check_image_file(target)


@pytest.mark.parametrize("name", ["cut.nii", "cut.nii.gz"])
def test_truncated_file_is_named(tmp_path, name):
    path = _image(tmp_path / name)
    content = path.read_bytes()
    path.write_bytes(content[: len(content) * 2 // 3])
    with pytest.raises(BIDSInputError, match=rf"{name}.*(truncated|damaged)"):
        check_image_file(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(BIDSInputError, match="empty.nii.gz is empty"):
        check_image_file(path)


def test_compression_that_the_name_does_not_say(tmp_path):
    plain = _image(tmp_path / "x.nii")
    fake_gz = tmp_path / "fake.nii.gz"
    shutil.copy(plain, fake_gz)
    with pytest.raises(BIDSInputError, match="fake.nii.gz is not gzip-compressed"):
        check_image_file(fake_gz)
    gz = _image(tmp_path / "y.nii.gz")
    fake_plain = tmp_path / "fake.nii"
    shutil.copy(gz, fake_plain)
    with pytest.raises(BIDSInputError, match="fake.nii is gzip-compressed"):
        check_image_file(fake_plain)


@pytest.mark.parametrize("name", ["lying.nii", "lying.nii.gz"])
def test_header_that_promises_more_voxels_than_the_file_holds(tmp_path, name):
    path = _image(tmp_path / name)
    image = nib.load(path)
    header = image.header.copy()
    header.set_data_shape((20, 21, 40))
    raw = path.read_bytes() if name.endswith(".nii") else gzip.decompress(path.read_bytes())
    lying = header.binaryblock + raw[len(header.binaryblock) :]
    path.write_bytes(lying if name.endswith(".nii") else gzip.compress(lying))
    with pytest.raises(BIDSInputError, match=rf"{name} is truncated"):
        check_image_file(path)


def test_garbage_with_a_nifti_name(tmp_path):
    path = tmp_path / "garbage.nii"
    path.write_bytes(b"this is not an image" * 50)
    with pytest.raises(BIDSInputError, match="garbage.nii has no readable NIfTI header"):
        check_image_file(path)


@pytest.mark.parametrize("name", ["short.nii", "short.nii.gz"])
def test_file_short_by_less_than_its_header_size_is_found(tmp_path, name):
    # The voxel data start at vox_offset (352 bytes here), which the size check must count: a file
    # missing its last 100 bytes is still longer than the data block alone.
    path = _image(tmp_path / name)
    raw = path.read_bytes() if name.endswith(".nii") else gzip.decompress(path.read_bytes())
    assert int(nib.load(path).dataobj.offset) == 352
    short = raw[:-100]
    path.write_bytes(short if name.endswith(".nii") else gzip.compress(short))
    with pytest.raises(BIDSInputError, match=rf"{name} is truncated: {len(short)} bytes"):
        check_image_file(path)
