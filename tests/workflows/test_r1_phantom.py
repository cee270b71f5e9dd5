"""R1 (and B1+ from AFI) from the BIDS App against the digital phantom's ground truth.

The phantom writes a raw BIDS dataset with a VFA pair (6/21 degrees, TR 25 ms, 8 echoes), an AFI
pair and phase-cycled bSSFP (``noiseless_phantom_2mm`` in ``conftest.py``, one per spoiling model
and test session); each test runs the App on the scans it needs. The App fits R2*/S0, maps B1+
from the AFI pair and R1 from the S0 maps; R1 is compared with the truth in the interior masks
(``phantom.evaluate.region_errors``).

Spoiling: the phantom simulates either ideal spoiling (the Ernst equation) or the scanner's
imperfect RF spoiling by EPG (its default).
"""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.phantom.evaluate import format_region_errors, region_errors
from tests.phantom_datasets import dataset_without

# White matter, cortex and each deep grey nucleus: under 1 %; each lesion stage: under 2 %.
TISSUES = ("WM", "CGM", "CAU", "PUT", "GP", "THA")
LESIONS = ("LEA", "LLA", "LCAC", "LCAR", "LCI", "CL")
MIN_INTERIOR_VOXELS = 10


def _phantom(noiseless_phantom_2mm, tmp_path, spoiling, *, drop=()):
    """The noiseless 2 mm phantom simulated at 1 mm (oversample 2, so the truth is not the fit's
    inverse), spoiled as asked, without the GRE phase (R1 does not need QSM) and the scans in
    ``drop``."""
    return dataset_without(noiseless_phantom_2mm(spoiling), tmp_path / "raw", ("phase", *drop))


def _run_app(raw, tmp_path, name, *extra):
    out = tmp_path / name
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / f"work_{name}"),
         "--skip-bids-validation", *extra]
    )  # fmt: skip
    assert code == 0
    return out


def _r1_errors(raw, out, label):
    anat = out / "sub-01" / "anat"
    mask = np.asarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    rows = region_errors(
        raw / "derivatives" / "phantom", anat / "sub-01_R1map.nii.gz", subject="01", suffix="R1map", mask=mask
    )
    print(f"\nR1, {label}:\n" + format_region_errors(rows))
    return {row.abbreviation: row for row in rows if row.interior_voxels >= MIN_INTERIOR_VOXELS}


def _b1_error(raw, out, source):
    """Median relative error of the published TB1map in the brain."""
    truth = raw / "derivatives" / "phantom" / "sub-01"
    mask = np.asarray(nib.load(out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    b1 = np.asarray(nib.load(out / "sub-01" / "fmap" / "sub-01_TB1map.nii.gz").dataobj, dtype=float)
    true_b1 = np.asarray(nib.load(truth / "fmap" / "sub-01_TB1map.nii.gz").dataobj, dtype=float)
    b1_error = float(np.median(b1[mask] / true_b1[mask] - 1))
    print(f"\nB1+ from {source}: median error {b1_error:+.2%} in the brain")
    return b1_error


def _check_corrected(by_name):
    assert set(TISSUES) <= set(by_name), f"regions without an interior: {set(TISSUES) - set(by_name)}"
    assert {"LEA", "LLA", "LCI"} <= set(by_name)
    for name, row in by_name.items():
        if name in TISSUES or name in LESIONS:
            limit = 0.01 if name in TISSUES else 0.02
            assert row.interior_median_abs < limit, (
                f"{row.name}: median |relative R1 error| {row.interior_median_abs:.2%} "
                f"in {row.interior_voxels} interior voxels"
            )


@pytest.mark.slow
def test_r1_on_the_ideally_spoiled_phantom(noiseless_phantom_2mm, tmp_path):
    """2 mm simulated at 1 mm (oversample 2), noiseless, ideal spoiling, B1+ from AFI.

    Measured (this phantom, 2 mm): interior median |error| 0.2-0.6 % in WM, cortex and nuclei and
    0.3-0.6 % in the lesions; without B1+ correction 11-32 %.
    """
    raw = _phantom(noiseless_phantom_2mm, tmp_path, "ideal", drop=("bssfp",))
    # the data are spoiled ideally: correcting them for imperfect spoiling would bias them
    corrected = _r1_errors(raw, _run_app(raw, tmp_path, "out", "--no-spoiling-correction"), "B1+ from AFI")
    _check_corrected(corrected)
    uncorrected = _r1_errors(
        raw, _run_app(raw, tmp_path, "nob1", "--no-spoiling-correction", "--no-b1-correction"), "no B1+ correction"
    )
    # the phantom's B1+ spans about 0.8-1.2: R1 ~ B1^2 errs by several percent without it
    for name in TISSUES:
        assert uncorrected[name].interior_median_abs > 0.03
        assert uncorrected[name].interior_median_abs > 5 * corrected[name].interior_median_abs


@pytest.mark.slow
def test_r1_on_the_epg_spoiled_phantom(noiseless_phantom_2mm, tmp_path):
    """The same with the scanner's imperfect spoiling: the App's default corrects for it.

    Measured (2 mm): with the T2 inferred from R2*, 0.15-0.65 % in WM, cortex and nuclei (pallidum
    +0.26 %, against +2 % with one tissue T2 of 80 ms) and 0.20-0.73 % in the lesion stages with an
    interior; without the spoiling correction 1.7-6.0 %.
    """
    raw = _phantom(noiseless_phantom_2mm, tmp_path, "epg", drop=("bssfp",))
    corrected = _r1_errors(raw, _run_app(raw, tmp_path, "out"), "B1+ from AFI, spoiling corrected")
    # Without an R2 map the correction takes each voxel's T2 from its R2* (Gelman 1999's equal iron slopes
    # of R2 and R2', core.relaxometry.spoiling.t2_prior_from_r2star): the globus pallidus, T2 39 ms on
    # the phantom, no longer keeps the +2 % that one fixed tissue T2 of 80 ms left it.
    sidecar = (tmp_path / "out" / "sub-01" / "anat" / "sub-01_R1map.json").read_text()
    assert '"SpoilingCorrectionT2": "r2star"' in sidecar
    _check_corrected(corrected)
    without = _r1_errors(raw, _run_app(raw, tmp_path, "nospoil", "--no-spoiling-correction"), "no spoiling correction")
    assert without["WM"].interior_median_abs > 0.01


@pytest.mark.slow
def test_map_free_b1_estimate_halves_the_uncorrected_r1_error(noiseless_phantom_2mm, tmp_path):
    """Without any B1+ data the App estimates B1+ from the VFA data; it must remove at least half of
    the R1 error of the uncorrected fit (issue 8). Ideal spoiling isolates the B1+ effect."""
    raw = _phantom(noiseless_phantom_2mm, tmp_path, "ideal", drop=("bssfp", "afi"))
    estimated = _r1_errors(
        raw, _run_app(raw, tmp_path, "out", "--no-spoiling-correction"), "B1+ estimated from the VFA data"
    )
    uncorrected = _r1_errors(
        raw, _run_app(raw, tmp_path, "none", "--no-spoiling-correction", "--no-b1-estimate"), "no B1+ correction"
    )
    sidecar = (tmp_path / "out" / "sub-01" / "anat" / "sub-01_R1map.json").read_text()
    assert "estimated from the VFA data" in sidecar
    error_estimated = np.mean([estimated[name].interior_median_abs for name in TISSUES])
    error_uncorrected = np.mean([uncorrected[name].interior_median_abs for name in TISSUES])
    print(f"mean interior median |R1 error| over {TISSUES}: {error_estimated:.2%} vs {error_uncorrected:.2%}")
    assert error_estimated <= 0.5 * error_uncorrected


@pytest.mark.slow
def test_r1_with_the_r2_map_on_the_epg_spoiled_phantom(noiseless_phantom_2mm, tmp_path):
    """With bSSFP data the R2 family refits R1 with each voxel's own T2 (then R2 with that R1): under
    1 % in every tissue and lesion stage with an interior (issue 8), and R2 within 1 % as well.

    Measured (2 mm): R1 0.10-0.39 % in WM, cortex and nuclei (pallidum 0.22 %), 0.12-0.16 % in the
    lesion stages with an interior; R2 0.01-0.39 % (1 ms RF pulses, DESPOT2 corrected for them).
    """
    raw = _phantom(noiseless_phantom_2mm, tmp_path, "epg")
    out = _run_app(raw, tmp_path, "out")
    anat = out / "sub-01" / "anat"
    sidecar = (anat / "sub-01_R1map.json").read_text()
    assert '"SpoilingCorrectionT2": "R2map"' in sidecar
    corrected = _r1_errors(raw, out, "B1+ from AFI, spoiling corrected at the T2 of the R2 map")
    assert set(TISSUES) <= set(corrected) and {"LEA", "LLA", "LCI"} <= set(corrected)
    for name, row in corrected.items():
        if name in TISSUES or name in LESIONS:
            assert row.interior_median_abs < 0.01, row
    mask = np.asarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    rows = region_errors(
        raw / "derivatives" / "phantom", anat / "sub-01_R2map.nii.gz", subject="01", suffix="R2map", mask=mask
    )
    print("\nR2 with the refined R1:\n" + format_region_errors(rows))
    for row in rows:
        if row.abbreviation in TISSUES + LESIONS and row.interior_voxels >= MIN_INTERIOR_VOXELS:
            assert row.interior_median_abs < 0.01, row


@pytest.mark.slow
def test_r1_with_b1_from_a_double_angle_pair(tmp_path):
    """A 3 mm phantom (oversampled, EPG-spoiled, SNR 50) whose B1+ scan is a double-angle pair at
    60/120 deg with a 2 s TR (``TB1DAM``) instead of AFI. The TR is short for CSF and grey matter:
    read as fully relaxed the map was 12 % high (median in the brain) and R1 of CSF -22 %, of the
    lesions -6 to -16 %. Read at each voxel's T1 from the VFA images (spoiling-corrected DESPOT1):
    B1+ -0.1 %, R1 -0.2 % in white matter, -0.5 to -1.3 % in the nuclei (measured)."""
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import DAMProtocol, Protocol

    raw = write_phantom_dataset(
        tmp_path / "raw", resolution=3.0, snr=50.0, subjects=1, seed=11,
        protocol=Protocol(afi=None, bssfp=None, dam=DAMProtocol()),
    )  # fmt: skip
    out = _run_app(raw, tmp_path, "out")
    b1_error = _b1_error(raw, out, "DAM")
    assert abs(b1_error) < 0.01
    by_name = _r1_errors(raw, out, "B1+ from a double-angle pair")
    for name in ("WM", "CAU", "PUT", "GP", "THA"):
        assert abs(by_name[name].interior_median) < 0.025, f"{name}: {by_name[name].interior_median:+.2%}"
    sidecar = json.loads((out / "sub-01" / "fmap" / "sub-01_TB1map.json").read_text())
    assert sidecar["T1Correction"].startswith("ratio read at each voxel's T1")
    assert "corrected for imperfect spoiling, increment 50 deg" in sidecar["T1Correction"]
    r1_sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_R1map.json").read_text())
    assert r1_sidecar["B1Correction"].startswith("TB1map (double-angle pair, flip 60/120 deg, TR 2000 ms, read at")
    assert sidecar["Sources"] == [f"bids:raw:sub-01/fmap/sub-01_flip-{i}_TB1DAM.nii.gz" for i in (1, 2)]


@pytest.mark.slow
def test_r1_with_b1_from_a_siemens_tfl_b1map(tmp_path):
    """A 3 mm phantom (oversampled, EPG-spoiled, SNR 50) whose B1+ scan is a Siemens tfl_b1map
    (``TB1TFL``: 80 deg saturation, 4 ms to the centre of k-space, famp as integers) with the VE/XA
    sidecar (FlipAngle 8, the readout angle), so the App needs ``--tb1tfl-prep-angle 80``.
    Measured: B1+ -0.16 % (median in the brain), R1 -0.75 % in white matter; 25 s (most of it the
    phantom)."""
    from qmri_workflows.phantom.dataset import write_phantom_dataset
    from qmri_workflows.phantom.protocol import Protocol, TFLProtocol

    raw = write_phantom_dataset(
        tmp_path / "raw", resolution=3.0, snr=50.0, subjects=1, seed=11,
        protocol=Protocol(afi=None, bssfp=None, tfl=TFLProtocol()),
    )  # fmt: skip
    out = _run_app(raw, tmp_path, "out", "--tb1tfl-prep-angle", "80")
    b1_error = _b1_error(raw, out, "the tfl_b1map")
    assert abs(b1_error) < 0.02
    by_name = _r1_errors(raw, out, "B1+ from a Siemens tfl_b1map")
    for name in ("WM", "CAU", "PUT", "THA"):
        assert abs(by_name[name].interior_median) < 0.03, f"{name}: {by_name[name].interior_median:+.2%}"
    r1_sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_R1map.json").read_text())
    assert "Siemens tfl_b1map (famp / 10 / 80 deg, angle from --tb1tfl-prep-angle)" in r1_sidecar["B1Correction"]
    sidecar = json.loads((out / "sub-01" / "fmap" / "sub-01_TB1map.json").read_text())
    assert sidecar["Sources"] == [
        f"bids:raw:sub-01/fmap/sub-01_acq-{label}_TB1TFL.nii.gz" for label in ("famp", "anat")
    ]
