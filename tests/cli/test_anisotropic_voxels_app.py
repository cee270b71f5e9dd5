"""The App on anisotropic voxels: a 2 mm phantom with every other slice dropped (2 x 2 x 4 mm).

Many protocols acquire thick slices. Dropping slices keeps each voxel's signal exact (the phantom
is simulated voxel by voxel at ``oversample=1``), so the maps must still match the truth of the
same voxels; only the steps that look at neighbours (masking, smoothing of B1, denoising, QSM)
see the new geometry, and each must take its voxel size from the header. So this tests the
handling of the geometry, not the fits' accuracy: at ``oversample=1`` the R2* data follow the
very decay the fit inverts. The fits are judged against richer simulations (oversampled,
EPG-spoiled phantoms) in ``tests/workflows``.
"""

import shutil

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.phantom.dataset import write_phantom_dataset

pytestmark = pytest.mark.slow


def _drop_every_other_slice(path):
    image = nib.load(path)
    affine = image.affine.copy()
    affine[:3, 2] *= 2
    thick = nib.Nifti1Image(np.asarray(image.dataobj)[:, :, ::2], affine, image.header)
    thick.set_qform(affine)
    thick.set_sform(affine)
    nib.save(thick, path)


@pytest.fixture(scope="module")
def thick_slices(tmp_path_factory):
    root = tmp_path_factory.mktemp("anisotropic")
    dataset = write_phantom_dataset(root / "raw", resolution=2.0, snr=200.0, subjects=1, seed=1, oversample=1)
    for path in dataset.rglob("*.nii.gz"):
        _drop_every_other_slice(path)
    out = root / "out"
    assert run.main([str(dataset), str(out), "participant", "--nprocs", "2", "-w", str(root / "work")]) == 0
    truth = dataset / "derivatives" / "phantom" / "sub-01" / "anat"
    yield out / "sub-01" / "anat", truth
    shutil.rmtree(root, ignore_errors=True)


def _load(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def test_maps_keep_the_voxel_size_and_the_mask_the_brain(thick_slices):
    anat, truth = thick_slices
    r2star = nib.load(anat / "sub-01_R2starmap.nii.gz")
    assert np.allclose(r2star.header.get_zooms()[:3], (2.0, 2.0, 4.0))
    mask, true_mask = (
        _load(anat / "sub-01_desc-brain_mask.nii.gz") > 0,
        _load(truth / "sub-01_desc-brain_mask.nii.gz") > 0,
    )
    dice = 2 * np.count_nonzero(mask & true_mask) / (np.count_nonzero(mask) + np.count_nonzero(true_mask))
    print(f"\nbrain mask Dice on 2 x 2 x 4 mm voxels: {dice:.3f}")
    assert dice > 0.95


@pytest.mark.parametrize("name", ["R2starmap", "R1map", "R2map", "PDmap"])
def test_white_matter_and_putamen_match_the_truth(thick_slices, name):
    anat, truth = thick_slices
    estimate, true_map = _load(anat / f"sub-01_{name}.nii.gz"), _load(truth / f"sub-01_{name}.nii.gz")
    for region in ("WM", "PUT"):
        inside = _load(truth / f"sub-01_label-{region}_desc-interior_mask.nii.gz") > 0
        error = np.median(estimate[inside]) / np.median(true_map[inside]) - 1
        print(f"\n{name} {region}: median {error:+.2%} off the truth")
        assert abs(error) < 0.02, (name, region)
