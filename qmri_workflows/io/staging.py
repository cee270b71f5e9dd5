"""Publish a subject's derivatives all at once.

The pipeline writes every derivative of a subject into a hidden staging folder inside the output
dataset and moves them into place only after all of them were written, so a failed run leaves the
output dataset without a partial subject. Staging lives inside the output directory so that the
final moves are renames on one file system.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

STAGING_FOLDER = ".qmri-staging"
#: Folder of the work directory that keeps what a failed subject had staged (for its report).
UNPUBLISHED_FOLDER = "unpublished"


def _folder_label(subject, session):
    return f"sub-{subject}" + (f"_ses-{session}" if session else "")


def staging_directory(output_dir, subject, session=None):
    """Return the staging folder for one subject (and session) inside ``output_dir``."""
    return Path(output_dir) / STAGING_FOLDER / _folder_label(subject, session)


def unpublished_directory(work_dir, subject, session=None):
    """Return the folder of the work directory that keeps a failed subject's staged derivatives.

    It has the layout of a derivatives dataset (``sub-<label>/[ses-<label>/]anat/...``) holding the
    outputs whose steps finished before the failure; they are never published.
    """
    return Path(work_dir) / UNPUBLISHED_FOLDER / _folder_label(subject, session)


def keep_unpublished(output_dir, work_dir, subject, session=None):
    """Move a failed subject's staged derivatives out of ``output_dir`` into the work directory.

    The output keeps whole subjects only; what had finished stays readable (the report shows it,
    labelled as not published) in :func:`unpublished_directory`, which replaces any earlier one.

    Returns
    -------
    Path or None
        The unpublished folder, or None when nothing was staged.
    """
    import shutil

    staged = staging_directory(output_dir, subject, session)
    target = unpublished_directory(work_dir, subject, session)
    shutil.rmtree(target, ignore_errors=True)
    if not staged.is_dir():
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staged), str(target))
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # the hidden staging root, once nothing else is staged in it
    return target


def commit_staged_files(staging_dir, output_dir, files):
    """Move ``files`` (all under ``staging_dir``) to the same relative paths under ``output_dir``.

    Every file is checked before the first one moves, so a missing file moves nothing. Only the
    moved files leave the staging folder; folders left empty are removed, so another writer's
    files staged beside them are never touched.

    Returns
    -------
    list of str
        The published paths.
    """
    staging_dir = Path(staging_dir).resolve()
    output_dir = Path(output_dir).resolve()
    sources = [Path(f).resolve() for f in files]
    for source in sources:
        if not source.is_file():
            raise FileNotFoundError(f"staged derivative {source} is missing; nothing was published")
        if staging_dir not in source.parents:
            raise ValueError(f"{source} is not inside the staging folder {staging_dir}")
    published = []
    for source in sources:
        target = output_dir / source.relative_to(staging_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        published.append(str(target))
    _remove_empty_folders({source.parent for source in sources}, stop=staging_dir.parent)
    return published


def _remove_empty_folders(folders, *, stop):
    """Remove each folder in ``folders`` and its parents up to (excluding) ``stop`` while empty.

    The hidden staging root itself goes too once nothing is staged in it.
    """
    for folder in sorted(folders, key=lambda path: len(path.parts), reverse=True):
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:  # not empty (another writer's files) or already gone
                break
            folder = folder.parent
    if stop.name == STAGING_FOLDER:
        with contextlib.suppress(OSError):
            stop.rmdir()
