"""The App refuses to fit maps in a brain mask that fails its sanity checks (issue 7, item 11)."""

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qmri_workflows.cli import run
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol


@pytest.mark.xfail(
    strict=True,
    reason=(
        "since the phantom has a neck (issue 10), the brainless head's automatic mask is a solid "
        "chunk of neck and skull base (~280 mL at 4 mm) that passes every sanity check: "
        "check_brain_mask needs a test of where the mask sits in the head"
    ),
)
def test_app_stops_when_the_mask_fails_its_checks(tmp_path, caplog):
    raw = write_phantom_dataset(
        tmp_path / "raw", resolution=4.0, snr=40.0, seed=2, protocol=Protocol(bssfp=None, afi=None, rb1cor=None)
    )
    truth = raw / "derivatives" / "phantom" / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz"
    brain = ndimage.binary_dilation(np.asarray(nib.load(truth).dataobj) > 0)
    # A head without a brain (the images the mask is made from hold only noise inside the
    # skull): the automatic mask is then the scalp ring filled with background.
    first_echoes = sorted((raw / "sub-01" / "anat").glob("sub-01_echo-1_flip-*_part-mag_VFA.nii.gz"))
    assert len(first_echoes) == 2
    for path in first_echoes:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        data[brain] = np.median(data[:4, :4, :4])
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)

    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "work"), "--skip-bids-validation"]
    )
    assert code != 0
    assert "failed its sanity checks" in caplog.text
    assert first_echoes[0].name in caplog.text
    assert not list(out.rglob("*R2starmap*"))
