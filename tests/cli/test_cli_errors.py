"""BIDS-App conventions of the command line: exit codes and messages for bad calls."""

import json
import subprocess
import sys

import pytest

from qmri_workflows import __version__
from qmri_workflows.cli import run


def _raw_dataset(root):
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    return root


def test_version_and_help():
    out = subprocess.run([sys.executable, "-m", "qmri_workflows.cli.run", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert __version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "qmri_workflows.cli.run", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in (
        "--participant-label",
        "--work-dir",
        "--nprocs",
        "--mem-gb",
        "--plugin",
        "--plugin-config",
        "--skip-bids-validation",
        "--session-label",
        "--derivatives",
    ):
        assert option in out.stdout


def test_usage_error_exits_64(capsys):
    with pytest.raises(SystemExit) as excinfo:
        run.main(["only-one-argument"])
    assert excinfo.value.code == run.EXIT_USAGE


def test_unknown_analysis_level_exits_17(tmp_path):
    bids = _raw_dataset(tmp_path / "raw")
    assert run.main([str(bids), str(tmp_path / "out"), "session"]) == run.EXIT_UNKNOWN_LEVEL


def test_missing_dataset_exits_66(tmp_path, caplog):
    assert run.main([str(tmp_path / "nope"), str(tmp_path / "out"), "participant"]) == run.EXIT_NO_INPUT
    assert "dataset_description.json" in caplog.text


def test_output_inside_input_is_refused(tmp_path, caplog):
    bids = _raw_dataset(tmp_path / "raw")
    before = sorted(p.name for p in bids.rglob("*"))
    code = run.main([str(bids), str(bids / "out"), "participant", "--skip-bids-validation"])
    assert code == run.EXIT_CANNOT_CREATE
    assert "never written" in caplog.text
    assert sorted(p.name for p in bids.rglob("*")) == before


def test_absent_participant_exits_18_and_names_it(tmp_path, caplog):
    from tests.bids_factory import make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw")
    code = run.main(
        [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "--participant-label", "sub-99"]
    )
    assert code == run.EXIT_NO_SELECTION
    assert "99" in caplog.text


def test_plugin_config_is_read(tmp_path):
    yaml_file = tmp_path / "plugin.yml"
    yaml_file.write_text("plugin: MultiProc\nplugin_args:\n  n_procs: 2\n  memory_gb: 3\n")
    assert run.load_plugin_config(yaml_file) == ("MultiProc", {"n_procs": 2, "memory_gb": 3})
    bad = tmp_path / "bad.yml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="plugin"):
        run.load_plugin_config(bad)


def test_every_bad_subject_is_reported_and_the_others_are_processed(tmp_path, caplog):
    """One policy for bad subjects (issue 7): process the others, report each, exit non-zero."""
    from tests.bids_factory import edit_sidecar, make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    for subject in ("01", "03"):
        sidecar = next((bids / f"sub-{subject}" / "anat").glob("*echo-2_flip-1_part-mag_VFA.json"))
        edit_sidecar(sidecar, EchoTime=None)
    code = run.main(
        [str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    )
    assert code == run.EXIT_DATA
    for subject in ("01", "03"):
        assert f"sub-{subject}: gre unusable: sub-{subject}/anat/sub-{subject}_echo-2_flip-1" in caplog.text
        assert f"sub-{subject}: not processed: unusable gre (see above)" in caplog.text
        assert not (tmp_path / "out" / f"sub-{subject}").exists()
    assert (tmp_path / "out" / "sub-02" / "anat" / "sub-02_R2starmap.nii.gz").is_file()
    assert "sub-02: brain mask, R2*, R1, PD, QSM, regional and lesion statistics written" in caplog.text


def test_another_tools_dataset_is_never_overwritten(tmp_path, caplog):
    from tests.bids_factory import make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw")
    other = _raw_dataset(tmp_path / "other")
    (other / "dataset_description.json").write_text(
        json.dumps(
            {
                "Name": "fmriprep out",
                "BIDSVersion": "1.10.0",
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": "fMRIPrep"}],
            }
        )
    )
    before = (other / "dataset_description.json").read_text()
    code = run.main([str(bids), str(other), "participant", "--skip-bids-validation", "-w", str(tmp_path / "w")])
    assert code == run.EXIT_CANNOT_CREATE
    assert "fMRIPrep" in caplog.text
    assert (other / "dataset_description.json").read_text() == before


@pytest.mark.parametrize(
    "options",
    [["--plugin", "NoSuchPlugin"], ["--nprocs", "0"], ["--n-coils", "0"], ["--plugin-config", "/no/such.yml"]],
)
def test_bad_options_are_usage_errors_that_create_nothing(tmp_path, options):
    from tests.bids_factory import make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw")
    try:
        code = run.main(
            [
                str(bids),
                str(tmp_path / "out"),
                "participant",
                "--skip-bids-validation",
                "-w",
                str(tmp_path / "w"),
                *options,
            ]
        )
    except SystemExit as exit_:  # argparse rejects it before main returns
        code = exit_.code
    assert code == run.EXIT_USAGE
    assert not (tmp_path / "out").exists() and not (tmp_path / "w").exists()


def test_failed_selection_keeps_the_previous_provenance(tmp_path):
    from tests.bids_factory import make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    assert (
        run.main(
            [str(bids), str(out), "participant", "--skip-bids-validation", "--nprocs", "1", "-w", str(tmp_path / "w")]
        )
        == 0
    )
    description = (out / "dataset_description.json").read_text()
    code = run.main(
        [
            str(bids),
            str(out),
            "participant",
            "--skip-bids-validation",
            "--participant-label",
            "07",
            "-w",
            str(tmp_path / "w"),
        ]
    )
    assert code == run.EXIT_NO_SELECTION
    assert (out / "dataset_description.json").read_text() == description
