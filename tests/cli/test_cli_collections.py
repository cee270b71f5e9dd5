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
