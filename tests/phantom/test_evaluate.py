"""Region-by-region comparison of an estimate with the phantom truth: interior vs edge."""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.phantom.evaluate import format_region_errors, region_errors


def _save(path, data):
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.eye(4)), path)


def test_interior_and_edge_errors(tmp_path):
    anat = tmp_path / "sub-01" / "anat"
    anat.mkdir(parents=True)
    dseg = np.zeros((10, 6, 4))
    dseg[:6] = 3  # WM
    dseg[6:] = 2  # cortex
    truth = np.where(dseg == 3, 20.0, 16.0)
    _save(anat / "sub-01_R2starmap.nii.gz", truth)
    _save(anat / "sub-01_dseg.nii.gz", dseg)
    (anat / "sub-01_dseg.tsv").write_text(
        "index\tname\tabbreviation\n0\tbackground\tBG\n2\tcortical GM\tCGM\n3\tWM\tWM\n"
    )
    interior = np.zeros(dseg.shape)
    interior[1:4] = 1
    _save(anat / "sub-01_label-WM_desc-interior_mask.nii.gz", interior)
    estimate = truth.copy()
    estimate[1:4] *= 1.002  # interior: +0.2 %
    estimate[4:6] *= 0.95  # WM edge: -5 %
    rows = region_errors(tmp_path, estimate, subject="01")
    assert [row.abbreviation for row in rows] == ["WM"]  # only regions with an interior mask
    wm = rows[0]
    assert wm.interior_voxels == 3 * 6 * 4 and wm.interior_median_abs == pytest.approx(0.002)
    assert wm.edge_voxels == 3 * 6 * 4  # rows 0, 4, 5
    assert wm.edge_median == pytest.approx(-0.05) and wm.edge_median_abs == pytest.approx(0.05)
    # a mask restricts both parts
    mask = np.ones(dseg.shape, bool)
    mask[0] = False
    restricted = region_errors(tmp_path, estimate, subject="01", mask=mask)[0]
    assert restricted.edge_voxels == 2 * 6 * 4
    assert "WM" in format_region_errors(rows)
    with pytest.raises(ValueError, match="same grid"):
        region_errors(tmp_path, estimate[:5], subject="01")
