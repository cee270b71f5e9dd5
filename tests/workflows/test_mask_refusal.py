"""The App refuses to fit maps in a brain mask that fails its sanity checks, and takes the user's
own mask from ``--derivatives`` instead (issue 7, item 11)."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.cli import run
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol


@pytest.fixture(scope="module")
def brainless_head(tmp_path_factory):
    """The 4 mm phantom (with its neck) without a brain, its first echoes and its brain mask."""
    raw = write_phantom_dataset(
        tmp_path_factory.mktemp("brainless") / "raw",
        resolution=4.0,
        snr=40.0,
        seed=2,
        protocol=Protocol(bssfp=None, afi=None, rb1cor=None),
    )
    truth = raw / "derivatives" / "phantom" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    brain = ndimage.binary_dilation(np.asarray(nib.load(truth).dataobj) > 0)
    # A head without a brain (the images the mask is made from hold only noise inside the
    # skull): the automatic mask is then a solid chunk of neck and skull base, which passes the
    # shape checks; the whole cranium above it gives it away.
    first_echoes = sorted((raw / "sub-01" / "anat").glob("sub-01_echo-1_flip-*_part-mag_VFA.nii.gz"))
    assert len(first_echoes) == 2
    for path in first_echoes:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[brain] = np.median(data[:4, :4, :4])
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)
    return raw, first_echoes, truth


def _app(raw, tmp_path, *extra):
    out = tmp_path / "out"
    code = run.main([
        str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "work"), "--skip-bids-validation",
        *extra,
    ])  # fmt: skip
    return code, out


def test_app_stops_when_the_mask_fails_its_checks(brainless_head, tmp_path, caplog):
    raw, first_echoes, _ = brainless_head
    code, out = _app(raw, tmp_path)
    assert code != 0
    assert "failed its sanity checks" in caplog.text
    assert first_echoes[0].name in caplog.text
    assert "lies low in the head" in caplog.text
    # The fix: a mask of one's own, with the path it goes to.
    assert "--derivatives" in caplog.text and "sub-01/anat/sub-01_desc-brain_mask.nii.gz" in caplog.text
    assert not list(out.rglob("*R2starmap*"))


def test_app_uses_the_users_mask_from_derivatives(brainless_head, tmp_path, caplog):
    # The fix the refusal names: the same head with the user's mask given with --derivatives.
    raw, _, truth = brainless_head
    derivatives = tmp_path / "masks"
    (derivatives / "sub-01" / "anat").mkdir(parents=True)
    (derivatives / "dataset_description.json").write_text(
        json.dumps({"Name": "masks", "BIDSVersion": "1.10.0", "DatasetType": "derivative"})
    )
    user_mask = derivatives / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    user_mask.write_bytes(truth.read_bytes())
    code, out = _app(raw, tmp_path, "--derivatives", str(derivatives), "--denoise", "none")
    assert code == 0, caplog.text
    assert "sub-01_desc-brain_mask.nii.gz given with --derivatives" in caplog.text  # the plan says so
    published = out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    assert np.array_equal(np.asarray(nib.load(published).dataobj) > 0, np.asarray(nib.load(truth).dataobj) > 0)
    assert "--derivatives" in json.loads(published.with_name("sub-01_desc-brain_mask.json").read_text())["Description"]
    r2star = np.asarray(nib.load(out / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").dataobj)
    assert np.all(r2star[np.asarray(nib.load(truth).dataobj) == 0] == 0)  # fitted in the user's mask only
