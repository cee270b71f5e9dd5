"""R2 from phase-cycled bSSFP in the BIDS App: outputs, and bad inputs that disable R2 only."""

import json

import pytest

from qmri_workflows.cli import run
from qmri_workflows.workflows.r2 import pulse_duration
from tests.bids_factory import edit_sidecar, make_dataset, sidecar_of

pytestmark = pytest.mark.usefixtures("cli_log")

CYCLES = (0, 90, 180, 270)


def _run(raw_root, tmp_path, *extra):
    out = tmp_path / "out"
    code = run.main(
        [str(raw_root), str(out), "participant", "--skip-bids-validation", "--nprocs", "1",
         "-w", str(tmp_path / "work"), *extra]
    )  # fmt: skip
    return code, out / "sub-01"


def _plan_line(caplog, name):
    plan = next(r.getMessage() for r in caplog.records if "plan:" in r.getMessage())
    return next(line.strip() for line in plan.splitlines() if line.strip().startswith(f"{name}:"))


def _bssfp_dataset(tmp_path, **kwargs):
    return make_dataset(tmp_path / "raw", afi=True, bssfp_increments=CYCLES, bssfp_flip_angles=(15.0, 50.0), **kwargs)


def test_complex_bssfp_gives_r2_t2_stderr_and_offresonance(tmp_path, caplog):
    raw = _bssfp_dataset(tmp_path)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    assert _plan_line(caplog, "R2").startswith("R2: yes, DESPOT2 from 4 bSSFP phase cycles (complex)")
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert r2["Units"] == "1/s" and r2["B1Correction"].startswith("B1+ map")
    assert r2["BandFreeCombination"].startswith("geometric solution")
    assert any("Xiang" in reference for reference in r2["EstimationReference"])
    assert any("Deoni" in reference for reference in r2["EstimationReference"])
    assert any("acq-bssfp270_flip-2_part-phase" in source for source in r2["Sources"])
    # no pulse duration anywhere: instantaneous pulses, said so
    assert r2["RFPulseDuration"] == 0 and r2["FinitePulseCorrection"].startswith("none: instantaneous")
    assert "instantaneous pulses" in _plan_line(caplog, "R2")
    assert json.loads((out / "anat" / "sub-01_T2map.json").read_text())["Units"] == "s"
    assert (out / "anat" / "sub-01_desc-stderr_R2map.nii.gz").is_file()
    field = json.loads((out / "fmap" / "sub-01_desc-offresonance_fieldmap.json").read_text())
    assert field["Units"] == "Hz" and "modulo 1/TR" in field["Description"]
    # R1's spoiling correction is refitted with this R2 map's T2, and that R1 is the one published
    r1 = json.loads((out / "anat" / "sub-01_R1map.json").read_text())
    assert r1["SpoilingCorrectionT2"] == "R2map" and r1["B1Correction"].startswith("TB1map")
    assert "refitted with the R2 map where R2 runs" in _plan_line(caplog, "R1")
    assert "R1 refitted with this R2's T2" in _plan_line(caplog, "R2")


def test_without_b1_data_r2_uses_the_b1_map_r1_estimated(tmp_path, caplog):
    """No AFI pair: R1 estimates B1+ from the VFA data and R2 (DESPOT2) uses that map as R1 does.
    R2 used to run at the nominal flip angles beside a B1-corrected R1 (3 mm phantom without AFI
    and RB1COR: R2 off by +5 to +54 % in the regions, within 3 % with the map)."""
    raw = make_dataset(tmp_path / "raw", afi=False, bssfp_increments=CYCLES, bssfp_flip_angles=(15.0, 50.0))
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    r1 = json.loads((out / "anat" / "sub-01_R1map.json").read_text())
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    # (on these few voxels the estimate fails and is a uniform 100 %: said in both sidecars)
    assert "map-free B1+ estimate" in r1["B1Correction"], r1["B1Correction"]
    assert r2["B1Correction"].startswith("B1+ map of the R1 family"), r2["B1Correction"]
    assert r2["B1Correction"].endswith(f"R1's: {r1['B1Correction']}")
    # with --no-b1-estimate neither is corrected, and R2 says why
    code, out = _run(raw.root, tmp_path / "off", "--no-b1-estimate")
    assert code == 0, caplog.text
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert r2["B1Correction"].startswith("none:") and "--no-b1-estimate" in r2["B1Correction"]


def test_missing_phase_cycle_at_one_flip_angle_disables_r2_only(tmp_path, caplog):
    raw = _bssfp_dataset(tmp_path, phase=False)
    removed = next(p for p in raw.files["bssfp"] if "bssfp270" in p.name and "flip-2" in p.name)
    removed.unlink()
    sidecar_of(removed).unlink()
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    line = _plan_line(caplog, "R2")
    assert line.startswith("R2: no, bssfp unusable: bSSFP flip angles 15 and 50 deg have different phase cycles")
    assert "acq-bssfp000_flip-2" in line and "add the missing" in line
    for name in ("R1map", "R2starmap"):
        assert (out / "anat" / f"sub-01_{name}.nii.gz").is_file()
    assert not (out / "anat" / "sub-01_R2map.nii.gz").exists()


def test_geometric_solution_without_phase_disables_r2_only(tmp_path, caplog):
    raw = _bssfp_dataset(tmp_path, phase=False)
    code, out = _run(raw.root, tmp_path, "--bssfp-combination", "geometric")
    assert code == 0, caplog.text
    line = _plan_line(caplog, "R2")
    assert line.startswith("R2: no, --bssfp-combination geometric needs the phase of every phase cycle")
    assert "acq-bssfp000_flip-1_VFA" in line and "--bssfp-combination rms" in line
    assert (out / "anat" / "sub-01_R1map.nii.gz").is_file()
    assert not (out / "anat" / "sub-01_R2map.nii.gz").exists()


def test_magnitude_only_bssfp_gets_the_joint_magnitude_fit(tmp_path, caplog):
    """Without phase, ``auto`` fits every cycle's magnitude with the off-resonance (DESPOT2-FM):
    no band-free signal, so no warning; ``rms`` stays selectable, with its warning."""
    raw = _bssfp_dataset(tmp_path, phase=False)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    line = _plan_line(caplog, "R2")
    assert line.startswith("R2: yes, DESPOT2-FM (joint fit of every cycle's magnitude with the off-resonance) from 4")
    assert "(magnitude only)" in line and "WARNING" not in line
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert r2["EstimationAlgorithm"].startswith("DESPOT2-FM on magnitude-only data")
    assert r2["BandFreeCombination"].startswith("none: every phase-cycle magnitude goes to the joint DESPOT2-FM fit")
    assert any("Deoni SCL. Transverse relaxation" in reference for reference in r2["EstimationReference"])
    assert r2["R2StandardErrorNote"].startswith("from the residuals of the joint fit (8 magnitudes")
    assert r2["FittedVoxels"] > 0 and (out / "anat" / "sub-01_desc-stderr_R2map.nii.gz").is_file()
    assert not (out / "fmap" / "sub-01_desc-offresonance_fieldmap.nii.gz").exists()

    caplog.clear()
    code, out = _run(raw.root, tmp_path / "rms", "--bssfp-combination", "rms")
    assert code == 0, caplog.text
    assert "WARNING: magnitude only, band-reduced not band-free" in _plan_line(caplog, "R2")
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert r2["BandFreeCombination"].startswith("magnitude-only data: root mean square")


def test_single_echo_vfa_with_bssfp_refits_r1_with_the_r2_map(tmp_path, caplog):
    """Single-echo VFA (no R2*): R1 starts from the tissue T2, the R2 family refits it with its T2."""
    raw = _bssfp_dataset(tmp_path, n_echoes=1, phase=False)
    code, out = _run(raw.root, tmp_path, "--bssfp-combination", "rms")
    assert code == 0, caplog.text
    assert "tissue T2 0.08 s (single echo: no R2*); refitted with the R2 map" in _plan_line(caplog, "R1")
    r1 = json.loads((out / "anat" / "sub-01_R1map.json").read_text())
    assert r1["SpoilingCorrectionT2"] == "R2map"
    assert "tissue T2 0.08 s elsewhere" in r1["SpoilingCorrectionT2Description"]
    assert (out / "anat" / "sub-01_R2map.nii.gz").is_file()


def test_pulse_duration_option_wins_over_the_sidecars(tmp_path, caplog):
    raw = _bssfp_dataset(tmp_path)
    for path in raw.files["bssfp"]:
        edit_sidecar(path, RFPulseDuration=0.001)
    code, out = _run(raw.root, tmp_path, "--bssfp-pulse-duration", "0.0008")
    assert code == 0, caplog.text
    assert "finite-pulse correction for 0.8 ms pulses" in _plan_line(caplog, "R2")
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert r2["RFPulseDuration"] == pytest.approx(0.0008)
    correction = r2["FinitePulseCorrection"]
    assert "0.8 ms (--bssfp-pulse-duration)" in correction and "off-resonance map" in correction
    assert any("finite RF pulses" in reference for reference in r2["EstimationReference"])


class _Series:
    def __init__(self, metadata, repetition_time=0.005):
        self.metadata = metadata
        self.repetition_time = repetition_time
        self.magnitude = ("sub-01_acq-bssfp000_flip-1_VFA.nii.gz",)


class _Inputs:
    def __init__(self, *metadata):
        self.bssfp = tuple(_Series(m) for m in metadata)


def test_pulse_duration_from_sidecars_and_its_errors():
    assert pulse_duration(_Inputs({}, {}), {})[0][0] == 0.0
    assert pulse_duration(_Inputs({"RFPulseDuration": 0.001}, {"RFPulseDuration": 0.001}), {}) == (
        (0.001, "sidecar RFPulseDuration"),
        None,
    )
    _, problem = pulse_duration(_Inputs({"RFPulseDuration": 0.001}, {"RFPulseDuration": 0.0005}), {})
    assert "disagree on RFPulseDuration" in problem and "--bssfp-pulse-duration" in problem
    # milliseconds by mistake, or not a number: R2 is skipped with the file and the fix
    for wrong in (1.0, "1 ms", -0.001):
        _, problem = pulse_duration(_Inputs({"RFPulseDuration": wrong}, {"RFPulseDuration": wrong}), {})
        assert "not a time in seconds" in problem and "sub-01_acq-bssfp000_flip-1_VFA" in problem
    assert pulse_duration(_Inputs({"RFPulseDuration": 1.0}), {"bssfp_pulse_duration": 0.0005})[0][0] == 0.0005


def test_pulse_duration_option_rejects_milliseconds(tmp_path, capsys):
    raw = _bssfp_dataset(tmp_path)
    with pytest.raises(SystemExit):
        _run(raw.root, tmp_path, "--bssfp-pulse-duration", "1")
    assert "RF pulse duration in seconds" in capsys.readouterr().err


@pytest.mark.parametrize(("increments", "runs"), [((0, 180), False), ((0, 120, 240), True), ((0, 90, 180), True)])
def test_despot2_fm_plan_takes_three_phase_cycles_not_two(tmp_path, increments, runs):
    """DESPOT2-FM removes no band, so the four cycles of the band-free combinations are not needed:
    three were refused with "removing the bands needs at least 4"; two stay refused, for the fit's
    own reason (a second minimum at a wrong R2)."""
    from qmri_workflows.io.query import collect_inputs, open_layout
    from qmri_workflows.workflows.registry import plan_families

    raw = make_dataset(
        tmp_path / "raw", afi=True, bssfp_increments=increments, bssfp_flip_angles=(15.0, 50.0), phase=False
    )
    plan = {p.key: p for p in plan_families(collect_inputs(open_layout(raw.root), "01"))}["r2"]
    assert plan.run is runs, plan.reason
    if runs:
        assert plan.reason.startswith(
            f"DESPOT2-FM (joint fit of every cycle's magnitude with the off-resonance) from {len(increments)}"
        )
    else:
        assert "despot2-fm needs at least 3 per flip angle" in plan.reason and "removing the bands" not in plan.reason


def _zero_outside_the_head(paths):
    """Fill the background of each image with exact zeros (as a scanner's or converter's mask does)."""
    import nibabel as nib
    import numpy as np

    for path in paths:
        image = nib.load(path)
        data = np.asarray(image.dataobj, dtype=np.float32)
        grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape[:3]], indexing="ij")
        data[sum(g**2 for g in grid) > 0.6] = 0.0
        nib.save(nib.Nifti1Image(data, image.affine, image.header), path)


def test_despot2_fm_on_a_zero_filled_background_says_the_cycles_are_raw(tmp_path, caplog):
    """Zeros around the head hold no noise, so the denoising step passes the raw phase cycles on:
    the sidecar said "the denoising step removed the noise floor" and the standard error "the phase
    cycles are denoised", both wrong."""
    raw = _bssfp_dataset(tmp_path, phase=False)
    _zero_outside_the_head(raw.files["bssfp"])
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    r2 = json.loads((out / "anat" / "sub-01_R2map.json").read_text())
    assert not r2["NoiseFloorCorrection"].startswith("none here: the denoising step"), r2["NoiseFloorCorrection"]
    assert "denoised" not in r2["R2StandardErrorNote"]
    assert r2["FittedVoxels"] > 0


def test_r2star_and_r1_on_a_zero_filled_background_know_their_images_are_raw(tmp_path, caplog):
    """The same for the GRE: without noise in the air the denoising step passes the raw echoes on.
    R2*'s non-linear fit took them for denoised and fitted them without a noise floor (its sidecar
    said "the denoised magnitudes are bias-corrected"); it now needs a noise level, as with
    --denoise none, and says what to do without one. The default (wls) runs."""
    raw = make_dataset(tmp_path / "raw", afi=True)
    _zero_outside_the_head(raw.files["gre"])
    code, _ = _run(raw.root, tmp_path, "--r2star-method", "nls")
    assert code != 0
    assert "background is zero-filled" in caplog.text and "use --r2star-method wls" in caplog.text
    caplog.clear()
    code, out = _run(raw.root, tmp_path / "wls")
    assert code == 0, caplog.text
    r2star = json.loads((out / "anat" / "sub-01_R2starmap.json").read_text())
    assert r2star["Denoising"].startswith("none: "), r2star["Denoising"]
