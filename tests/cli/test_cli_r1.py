"""B1+ and R1 in the BIDS App: bad inputs get one clear message and the other maps go on."""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from tests.bids_factory import edit_sidecar, make_dataset, make_derivatives, write_image, write_sidecar

# the CLI logs through its own handler: listen on it (tests/cli/conftest.py)
pytestmark = pytest.mark.usefixtures("cli_log")


def _run(raw_root, tmp_path, *extra):
    out = tmp_path / "out"
    code = run.main(
        [
            str(raw_root),
            str(out),
            "participant",
            "--skip-bids-validation",
            "--nprocs",
            "1",
            "-w",
            str(tmp_path / "work"),
            *extra,
        ]
    )
    return code, out / "sub-01"


def _plan_line(caplog, name):
    plan = next(r.getMessage() for r in caplog.records if "plan:" in r.getMessage())
    return next(line.strip() for line in plan.splitlines() if line.strip().startswith(f"{name}:"))


def _sidecar(path):
    return json.loads(path.read_text())


def test_afi_pair_gives_a_tb1map_and_corrected_r1(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", afi=True, phase=False)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    assert _plan_line(caplog, "B1+").startswith("B1+: yes, AFI pair")
    tb1map = _sidecar(out / "fmap" / "sub-01_TB1map.json")
    assert tb1map["Units"] == "percent" and any("TB1AFI" in source for source in tb1map["Sources"])
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["Units"] == "1/s" and r1["B1Correction"].startswith("TB1map (AFI pair, flip")
    assert r1["SpoilingRFPhaseIncrementSource"] == "SpoilingRFPhaseIncrement 50 deg (sidecar)"
    for name in ("T1map", "M0map", "desc-stderr_R1map"):
        assert (out / "anat" / f"sub-01_{name}.nii.gz").is_file()
    assert "no map of this version uses them" not in caplog.text


def test_one_flip_angle_disables_r1_only(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", flip_angles=(20.0,), phase=False)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    assert _plan_line(caplog, "R1") == "R1: no, 1 flip angle(s); R1 needs at least 2 different ones"
    assert (out / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    assert not (out / "anat" / "sub-01_R1map.nii.gz").exists()


def test_afi_with_equal_trs_disables_b1_only_and_r1_runs_uncorrected(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", afi=True, phase=False)
    _, tr2 = raw.files["afi"]
    edit_sidecar(tr2, RepetitionTimeExcitation=0.02)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: no, afi unusable: AFI pair with TR2 <= TR1") and tr2.name in b1_line
    r1_line = _plan_line(caplog, "R1")
    assert r1_line.startswith("R1: yes") and "B1+ estimated from the VFA data" in r1_line
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert "afi unusable: AFI pair with TR2 <= TR1" in r1["B1Correction"]
    assert not (out / "fmap").exists()


def test_no_spoiling_increment_and_no_manufacturer_runs_uncorrected_with_a_warning(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    for path in raw.files["gre"]:
        edit_sidecar(path, SpoilingRFPhaseIncrement=None, Manufacturer=None)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    assert "WARNING: no spoiling correction" in _plan_line(caplog, "R1")
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["SpoilingCorrection"] == "none" and r1["SpoilingRFPhaseIncrementUsed"] is None
    assert 'add "SpoilingRFPhaseIncrement"' in r1["SpoilingRFPhaseIncrementSource"]
    assert "--no-spoiling-correction" in r1["SpoilingRFPhaseIncrementSource"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "R1:" in r.getMessage()]
    assert any("SpoilingRFPhaseIncrement" in message for message in warnings)


def test_manufacturer_default_increment_is_used_and_named(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    for path in raw.files["gre"]:
        edit_sidecar(path, SpoilingRFPhaseIncrement=None, Manufacturer="Philips")
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["SpoilingRFPhaseIncrementUsed"] == 150.0
    assert "default of Manufacturer 'Philips'" in r1["SpoilingRFPhaseIncrementSource"]


def test_flip_angles_and_increment_written_as_strings(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", flip_angles=(4.0, 20.0), phase=False)
    for path in raw.files["gre"]:
        flip = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())["FlipAngle"]
        edit_sidecar(path, FlipAngle=f"{flip:g}", SpoilingRFPhaseIncrement="117")
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["FlipAngle"] == [4.0, 20.0] and r1["SpoilingRFPhaseIncrementUsed"] == 117.0


def test_unsupported_b1_collection_is_named_and_r1_runs_uncorrected(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    for label in ("anat", "famp"):  # a TB1EPI of another kind of scan
        path = write_image(raw.root / "sub-01" / "fmap" / f"sub-01_acq-{label}_TB1EPI.nii.gz")
        write_sidecar(path, {"FlipAngle": 8.0, "RepetitionTime": 5.0})
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: no, transmit-field data of a kind this version cannot process")
    assert "sub-01_acq-anat_TB1EPI.nii.gz" in b1_line
    assert "B1+ estimated from the VFA data" in _plan_line(caplog, "R1")
    assert "cannot process" in _sidecar(out / "anat" / "sub-01_R1map.json")["B1Correction"]


def test_body_coil_image_on_another_grid_leaves_r1_alone(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", receive=True, phase=False)
    _, body = raw.files["receive"]
    shifted = np.diag([3.0, 3.0, 3.0, 1.0])
    write_image(body, shape=(4, 4, 3), affine=shifted)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    receive = [m for m in warnings if m.startswith("sub-01: receive unusable:")]
    assert len(receive) == 1 and body.name in receive[0]
    assert (out / "anat" / "sub-01_R1map.nii.gz").is_file()


@pytest.mark.parametrize(
    ("units", "stored", "expected"), [("p.u.", 95.0, 95.0), ("ratio", 0.9, 90.0), (None, 0.9, 90.0)]
)
def test_derivative_tb1map_is_read_by_its_units(tmp_path, caplog, units, stored, expected):
    raw = make_dataset(tmp_path / "raw", phase=False, afi=True)
    derivatives = make_derivatives(
        tmp_path / "deriv", tb1map_units=units, dseg=False, lesion_mask=False, brain_mask=False
    )
    path = derivatives.files["tb1map"][0]
    write_image(path, np.full(nib.load(path).shape, stored), affine=nib.load(path).affine)
    code, out = _run(raw.root, tmp_path, "--derivatives", str(derivatives.root))
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert "used instead of the AFI pair" in b1_line
    # how the values were read, in the plan and in R1's sidecar
    read = "read as a ratio (1 = nominal)" if units is None else f'Units "{units}"'
    assert read in b1_line and read in _sidecar(out / "anat" / "sub-01_R1map.json")["B1Correction"]
    # the user's map is used, not republished
    assert not (out / "fmap").exists()
    b1_used = list((tmp_path / "work").rglob("B1ratio.nii"))
    assert len(b1_used) == 1
    values = nib.load(b1_used[0]).get_fdata()
    assert np.allclose(values[np.isfinite(values)], expected / 100, rtol=1e-5)


def test_derivative_tb1map_with_ambiguous_values_is_refused_and_r1_goes_on(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    derivatives = make_derivatives(
        tmp_path / "deriv", tb1map_units=None, dseg=False, lesion_mask=False, brain_mask=False
    )
    path = derivatives.files["tb1map"][0]
    write_image(path, np.full(nib.load(path).shape, 9.0), affine=nib.load(path).affine)
    code, out = _run(raw.root, tmp_path, "--derivatives", str(derivatives.root))
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: no, TB1map unusable:") and "neither a ratio" in b1_line
    assert path.name in b1_line and '"Units"' in b1_line
    assert _sidecar(out / "anat" / "sub-01_R1map.json")["B1Correction"].startswith("none: TB1map unusable")


def test_no_b1_correction_option(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", afi=True, phase=False)
    code, out = _run(raw.root, tmp_path, "--no-b1-correction", "--r1-method", "nonlinear")
    assert code == 0, caplog.text
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["B1Correction"] == "none: turned off (--no-b1-correction); nominal flip angles assumed"
    assert r1["EstimationParameters"]["r1_method"] == "nonlinear" and "non-linear" in r1["EstimationAlgorithm"]


def test_no_spoiling_correction_option_in_plan_and_sidecar(tmp_path, caplog):
    """--no-spoiling-correction is said in the plan and recorded in the sidecar; by default the plan and
    the sidecar say which T2 the correction uses, and the R1 standard error is finite with two angles."""
    raw = make_dataset(tmp_path / "raw", phase=False)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    line = _plan_line(caplog, "R1")
    assert "spoiling corrected (increment SpoilingRFPhaseIncrement 50 deg" in line and "inferred from R2*" in line
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["SpoilingCorrectionT2"] == "r2star" and "Gelman" in r1["SpoilingCorrectionT2Description"]
    assert "intercepts" in r1["R1StandardErrorSource"]
    anat = out / "anat"
    stderr = np.asarray(nib.load(anat / "sub-01_desc-stderr_R1map.nii.gz").dataobj)
    mask = np.asarray(nib.load(anat / "sub-01_desc-brain_mask.nii.gz").dataobj) > 0
    r1_map = np.asarray(nib.load(anat / "sub-01_R1map.nii.gz").dataobj)
    fitted = mask & np.isfinite(r1_map)
    assert np.mean(np.isfinite(stderr[fitted])) > 0.99 and np.all(stderr[fitted & np.isfinite(stderr)] > 0)

    caplog.clear()
    code, out = _run(raw.root, tmp_path / "off", "--no-spoiling-correction")
    assert code == 0, caplog.text
    line = _plan_line(caplog, "R1")
    assert "no spoiling correction (--no-spoiling-correction)" in line and "increment" not in line
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["SpoilingCorrection"] == "none" and r1["SpoilingRFPhaseIncrementUsed"] is None
    assert r1["SpoilingRFPhaseIncrementSource"] == "none: turned off (--no-spoiling-correction)"
    assert "SpoilingCorrectionT2" not in r1
    assert r1["EstimationParameters"]["r1_no_spoiling_correction"] is True


def _raw_tb1map(raw, label=None, value=0.9, units="ratio"):
    """A pre-computed B1+ map in the raw dataset's fmap (as a scanner or another site exports it)."""
    name = "sub-01" + (f"_acq-{label}" if label else "") + "_TB1map.nii.gz"
    gre = nib.load(raw.files["gre"][0])
    # twice the GRE's voxel size, over a little more than its field of view
    affine = gre.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] -= gre.affine[:3, :3] @ np.ones(3)
    shape = tuple(n // 2 + 2 for n in gre.shape[:3])
    path = write_image(raw.root / "sub-01" / "fmap" / name, np.full(shape, value), shape=shape, affine=affine)
    write_sidecar(path, {"Units": units} if units else {})
    return path


def test_raw_tb1map_in_fmap_corrects_r1(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    path = _raw_tb1map(raw)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: yes, TB1map pre-computed in the raw dataset's fmap") and path.name in b1_line
    assert "B1+ from the TB1map" in _plan_line(caplog, "R1")
    (b1_used,) = (tmp_path / "work").rglob("B1ratio.nii")  # on the map grid (the map's own is coarser)
    values = nib.load(b1_used).get_fdata()
    assert np.allclose(values[np.isfinite(values) & (values > 0)], 0.9, rtol=1e-5)
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert r1["B1Correction"].startswith("TB1map (TB1map pre-computed in the raw dataset's fmap")
    assert "bids:raw:sub-01/fmap/sub-01_TB1map.nii.gz" in r1["Sources"]
    assert not (out / "fmap").exists()  # the user's map is used, not republished


def test_raw_tb1map_gives_way_to_an_afi_pair_and_to_a_derivatives_map(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False, afi=True)
    path = _raw_tb1map(raw)
    code, _ = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: yes, AFI pair") and f"{path} is not used" in b1_line

    caplog.clear()
    derivatives = make_derivatives(tmp_path / "deriv", dseg=False, lesion_mask=False, brain_mask=False)
    code = run.main(
        [str(raw.root), str(tmp_path / "out2"), "participant", "--skip-bids-validation", "--nprocs", "1",
         "-w", str(tmp_path / "work2"), "--derivatives", str(derivatives.root)]
    )  # fmt: skip
    assert code == 0, caplog.text
    assert _plan_line(caplog, "B1+").startswith("B1+: yes, TB1map given with --derivatives")
    assert f"sub-01/fmap/{path.name} not used: the TB1map given with --derivatives is" in caplog.text


@pytest.mark.parametrize("problem", ["two maps", "unknown units"])
def test_unusable_raw_tb1map_is_named_and_r1_estimates_b1(tmp_path, caplog, problem):
    raw = make_dataset(tmp_path / "raw", phase=False)
    if problem == "two maps":
        _raw_tb1map(raw, "scanner")
        _raw_tb1map(raw, "site")
        expected = "several pre-computed B1+ maps in fmap"
    else:
        _raw_tb1map(raw, units="Tesla")
        expected = "TB1map \"Units\" is 'Tesla'"
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: no, TB1map unusable:") and expected in b1_line
    assert "B1+ estimated from the VFA data" in _plan_line(caplog, "R1")


def _raw_tfl(raw, *, flip_angle=8.0, b1=0.9):
    """A Siemens tfl_b1map (famp: 10 x the actual 80 deg preparation angle, integers; and its
    reference) on a grid twice as coarse as the GRE's, as the scanner exports it."""
    gre = nib.load(raw.files["gre"][0])
    affine = gre.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] -= gre.affine[:3, :3] @ np.ones(3)
    shape = tuple(n // 2 + 2 for n in gre.shape[:3])
    paths = {}
    for label, data, dtype in (("famp", np.full(shape, 10 * 80 * b1), np.uint16), ("anat", None, np.float32)):
        paths[label] = write_image(
            raw.root / "sub-01" / "fmap" / f"sub-01_acq-{label}_TB1TFL.nii.gz",
            data,
            shape=shape,
            affine=affine,
            dtype=dtype,
        )
        write_sidecar(paths[label], {"FlipAngle": flip_angle, "RepetitionTime": 5.0})
    return paths


def test_tfl_b1map_corrects_r1_with_the_preparation_angle_given(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    paths = _raw_tfl(raw)
    _raw_tb1map(raw, value=0.5)  # below the tfl_b1map in precedence
    code, out = _run(raw.root, tmp_path, "--tb1tfl-prep-angle", "80")
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: yes, Siemens tfl_b1map (famp / 10 / 80 deg, angle from --tb1tfl-prep-angle)")
    assert "sub-01_TB1map.nii.gz is not used" in b1_line
    assert "B1+ from the Siemens tfl_b1map" in _plan_line(caplog, "R1")
    (b1_used,) = (tmp_path / "work").rglob("B1ratio.nii")  # on the map grid (the famp's is coarser)
    values = nib.load(b1_used).get_fdata()
    assert np.allclose(values[np.isfinite(values) & (values > 0)], 0.9, rtol=1e-5)
    tb1map = _sidecar(out / "fmap" / "sub-01_TB1map.json")
    sources = [f"bids:raw:sub-01/fmap/{paths[label].name}" for label in ("famp", "anat")]
    assert tb1map["Units"] == "percent" and tb1map["Sources"] == sources
    assert tb1map["EstimationAlgorithm"].startswith("Siemens tfl_b1map")
    r1 = _sidecar(out / "anat" / "sub-01_R1map.json")
    assert "Siemens tfl_b1map (famp / 10 / 80 deg, angle from --tb1tfl-prep-angle)" in r1["B1Correction"]
    assert set(sources) <= set(r1["Sources"])


def test_tfl_b1map_with_a_readout_angle_is_refused_with_the_fix(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", phase=False)
    paths = _raw_tfl(raw, flip_angle=8.0)
    code, out = _run(raw.root, tmp_path)
    assert code == 0, caplog.text
    b1_line = _plan_line(caplog, "B1+")
    assert b1_line.startswith("B1+: no, tfl unusable:") and paths["famp"].name in b1_line
    assert "give it with --tb1tfl-prep-angle DEG" in b1_line and "commonly 80 or 90 deg" in b1_line
    assert "B1+ estimated from the VFA data" in _plan_line(caplog, "R1")
    assert "--tb1tfl-prep-angle" in _sidecar(out / "anat" / "sub-01_R1map.json")["B1Correction"]


def test_tfl_prep_angle_option_takes_a_preparation_angle(capsys):
    with pytest.raises(SystemExit):
        run.main(["in", "out", "participant", "--tb1tfl-prep-angle", "8"])
    assert "a preparation flip angle in degrees (30-180, commonly 80 or 90), got 8" in capsys.readouterr().err
