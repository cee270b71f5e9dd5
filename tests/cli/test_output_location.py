"""Where the App may write: outside BIDS_DIR, or in BIDS_DIR/derivatives/<name> (fMRIPrep's layout).

The raw part of the input is never written to; pybids and the BIDS validator leave ``derivatives/``
out of the raw dataset, so a re-run reads the same inputs and the dataset stays valid.
"""

import logging

import pytest

from qmri_workflows.cli import run
from qmri_workflows.io.query import open_layout
from qmri_workflows.workflows import registry
from tests.bids_factory import file_tree, make_vfa_dataset
from tests.report_dataset import failing_family


def _raw_part(tree):
    return {path: digest for path, digest in tree.items() if path.split("/")[0] != "derivatives"}


def test_output_in_the_inputs_derivatives_leaves_every_raw_file_byte_identical(tmp_path, caplog, monkeypatch):
    raw = make_vfa_dataset(tmp_path / "raw")
    before = file_tree(raw)
    out = raw / "derivatives" / "qmri"
    monkeypatch.chdir(tmp_path)  # the default work directory goes here, not beside the output
    call = [str(raw), str(out), "participant", "--nprocs", "1"]
    assert run.main([*call, "--skip-bids-validation"]) == 0, caplog.text
    assert (out / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    assert (out / "dataset_description.json").is_file()
    assert sorted(path.name for path in (raw / "derivatives").iterdir()) == ["qmri"]
    assert (tmp_path / "qmri_work").is_dir()
    assert _raw_part(file_tree(raw)) == before

    # a re-run indexes the raw data only, and the validator (when installed) passes with the
    # derivatives inside the dataset
    assert not [name for name in open_layout(raw).get(return_type="filename") if "derivatives" in name]
    caplog.clear()
    assert run.main(call) == 0, caplog.text
    assert "validator found errors" not in caplog.text
    assert _raw_part(file_tree(raw)) == before


@pytest.mark.parametrize(
    "where, expected",
    [
        ("raw", "is the root of the raw BIDS dataset"),
        ("raw/derivatives", "is inside the raw BIDS dataset"),
        ("raw/sub-01/qmri", "is inside the raw BIDS dataset"),
        ("raw/code/qmri", "is inside the raw BIDS dataset"),
        (".", "holds the input dataset"),
    ],
)
def test_output_in_the_raw_part_or_holding_it_is_refused_with_one_message(tmp_path, caplog, where, expected):
    raw = make_vfa_dataset(tmp_path / "raw")
    before = file_tree(tmp_path)
    code = run.main([str(raw), str(tmp_path / where), "participant", "--skip-bids-validation"])
    assert code == run.EXIT_CANNOT_CREATE
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and expected in errors[0], errors
    assert f"{raw}/derivatives/<pipeline-name>" in errors[0]
    assert file_tree(tmp_path) == before  # nothing created: no output, no work directory


def test_work_directory_in_the_raw_part_is_refused(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    before = file_tree(tmp_path)
    code = run.main([str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(raw / "work")])
    assert code == run.EXIT_CANNOT_CREATE
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"the work directory {raw / 'work'} is inside"), errors
    assert "-w" in errors[0]
    assert file_tree(tmp_path) == before


@pytest.fixture
def failing_for_subject_02():
    family = registry.register(failing_family("alwaysfails", "fails for sub-02"))
    yield family
    registry.unregister(family.key)


def test_a_run_that_publishes_nothing_leaves_no_derivatives_folder(tmp_path, failing_for_subject_02):
    """The derivatives/ folder made for the output goes with it: the dataset is as it was."""
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("02",))
    before = file_tree(raw)
    out = raw / "derivatives" / "qmri"
    code = run.main([str(raw), str(out), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")])
    assert code == run.EXIT_FAILURE
    assert file_tree(raw) == before
