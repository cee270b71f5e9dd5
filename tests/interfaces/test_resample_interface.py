"""ResampleToReference as a real Nipype node."""

import nibabel as nib
import numpy as np
import pytest
from nipype.pipeline import engine as pe

from qmri_workflows.interfaces.resample import ResampleToReference
from qmri_workflows.io.resample import resample_to_reference
from tests.bids_factory import write_image

MAP_AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, -25.0], [0, 0, 1.5, -10.0], [0, 0, 0, 1]])
MAP_SHAPE = (24, 28, 20)
# 3 mm field map, tilted 12 degrees about x and shifted
_C, _S = np.cos(np.deg2rad(12)), np.sin(np.deg2rad(12))
FIELD_AFFINE = np.array([[3.0, 0, 0, -24.0], [0, 3 * _C, -3 * _S, -26.0], [0, 3 * _S, 3 * _C, -14.0], [0, 0, 0, 1]])
FIELD_SHAPE = (14, 16, 12)


@pytest.mark.parametrize(("kind", "dtype"), [("linear", np.int16), ("nearest", np.uint8)])
def test_node_writes_the_source_on_the_map_grid(tmp_path, kind, dtype):
    values = np.random.default_rng(0).integers(0, 4 if kind == "nearest" else 120, FIELD_SHAPE)
    in_file = write_image(tmp_path / "sub-01_TB1map.nii.gz", values, affine=FIELD_AFFINE, dtype=dtype)
    reference_file = write_image(tmp_path / "map.nii.gz", shape=MAP_SHAPE, affine=MAP_AFFINE)

    node = pe.Node(
        ResampleToReference(in_file=str(in_file), reference_file=str(reference_file), kind=kind),
        name=f"resample_{kind}",
        base_dir=str(tmp_path / "work"),
    )
    out_file = node.run().outputs.out_file

    assert out_file.endswith("sub-01_TB1map_resampled.nii.gz")
    written = nib.load(out_file)
    assert written.shape == MAP_SHAPE
    np.testing.assert_allclose(written.affine, MAP_AFFINE)
    expected = np.asarray(resample_to_reference(in_file, reference_file, kind=kind).dataobj)
    assert written.get_data_dtype() == (np.float32 if kind == "linear" else dtype)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    if kind == "linear":
        assert np.isnan(expected).any() and np.isfinite(expected).mean() > 0.5  # partial overlap
