"""The App's maps do not depend on the voxel order the images are stored in.

The shipped example (one subject) is copied with every image stored in another order: the axes
permuted to posterior-superior-right (a sagittal slab) with the affine rewritten by nibabel, so the
images describe the same head in the same world space. The App runs on both, and each map of the
second run, brought back to the first order, is compared voxel by voxel. This caught a brain-mask
closing that ran along the first array axis only, and QSM inversions whose regularisation and
dipole kernel depended on the direction an axis is stored in (up to 13 % NRMSE of chi).
"""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from qmri_workflows.cli import run

EXAMPLE = Path(__file__).resolve().parents[2] / "bids_example"
OTHER_ORDER = ("P", "S", "R")


def _reoriented(image, codes):
    """The same stored values in another order, with the same scale factors: nothing rounded anew
    (``as_reoriented`` and a save re-scale integer data, which moved the values by a part in 10^4
    and the maps by up to 3e-3)."""
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(codes))
    stored = np.asanyarray(image.dataobj.get_unscaled())
    affine = image.affine @ inv_ornt_aff(transform, image.shape)
    out = nib.Nifti1Image(apply_orientation(stored, transform).astype(stored.dtype), affine, header=image.header)
    out.header.set_slope_inter(image.dataobj.slope, image.dataobj.inter)
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("storage_order")
    stored = root / "stored"
    shutil.copytree(EXAMPLE, stored, ignore=shutil.ignore_patterns("derivatives", "sub-02"))
    for path in stored.rglob("*.nii.gz"):
        nib.save(_reoriented(nib.load(path), OTHER_ORDER), path)
    outputs = {}
    for name, dataset in (("example", EXAMPLE), ("stored", stored)):
        out = root / f"out-{name}"
        code = run.main(
            [str(dataset), str(out), "participant", "--participant-label", "01", "-w", str(root / f"work-{name}")]
        )
        assert code == 0
        outputs[name] = out / "sub-01"
    return outputs


def _pair(two_runs, relative):
    first = nib.load(two_runs["example"] / relative)
    second = nib.load(two_runs["stored"] / relative)
    assert nib.aff2axcodes(second.affine) == OTHER_ORDER
    back = second.as_reoriented(ornt_transform(io_orientation(second.affine), io_orientation(first.affine)))
    assert np.allclose(back.affine, first.affine, atol=1e-4)
    return np.asarray(first.dataobj, dtype=np.float64), np.asarray(back.dataobj, dtype=np.float64)


def test_masks_are_identical(two_runs):
    for name in ("desc-brain_mask", "desc-qsm_mask"):
        first, second = _pair(two_runs, f"anat/sub-01_{name}.nii.gz")
        assert first.any() and np.array_equal(first, second), name


@pytest.mark.parametrize(
    "relative",
    [
        "anat/sub-01_R2starmap.nii.gz",
        "anat/sub-01_R2map.nii.gz",
        "anat/sub-01_R1map.nii.gz",
        "anat/sub-01_PDmap.nii.gz",
        "fmap/sub-01_desc-local_fieldmap.nii.gz",
        "anat/sub-01_Chimap.nii.gz",
        "anat/sub-01_desc-noise_sigmamap.nii.gz",
        "anat/sub-01_desc-bssfpnoise_sigmamap.nii.gz",
    ],
)
def test_maps_agree_voxel_by_voxel(two_runs, relative):
    """To float32 rounding (measured: 2e-8 to 5e-8, the local field and chi 2e-7 and 8e-7).

    Chi and the local field differed by 13 % and 100 % before the fixes this test came with, and the
    noise SD of the air by 0.5 % (blocks laid from the first voxel) before its blocks were centred.
    """
    brain, _ = _pair(two_runs, "anat/sub-01_desc-brain_mask.nii.gz")
    first, second = _pair(two_runs, relative)
    inside = (brain > 0) & np.isfinite(first) & np.isfinite(second)
    difference = np.linalg.norm((second - first)[inside]) / np.linalg.norm(first[inside])
    print(f"\n{relative}: relative difference between storage orders {difference:.1e}")
    assert difference < 1e-5
