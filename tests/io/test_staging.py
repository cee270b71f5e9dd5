"""Derivatives of a subject are published together or not at all."""

import pytest

from qmri_workflows.io.staging import STAGING_FOLDER, commit_staged_files, staging_directory


def _stage(tmp_path, names):
    staging = staging_directory(tmp_path / "out", "01", "a")
    files = []
    for name in names:
        path = staging / "sub-01" / "ses-a" / "anat" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
        files.append(path)
    return staging, files


def test_commit_moves_every_file_and_cleans_up(tmp_path):
    staging, files = _stage(tmp_path, ["sub-01_ses-a_R2starmap.nii.gz", "sub-01_ses-a_R2starmap.json"])
    published = commit_staged_files(staging, tmp_path / "out", files)
    assert sorted(p.split("/")[-1] for p in published) == sorted(f.name for f in files)
    for name in ("sub-01_ses-a_R2starmap.nii.gz", "sub-01_ses-a_R2starmap.json"):
        assert (tmp_path / "out" / "sub-01" / "ses-a" / "anat" / name).read_text() == name
    assert not (tmp_path / "out" / STAGING_FOLDER).exists()


def test_missing_file_publishes_nothing(tmp_path):
    staging, files = _stage(tmp_path, ["sub-01_ses-a_R2starmap.nii.gz"])
    with pytest.raises(FileNotFoundError, match="nothing was published"):
        commit_staged_files(staging, tmp_path / "out", files + [staging / "missing.nii.gz"])
    assert not (tmp_path / "out" / "sub-01").exists()
    assert files[0].exists()


def test_refuses_files_outside_staging(tmp_path):
    staging, files = _stage(tmp_path, ["sub-01_ses-a_R2starmap.nii.gz"])
    stray = tmp_path / "elsewhere.nii.gz"
    stray.write_text("x")
    with pytest.raises(ValueError, match="not inside the staging folder"):
        commit_staged_files(staging, tmp_path / "out", [stray])


def test_a_commit_leaves_files_staged_by_another_writer(tmp_path):
    """Two commits on one subject's staging folder: the first must not take the second's files."""
    staging, files = _stage(tmp_path, ["sub-01_ses-a_R2starmap.nii.gz", "sub-01_ses-a_R1map.nii.gz"])
    first, second = files
    commit_staged_files(staging, tmp_path / "out", [first])
    assert second.read_text() == second.name, "the other writer's staged file was removed"
    assert (tmp_path / "out" / STAGING_FOLDER).exists()
    commit_staged_files(staging, tmp_path / "out", [second])
    assert (tmp_path / "out" / "sub-01" / "ses-a" / "anat" / second.name).is_file()
    assert not (tmp_path / "out" / STAGING_FOLDER).exists()
