"""Cheap checks that an image file is whole, for the pre-flight of the BIDS App.

A truncated or damaged ``.nii.gz`` often has a readable header: nibabel opens it and the failure comes
only when a processing step reads the voxels, deep inside a workflow. These checks read the header
and the few bytes that tell the file's size, not the voxels, so every input of a cohort can be
checked before anything runs:

* ``.nii``: the file must be at least ``vox_offset`` + the bytes the header promises;
* ``.nii.gz``: the gzip trailer stores the uncompressed size (modulo 2**32) of the last member;
  it must match the header's promise. When it does not (a file written in several gzip members, by
  pigz or bgzip, say), the file is decompressed once to count its bytes, so only a damaged file
  fails.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

from .errors import BIDSInputError

__all__ = ["check_image_file"]

_GZIP_MAGIC = b"\x1f\x8b"


def _expected_bytes(image):
    """Bytes the file must hold according to its header: offset plus the data block."""
    header = image.header
    n_bytes = int(np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
    # The offset is the file's vox_offset, which the proxy keeps: nibabel resets it to 0 in the
    # header copy an image holds (it is recomputed on save).
    return int(image.dataobj.offset) + n_bytes


def _decompressed_size(path):
    """Uncompressed bytes of a gzip file, read to the end (CRC checked by the gzip module)."""
    total = 0
    with gzip.open(path, "rb") as stream:
        while chunk := stream.read(1 << 24):
            total += len(chunk)
    return total


def check_image_file(path):
    """Raise :class:`BIDSInputError` unless ``path`` is a whole NIfTI file.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nibabel image
        The image as opened for the check (data not read), so callers need not read the header again.

    Raises
    ------
    BIDSInputError
        For an empty file, a file whose compression does not match its name, an unreadable header,
        or a file shorter (or, compressed, of another size) than its header promises; the message
        names the file and says how to fix it.
    """
    import nibabel as nib

    path = os.fspath(path)
    fix = "re-export or re-copy it from the scanner/converter"
    try:
        size = os.path.getsize(path)
    except OSError as error:
        raise BIDSInputError(f"cannot read image {path}: {error.strerror}") from error
    if size == 0:
        raise BIDSInputError(f"image {path} is empty (0 bytes); {fix}")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    compressed = path.endswith(".gz")
    if compressed != (magic == _GZIP_MAGIC):
        actual = "gzip-compressed" if magic == _GZIP_MAGIC else "not gzip-compressed"
        raise BIDSInputError(
            f"image {path} is {actual}, which its name does not say; rename it "
            f"({'.nii.gz' if magic == _GZIP_MAGIC else '.nii'}) or {fix}"
        )
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel raises several types for damaged files
        raise BIDSInputError(f"image {path} has no readable NIfTI header ({error}); {fix}") from error
    expected = _expected_bytes(image)
    if not compressed:
        if size < expected:
            raise BIDSInputError(f"image {path} is truncated: {size} bytes where its header promises {expected}; {fix}")
        return image
    with open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        (stored_size,) = struct.unpack("<I", handle.read(4))
    if stored_size == expected % 2**32:
        return image
    try:
        actual = _decompressed_size(path)
    except (OSError, EOFError, zlib.error) as error:
        raise BIDSInputError(f"image {path} is damaged or truncated ({error}); {fix}") from error
    if actual < expected:
        raise BIDSInputError(
            f"image {path} is truncated: {actual} bytes uncompressed where its header promises {expected}; {fix}"
        )
    return image
