"""The BIDS App on damaged echoes and noisy fits: input errors, counts in sidecars, the R2* error map."""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from tests.bids_factory import head_image, make_megre_dataset, make_vfa_dataset

R2STAR_FAMILY = ("R2starmap", "desc-stderr_R2starmap", "T2starmap", "desc-flip1_S0map", "desc-flip2_S0map")
COUNTS = (
    "NonFiniteInputVoxels",
    "UndeterminedR2starVoxels",
    "NegativeR2starVoxels",
    "NonSignificantR2starVoxels",
    "FittedVoxels",
)


def _run(raw, tmp_path):
    return run.main(
        [
            str(raw),
            str(tmp_path / "out"),
            "participant",
            "--nprocs",
            "1",
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
        ]
    )


def _load(path):
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def test_nan_block_is_counted_and_the_error_map_published(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw", n_echoes=3)
    # Echoes without decay and with strong noise: R2* scatters around 0, so the counts are not empty.
    for index, echo in enumerate(sorted((raw / "sub-01" / "anat").glob("*part-mag*.nii.gz"))):
        template = nib.load(echo)
        flat = head_image(template.shape, seed=100 + index, r2star=0.0, sigma=150.0).astype(np.float32)
        nib.save(nib.Nifti1Image(flat, template.affine), echo)
    damaged = next((raw / "sub-01" / "anat").glob("*echo-2_flip-1_part-mag*.nii.gz"))
    image = nib.load(damaged)
    data = np.asarray(image.dataobj)
    data[2:4, 3:5, :] = np.nan  # 2 x 2 x 6 voxels
    nib.save(nib.Nifti1Image(data, image.affine), damaged)
    caplog.set_level("INFO")
    assert _run(raw, tmp_path) == 0

    anat = tmp_path / "out" / "sub-01" / "anat"
    sidecars = {name: json.loads((anat / f"sub-01_{name}.json").read_text()) for name in R2STAR_FAMILY}
    assert (anat / "sub-01_desc-stderr_R2starmap.nii.gz").is_file()
    for sidecar in sidecars.values():
        assert {key: sidecar[key] for key in COUNTS} == {key: sidecars["R2starmap"][key] for key in COUNTS}
    counts = sidecars["R2starmap"]
    assert counts["NonFiniteInputVoxels"] == 24
    # named as the input file (the fit read its denoised copy), without the extension
    assert f"{damaged.name.removesuffix('.nii.gz')} (24)" in caplog.text
    assert "desc-denoised" not in caplog.text.split("Most non-finite voxels:")[1].splitlines()[0]

    mask = _load(anat / "sub-01_desc-brain_mask.nii.gz") > 0
    r2star = _load(anat / "sub-01_R2starmap.nii.gz")
    stderr = _load(anat / "sub-01_desc-stderr_R2starmap.nii.gz")
    t2star = _load(anat / "sub-01_T2starmap.nii.gz")
    # Random echoes: R2* scatters around 0, so most voxels are negative or not significant.
    assert counts["FittedVoxels"] == mask.sum() > 0
    assert counts["NegativeR2starVoxels"] == (mask & (r2star < 0)).sum() > 0
    assert counts["NonSignificantR2starVoxels"] == (mask & np.isfinite(r2star) & np.isnan(t2star)).sum() > 0
    assert counts["UndeterminedR2starVoxels"] == (mask & np.isnan(r2star)).sum()
    kept = mask & np.isfinite(t2star)
    assert np.all(r2star[kept] > 2 * stderr[kept])
    assert np.all(stderr[mask & np.isfinite(r2star)] > 0) and np.all(stderr[~mask] == 0)
    assert sidecars["desc-stderr_R2starmap"]["Units"] == "1/s"
    assert "standard error" in sidecars["T2starmap"]["Description"]


@pytest.mark.parametrize(
    "make, pattern",
    [
        (make_vfa_dataset, "*echo-3_flip-2_part-mag*.nii.gz"),
        (make_megre_dataset, "*echo-1_part-mag*.nii.gz"),  # the brain mask reads it first
    ],
    ids=["vfa-late-echo", "megre-first-echo"],
)
def test_all_zero_echo_stops_the_subject_naming_the_file(tmp_path, caplog, make, pattern):
    raw = make(tmp_path / "raw", n_echoes=3)
    damaged = next((raw / "sub-01" / "anat").glob(pattern))
    image = nib.load(damaged)
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.float32), image.affine), damaged)
    assert _run(raw, tmp_path) == run.EXIT_FAILURE
    assert not (tmp_path / "out" / "sub-01").exists()
    assert f"{damaged} holds only zeros" in caplog.text
