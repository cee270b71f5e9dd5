"""The App under real use: concurrent runs, interrupts, exit codes, logs, re-runs (issue 7)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from tests.bids_factory import make_dataset, make_vfa_dataset


def _default_interrupt():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _app(*args, cwd=None):
    # Its own process group, as a shell gives a job: Ctrl-C goes to every process of the group.
    return subprocess.Popen(
        [sys.executable, "-m", "qmri_workflows.cli.run", *map(str, args)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # A terminal's job: Ctrl-C works even when this test itself runs in the background, where
        # the shell made SIGINT ignored (and a child inherits that).
        preexec_fn=_default_interrupt,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )


def test_two_apps_at_once_with_default_work_directories(tmp_path):
    first = make_vfa_dataset(tmp_path / "A", shape=(24, 24, 16), seed=1)
    second = make_vfa_dataset(tmp_path / "B", shape=(20, 22, 14), seed=2, flip_angles=(5.0, 25.0))
    outputs = tmp_path / "p"
    apps = [
        _app(raw, outputs / name, "participant", "--skip-bids-validation", "--nprocs", "1")
        for raw, name in ((first, "outA"), (second, "outB"))
    ]
    for app in apps:
        _, stderr = app.communicate(timeout=300)
        assert app.returncode == 0, stderr[-3000:]
    work_dirs = sorted(p.name for p in (outputs / "qmri_work").iterdir())
    assert len(work_dirs) == 2 and work_dirs[0].startswith("outA-") and work_dirs[1].startswith("outB-")
    for raw, name in ((first, "outA"), (second, "outB")):
        r2star = nib.load(outputs / name / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz")
        echo = nib.load(next((raw / "sub-01" / "anat").glob("*echo-1_flip-1_part-mag*.nii.gz")))
        assert r2star.shape == echo.shape and np.allclose(r2star.affine, echo.affine)


def test_a_second_run_in_a_busy_work_directory_is_refused(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    work = tmp_path / "work"
    work.mkdir()
    import fcntl

    with open(work / ".qmri-workflows.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write("process 1 on elsewhere")
        handle.flush()
        code = run.main([str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(work)])
    assert code == run.EXIT_CANNOT_CREATE
    assert "is in use by process 1 on elsewhere" in caplog.text and "-w" in caplog.text


def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    # Large enough that the run is still going when the interrupt comes (seconds per subject).
    raw = make_vfa_dataset(
        tmp_path / "raw", subjects=("01", "02", "03", "04", "05", "06"), shape=(96, 96, 64), n_echoes=8
    )
    app = _app(raw, tmp_path / "out", "participant", "--skip-bids-validation", "--nprocs", "2", "-w", tmp_path / "work")
    deadline = time.monotonic() + 120
    # Interrupt once processing has started (the plan is printed just before).
    while time.monotonic() < deadline and not list((tmp_path / "work").rglob("brain_mask")):
        time.sleep(0.05)
    os.killpg(app.pid, signal.SIGINT)
    _, stderr = app.communicate(timeout=120)
    assert app.returncode == run.EXIT_INTERRUPTED, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert stderr.count("interrupted") == 1
    assert not (tmp_path / "out" / ".qmri-staging").exists()


def test_invalid_json_is_an_invalid_dataset_even_without_the_validator(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    next((raw / "sub-01" / "anat").glob("*.json")).write_text("{not json")
    code = run.main(
        [str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    )
    assert code in (run.EXIT_INVALID_BIDS, run.EXIT_DATA)
    assert code != run.EXIT_NO_SELECTION
    assert ".json" in caplog.text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, suffix",
    [("plugin: [MultiProc\n", ".yml"), ('{"plugin": ', ".json"), ("plugin: MultiProc\nplugin_args: 4\n", ".yml")],
)
def test_malformed_plugin_config_is_a_usage_error(tmp_path, caplog, content, suffix):
    raw = make_vfa_dataset(tmp_path / "raw")
    config = tmp_path / f"plugin{suffix}"
    config.write_text(content)
    code = run.main([str(raw), str(tmp_path / "out"), "participant", "--plugin-config", str(config)])
    assert code == run.EXIT_USAGE
    assert str(config) in caplog.text and not (tmp_path / "out").exists()


def test_work_directory_that_cannot_be_created_names_w(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = run.main(
        [str(raw), str(tmp_path / "out"), "participant", "--skip-bids-validation", "-w", str(blocker / "work")]
    )
    assert code == run.EXIT_CANNOT_CREATE
    assert "work directory" in caplog.text and "-w" in caplog.text


def test_rerun_says_what_it_replaces_and_sidecars_tell_runs_apart(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    common = [
        str(raw),
        str(out),
        "participant",
        "--skip-bids-validation",
        "-w",
        str(tmp_path / "work"),
        "--nprocs",
        "1",
    ]
    assert run.main(common) == 0
    first = json.loads((out / "sub-01" / "anat" / "sub-01_R2starmap.json").read_text())
    caplog.clear()
    assert run.main(common + ["--n-coils", "4"]) == 0
    # the maps (R2*, QSM, R1, PD), the noise map and their sidecars, and the two analysis tables with their dictionaries
    assert "sub-01: 38 file(s) from an earlier run will be replaced" in caplog.text
    second = json.loads((out / "sub-01" / "anat" / "sub-01_R2starmap.json").read_text())
    denoising = {"denoise": "multispectral", "denoise_search_radius": 2}
    assert first["EstimationParameters"] == {"r2star_method": "wls", "n_coils": 1, **denoising}
    assert second["EstimationParameters"] == {"r2star_method": "wls", "n_coils": 4, **denoising}


def test_messages_one_line_per_step_plan_summary_and_log_file(tmp_path):
    raw = make_vfa_dataset(tmp_path / "raw")

    def messages(*options, name):
        app = _app(
            raw,
            tmp_path / name,
            "participant",
            "--skip-bids-validation",
            "--nprocs",
            "1",
            "-w",
            tmp_path / f"work_{name}",
            *options,
        )
        stdout, stderr = app.communicate(timeout=300)
        assert app.returncode == 0, stderr[-2000:]
        return stdout + stderr

    default = messages(name="out")
    assert "[Node]" not in default and "nipype.workflow" not in default, "Nipype chatter without -v"
    assert default.splitlines()[0].endswith(f"checking {raw}")
    assert "R2*: yes" in default and "fit_r2star done in" in default and "summary:" in default
    assert len(default.splitlines()) < 40
    logs = list((tmp_path / "out" / "logs").glob("*.log"))
    assert len(logs) == 1 and "fit_r2star done in" in logs[0].read_text()

    # -q keeps warnings and errors only (this synthetic head has no tissue for PD's calibration)
    quiet = messages("-q", name="quiet").strip().splitlines()
    assert all(" WARNING: " in line or " ERROR: " in line for line in quiet), quiet
    assert not any("done in" in line or "summary" in line for line in quiet)
    assert "[Node]" in messages("-v", name="verbose")


def test_validator_findings_are_grouped_by_key(tmp_path, caplog):
    raw = make_dataset(tmp_path / "raw", sidecar_style="dcm2niix").root
    if run.run_validator(raw) is None:
        pytest.skip("bids-validator-deno is not installed")
    code = run.main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "work")])
    assert code == run.EXIT_INVALID_BIDS
    assert "SIDECAR_KEY_REQUIRED 'PulseSequenceType'" in caplog.text
    assert "SIDECAR_KEY_REQUIRED 'RepetitionTimeExcitation'" in caplog.text
    line = next(line for line in caplog.text.splitlines() if "'PulseSequenceType'" in line)
    assert "12 file(s)" in line and "and 9 more" in line


def test_group_validator_errors_names_codes_keys_and_counts():
    report = {
        "issues": {
            "issues": [
                {
                    "code": "SIDECAR_KEY_REQUIRED",
                    "subCode": "EchoTime",
                    "severity": "error",
                    "location": f"/sub-01/anat/sub-01_echo-{i}_MEGRE.nii.gz",
                }
                for i in range(1, 6)
            ]
            + [
                {"code": "README_FILE_MISSING", "severity": "warning", "location": "/README"},
                {"code": "JSON_INVALID", "severity": "error", "location": "/sub-01/anat/x.json"},
            ],
            "codeMessages": {
                "SIDECAR_KEY_REQUIRED": "A data file's JSON sidecar is missing a key listed as required.\n"
            },
        }
    }
    lines = run.group_validator_errors(report, files_per_group=2)
    assert lines == [
        "SIDECAR_KEY_REQUIRED 'EchoTime' (A data file's JSON sidecar is missing a key listed as required): "
        "5 file(s): sub-01/anat/sub-01_echo-1_MEGRE.nii.gz, sub-01/anat/sub-01_echo-2_MEGRE.nii.gz and 3 more",
        "JSON_INVALID: 1 file(s): sub-01/anat/x.json",
    ]
