"""Subsets of a simulated phantom dataset, for tests that need fewer scans than were simulated."""

import fnmatch
import os
import shutil

#: File-name patterns of each scan a test can leave out (image and sidecar alike).
SCAN_PATTERNS = {
    "bssfp": ("*_acq-bssfp*",),
    "afi": ("*_TB1AFI.*",),
    "phase": ("*_echo-*_part-phase_VFA.*",),  # the multi-echo GRE phase only
    "bssfp-phase": ("*_acq-bssfp*_part-phase_*",),
}


def dataset_without(raw, destination, scans):
    """Hard-linked copy of the dataset ``raw`` at ``destination`` without the files of ``scans``
    (keys of :data:`SCAN_PATTERNS`); the ground truth under ``derivatives/`` is kept whole."""
    patterns = [pattern for scan in scans for pattern in SCAN_PATTERNS[scan]]

    def ignore(folder, names):
        if os.path.relpath(folder, raw).split(os.sep)[0] == "derivatives":
            return []
        return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]

    shutil.copytree(raw, destination, ignore=ignore, copy_function=os.link)
    return destination
