"""Per-subject outcomes of the App: each subject is processed or reported, never both silently."""

import html
import re

import pytest

from qmri_workflows.cli import run
from qmri_workflows.io.staging import STAGING_FOLDER
from qmri_workflows.workflows import registry
from tests.bids_factory import make_vfa_dataset
from tests.report_dataset import FAILING_MESSAGE, failing_family


def test_a_one_echo_subject_is_reported_and_the_others_processed(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    # one echo of one flip angle: nothing to compute (two flip angles of one echo would give R1)
    anat = raw / "sub-02" / "anat"
    for path in {*anat.glob("*echo-[23]_*"), *anat.glob("*flip-2*")}:
        path.unlink()
    code = run.main(
        [
            str(raw),
            str(tmp_path / "out"),
            "participant",
            "--skip-bids-validation",
            "-w",
            str(tmp_path / "work"),
            "--nprocs",
            "1",
        ]
    )
    assert code == run.EXIT_DATA
    assert "sub-02: not processed: 1 echo(es); R2* needs at least 2" in caplog.text
    assert not (tmp_path / "out" / "sub-02").exists()
    for subject in ("01", "03"):
        assert (tmp_path / "out" / f"sub-{subject}" / "anat" / f"sub-{subject}_R2starmap.nii.gz").is_file()


def test_a_subject_without_qmri_data_exits_66_when_alone(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    for path in (raw / "sub-01" / "anat").glob("*"):
        path.rename(
            path.with_name(
                path.name.replace("_VFA", "_T1w")
                .replace("_echo-", "_run-")
                .replace("_flip-", "_acq-f")
                .replace("_part-mag", "")
                .replace("_part-phase", "_rec-phase")
            )
        )
    code = run.main(
        [str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    )
    assert code == run.EXIT_NO_INPUT
    assert "no qMRI inputs for sub-01" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.fixture
def sometimes_failing_family():
    family = registry.register(failing_family("sometimesfails", "sometimes fails", desc="copy"))
    yield family
    registry.unregister(family.key)


@pytest.mark.parametrize("nprocs", ["1", "2"])
def test_a_failing_subject_publishes_nothing_and_the_others_everything(
    tmp_path, caplog, nprocs, sometimes_failing_family
):
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work"), "--nprocs", nprocs]
    )
    assert code == run.EXIT_FAILURE
    assert not (out / "sub-02").exists()
    assert not (out / STAGING_FOLDER).exists(), "the failed subject's staged files were left behind"
    for subject in ("01", "03"):
        anat = out / f"sub-{subject}" / "anat"
        assert (anat / f"sub-{subject}_desc-copy_S0map.nii.gz").is_file()
        assert (anat / f"sub-{subject}_R2starmap.nii.gz").is_file()
    assert "sub-02: FAILED in sometimesfails_wf.probe" in caplog.text
    # the failed subject's report says so, and shows the maps that finished as not published, their
    # figures embedded in the page (no file of it is in the output)
    report = (out / "sub-02.html").read_text()
    assert "FAILED" in report and "sometimesfails_wf.probe" in report and html.escape(FAILING_MESSAGE) in report
    assert "NOT PUBLISHED" in report and "R2starmap (1/s)" in report
    assert re.findall(r'<img src="([^":]*)[:"]', report) == ["data"] * report.count("<img")
    assert '<img src="sub-01/figures/' in (out / "sub-01.html").read_text()
    logs = list((out / "logs").glob("qmri-workflows_*.log"))
    assert len(logs) == 1 and "sub-02: FAILED" in logs[0].read_text()
