"""A broken collection is left out with a warning; the maps the rest supports are still made."""

import json

import pytest

from qmri_workflows.cli import run
from tests.bids_factory import edit_sidecar, make_dataset, make_derivatives

# the CLI logs through its own handler: listen on it (tests/cli/conftest.py)
pytestmark = pytest.mark.usefixtures("cli_log")


def test_broken_afi_pair_does_not_stop_r2star(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", afi=True, phase=False)
    _, tr2 = raw.files["afi"]
    edit_sidecar(tr2, FlipAngle=55.0)
    derivatives = make_derivatives(tmp_path / "deriv")
    out = tmp_path / "out"
    code = run.main(
        [
            str(raw.root),
            str(out),
            "participant",
            "--skip-bids-validation",
            "--nprocs",
            "1",
            "-w",
            str(tmp_path / "work"),
            "--derivatives",
            str(derivatives.root),
        ]
    )
    assert code == 0, caplog.text
    assert (out / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    afi = [m for m in warnings if m.startswith("sub-01: afi unusable:")]
    assert len(afi) == 1 and tr2.name in afi[0] and "different flip angles" in afi[0]


def test_subject_without_gre_or_bssfp_exits_65(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", subjects=("01", "02"), afi=True)
    for path in raw.files["gre"]:
        if "sub-02" in path.name:
            edit_sidecar(path, EchoTime=None)
    code = run.main(
        [str(raw.root), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    )
    assert code == run.EXIT_DATA
    assert "sub-02: gre unusable:" in caplog.text and "sub-02: not processed" in caplog.text
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    assert not (tmp_path / "out" / "sub-02").exists()


def test_bad_derivatives_dataset_exits_65_before_writing(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw")
    other_raw = make_dataset(tmp_path / "other")
    code = run.main(
        [
            str(raw.root),
            str(tmp_path / "out"),
            "participant",
            "--skip-bids-validation",
            "-w",
            str(tmp_path / "work"),
            "--derivatives",
            str(other_raw.root),
        ]
    )
    assert code == run.EXIT_DATA
    assert "is not a BIDS derivatives dataset" in caplog.text and str(other_raw.root) in caplog.text
    assert json.loads((other_raw.root / "dataset_description.json").read_text())["DatasetType"] == "raw"
    assert not (tmp_path / "out").exists()


def _run_mpm(raw, tmp_path, *extra):
    out = tmp_path / "out"
    code = run.main(
        [str(raw.root), str(out), "participant", "--skip-bids-validation", "--nprocs", "1",
         "-w", str(tmp_path / "work"), *extra]
    )  # fmt: skip
    return code, out / "sub-01" / "anat"


def test_mpm_collection_gives_r1_pd_and_mtsat(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", gre="MPM", flip_angles=(6.0, 21.0), n_echoes=3, phase=False, receive=True)
    code, anat = _run_mpm(raw, tmp_path)
    assert code == 0, caplog.text
    for suffix in ("R2starmap", "R1map", "PDmap", "MTsat"):
        assert (anat / f"sub-01_{suffix}.nii.gz").is_file(), suffix
    sidecar = json.loads((anat / "sub-01_MTsat.json").read_text())
    assert sidecar["Units"] == "p.u."
    assert "Helms" in sidecar["EstimationAlgorithm"] and "Helms" in sidecar["EstimationReference"]
    assert sidecar["B1Correction"].startswith("Helms' empirical correction")
    assert any("acq-MTw" in source for source in sidecar["Sources"])
    assert any("acq-PDw" in source for source in sidecar["Sources"])
    pd_sidecar = json.loads((anat / "sub-01_PDmap.json").read_text())
    assert any("acq-headPDw" in source for source in pd_sidecar["Sources"])


def test_mpm_mtsat_without_b1_correction(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", gre="MPM", flip_angles=(6.0, 21.0), n_echoes=3, phase=False)
    code, anat = _run_mpm(raw, tmp_path, "--no-b1-correction")
    assert code == 0, caplog.text
    sidecar = json.loads((anat / "sub-01_MTsat.json").read_text())
    assert sidecar["B1Correction"].startswith("none (turned off (--no-b1-correction))")


def test_broken_mt_contrast_does_not_stop_r1(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", gre="MPM", flip_angles=(6.0, 21.0), n_echoes=3, phase=False)
    missing = next(path for path in raw.files["mt"] if "echo-2" in path.name)
    missing.unlink()
    code, anat = _run_mpm(raw, tmp_path)
    assert code == 0, caplog.text
    assert (anat / "sub-01_R1map.nii.gz").is_file()
    assert not (anat / "sub-01_MTsat.nii.gz").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    mt = [m for m in warnings if m.startswith("sub-01: mt unusable:")]
    assert len(mt) == 1 and "echo(es) 2 missing" in mt[0] and "acq-MTw" in mt[0]
    assert "MTsat: no, MT-weighted (mt-on) images unusable: echo(es) 2 missing" in caplog.text


def test_single_echo_mpm_mtsat_from_the_images(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", gre="MPM", flip_angles=(6.0, 21.0), n_echoes=1, phase=False)
    code, anat = _run_mpm(raw, tmp_path)
    assert code == 0, caplog.text
    assert not (anat / "sub-01_R2starmap.nii.gz").exists()
    sidecar = json.loads((anat / "sub-01_MTsat.json").read_text())
    assert sidecar["MTwSignal"].startswith("first echo of each contrast")
