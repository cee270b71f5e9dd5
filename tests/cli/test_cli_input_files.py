"""The App on input files as users store them: below odd folder names, or damaged by a bad copy."""

import logging
import re

import pytest

from qmri_workflows.cli import run
from tests.bids_factory import DAMAGE_KINDS, DAMAGE_MESSAGES, damage_image, file_tree, make_dataset


def test_dataset_below_folders_named_like_bids_ones(tmp_path, caplog):
    # As after `git clone ... /somewhere/perf/m`: every parent name pybids could read as an entity.
    raw = make_dataset(tmp_path / "perf" / "anat" / "sub-x" / "ses-y" / "m" / "raw", phase=False, afi=True)
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
        ]
    )
    assert code == 0, caplog.text
    assert (out / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    assert not (out / "sub-x").exists()


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_gre_echo_stops_before_anything_is_written(tmp_path, caplog, kind):
    raw = make_dataset(tmp_path / "raw", phase=False)
    damaged = damage_image(raw.files["gre"][2], kind)
    before = file_tree(tmp_path)
    # Default work directory (next to the output): it must not be created either.
    code = run.main([str(raw.root), str(tmp_path / "out"), "participant", "--skip-bids-validation"])
    assert code == run.EXIT_DATA
    assert file_tree(tmp_path) == before  # no output, no work directory, input byte-identical
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    naming = [m for m in messages if str(damaged) in m]
    assert naming and all("gre" in m and re.search(DAMAGE_MESSAGES[kind], m) for m in naming), messages
    assert all("\n" not in m and "Traceback" not in m for m in messages), messages
    assert any(
        r.levelno >= logging.ERROR and r.getMessage().startswith("sub-01 cannot be processed") for r in caplog.records
    ), messages
