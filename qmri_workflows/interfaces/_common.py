"""Small helpers shared by the interfaces (saving arrays on an input's grid)."""

from __future__ import annotations

import nibabel as nib
import numpy as np


def save_like(data, reference, path, *, dtype=np.float32):
    """Save ``data`` as NIfTI with the affine of ``reference`` (a nibabel image); return the path."""
    data = np.asarray(data).astype(dtype, copy=False)
    image = nib.Nifti1Image(data, reference.affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(reference.affine, code=1)
    image.set_sform(reference.affine, code=1)
    image.set_data_dtype(dtype)
    image.to_filename(path)
    return str(path)
