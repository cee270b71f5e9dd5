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
    out = subprocess.run(
        [sys.executable, "-m", "qmri_workflows.cli.run", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert __version__ in out.stdout
    out = subprocess.run(
        [sys.executable, "-m", "qmri_workflows.cli.run", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for option in ("--participant-label", "--work-dir", "--nprocs", "--mem-gb", "--plugin",
                   "--plugin-config", "--skip-bids-validation", "--session-label"):
        assert option in out.stdout


def test_usage_error_exits_64(capsys):
    with pytest.raises(SystemExit) as excinfo:
        run.main(["only-one-argument"])
    assert excinfo.value.code == run.EXIT_USAGE


def test_unknown_analysis_level_exits_17(tmp_path):
    bids = _raw_dataset(tmp_path / "raw")
    assert run.main([str(bids), str(tmp_path / "out"), "group"]) == run.EXIT_UNKNOWN_LEVEL


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
    code = run.main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                     "--participant-label", "sub-99"])
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


def test_every_bad_subject_is_reported_before_processing(tmp_path, caplog):
    from tests.bids_factory import edit_sidecar, make_vfa_dataset

    bids = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02", "03"))
    for subject in ("01", "03"):
        sidecar = next((bids / f"sub-{subject}" / "anat").glob("*echo-2_flip-1_part-mag_VFA.json"))
        edit_sidecar(sidecar, EchoTime=None)
    code = run.main([str(bids), str(tmp_path / "out"), "participant", "--skip-bids-validation",
                     "-w", str(tmp_path / "work")])
    assert code == run.EXIT_DATA
    assert "sub-01_echo-2_flip-1_part-mag_VFA" in caplog.text
    assert "sub-03_echo-2_flip-1_part-mag_VFA" in caplog.text
    assert "2 of 3 subject(s)" in caplog.text
    assert not (tmp_path / "out" / "sub-02").exists()
