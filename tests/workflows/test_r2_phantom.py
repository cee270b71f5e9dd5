"""R2 from phase-cycled bSSFP through the BIDS App, against the digital phantom's ground truth.

The phantom writes four phase cycles (0, 90, 180, 270 deg) at 15 and 50 deg, TR 5 ms, with the
dipole-model B0 of the head (bands inside the brain in every single cycle), plus the VFA and AFI
that R1 and B1+ come from. Today each fine voxel of the phantom is the closed-form bSSFP signal
(instantaneous pulses, one frequency); the oversampled voxels average a few of them.
"""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.core.bssfp import fit_despot2
from qmri_workflows.core.qsm.referencing import ppm_to_hz
from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.evaluate import format_region_errors, region_errors
from qmri_workflows.phantom.protocol import Protocol

TISSUES = ("WM", "CGM", "CAU", "PUT", "GP", "THA")
LESIONS = ("LEA", "LLA", "LCAC", "LCAR", "LCI", "CL")
MIN_INTERIOR_VOXELS = 10


def _rows(raw, estimate, mask, label):
    rows = region_errors(raw / "derivatives" / "phantom", estimate, subject="01", suffix="R2map", mask=mask)
    print(f"\nR2, {label}:\n" + format_region_errors(rows))
    return {row.abbreviation: row for row in rows if row.interior_voxels >= MIN_INTERIOR_VOXELS}


def _one_cycle_r2(raw, out, mask):
    """DESPOT2 on the magnitude of one phase cycle (0 deg) per flip angle: what the bands cost."""
    anat, fmap = raw / "sub-01" / "anat", out / "sub-01" / "fmap"
    signal = np.stack(
        [np.asarray(nib.load(anat / f"sub-01_acq-bssfp000_flip-{i}_part-mag_VFA.nii.gz").dataobj) for i in (1, 2)],
        axis=-1,
    ).astype(float)
    r1 = np.asarray(nib.load(out / "sub-01" / "anat" / "sub-01_R1map.nii.gz").dataobj, dtype=float)
    b1 = np.asarray(nib.load(fmap / "sub-01_TB1map.nii.gz").dataobj, dtype=float) / 100.0
    fitted = mask & np.isfinite(r1) & (r1 > 0) & np.isfinite(b1)
    result = fit_despot2(
        np.where(fitted[..., None], signal, 0.0),
        np.deg2rad([15.0, 50.0]),
        0.005,
        np.where(fitted, r1, 1.0),
        b1=np.where(fitted, b1, 1.0),
        mask=fitted,
    )
    return np.where(fitted, result.r2, np.nan)


@pytest.mark.slow
def test_r2_on_the_phantom(tmp_path):
    """2 mm simulated at 1 mm (oversample 2), noiseless, ideal spoiling, B1+ from AFI.

    Measured (this phantom, 2 mm): interior median |error| of R2 0.04-0.08 % in WM, cortex, nuclei
    and the lesion stages with an interior (early/late active, chronic active core, chronic
    inactive); off-resonance median |error| 0.007 Hz. One phase cycle (0 deg) without band removal:
    40-50 % (DESPOT2 on one cycle's magnitude, which is not the band-free signal even on resonance).
    The test asserts under 2 % in white matter, cortex, each nucleus and each lesion stage with an
    interior, and a one-cycle error five times larger in WM.
    """
    raw = write_phantom_dataset(
        tmp_path / "raw",
        resolution=2.0,
        snr=float("inf"),
        subjects=1,
        seed=11,
        protocol=Protocol(rb1cor=None, spoiling="ideal"),
        oversample=2,
    )
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "work"),
         "--skip-bids-validation", "--no-spoiling-correction"]
    )  # fmt: skip
    assert code == 0
    anat = out / "sub-01" / "anat"
    for name in ("R2map", "T2map", "desc-stderr_R2map"):
        assert (anat / f"sub-01_{name}.nii.gz").exists()
    offresonance = out / "sub-01" / "fmap" / "sub-01_desc-offresonance_fieldmap.nii.gz"
    mask = np.asarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0

    by_name = _rows(raw, anat / "sub-01_R2map.nii.gz", mask, "geometric solution, nonlinear DESPOT2")
    assert set(TISSUES) <= set(by_name), f"regions without an interior: {set(TISSUES) - set(by_name)}"
    for name, row in by_name.items():
        if name in TISSUES or name in LESIONS:
            assert row.interior_median_abs < 0.02, (
                f"{row.name}: median |relative R2 error| {row.interior_median_abs:.2%} in {row.interior_voxels} voxels"
            )

    # The off-resonance map: the phantom's total field modulo 1/TR (200 Hz)
    field = np.asarray(nib.load(offresonance).dataobj, dtype=float)
    truth_ppm = raw / "derivatives" / "phantom" / "sub-01" / "fmap" / "sub-01_desc-total_fieldmap.nii.gz"
    truth_hz = ppm_to_hz(np.asarray(nib.load(truth_ppm).dataobj, dtype=float), 3.0)
    wrapped = np.angle(np.exp(2j * np.pi * (field - truth_hz) * 0.005)) / (2 * np.pi * 0.005)
    interior = mask & np.isfinite(field)
    print(f"off-resonance: median |error| {np.median(np.abs(wrapped[interior])):.3f} Hz in the brain mask")
    assert np.all(np.abs(field[interior]) <= 100.0 + 1e-3)
    assert np.median(np.abs(wrapped[interior])) < 1.0

    # One phase cycle: the bands move R2 by far more than the geometric solution's error
    one = _rows(raw, _one_cycle_r2(raw, out, mask), mask, "one phase cycle (0 deg), no band removal")
    assert one["WM"].interior_median_abs > 5 * by_name["WM"].interior_median_abs


def test_r2_memory_estimate_covers_the_measured_peaks(tmp_path):
    from qmri_workflows.workflows.r2 import estimate_r2_mem_gb
    from tests.bids_factory import write_image

    head = write_image(tmp_path / "head.nii", np.zeros((191, 227, 201), np.float32))
    # Peaks measured on this grid, 2 flip angles x 4 cycles, 2 threads (benchmarks/bench_nodes.py on
    # the 1 mm phantom, GB): band-free 1.14, DESPOT2 0.96; the ellipse fit 1.3 (bench_r2.py).
    geometric = estimate_r2_mem_gb(head, head, 4, 2, n_threads=2)
    assert 1.14 < geometric["band_free"] < 1.14 * 1.5 and 0.96 < geometric["fit"] < 0.96 * 1.5
    ellipse = estimate_r2_mem_gb(head, head, 4, 2, combination="ellipse", n_threads=2)
    assert 1.3 < ellipse["band_free"] < 1.3 * 1.5
    # eight cycles hold twice the stacks of one flip angle
    assert estimate_r2_mem_gb(head, head, 8, 2)["band_free"] > geometric["band_free"]
