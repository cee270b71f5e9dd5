"""A two-subject phantom dataset (patient and control) run through the participant level, for the
analysis and group-level tests."""

from __future__ import annotations

import math
from pathlib import Path

RESOLUTION = 5.0  # mm: every nucleus and the large lesions hold voxels; seconds per subject
SEED = 7


def participant_outputs(root):
    """Write the phantom into ``root/raw`` and run the App's participant level into ``root/out``.

    Noiseless and without oversampling, the images are the exact signal model of the truth, so the
    R2* fit reproduces the truth R2* map.

    Returns
    -------
    raw, out, truth : Path
        Raw dataset, App output and the truth derivatives (``raw/derivatives/phantom``).
    """
    from qmri_workflows.cli import run
    from qmri_workflows.phantom.dataset import write_phantom_dataset

    root = Path(root)
    raw, out = root / "raw", root / "out"
    write_phantom_dataset(raw, resolution=RESOLUTION, snr=math.inf, subjects=2, seed=SEED, oversample=1)
    truth = raw / "derivatives" / "phantom"
    code = run.main(
        [
            str(raw),
            str(out),
            "participant",
            "--derivatives",
            str(truth),
            "--skip-bids-validation",
            "-w",
            str(root / "work"),
            "--nprocs",
            "2",
        ]
    )
    assert code == 0
    return raw, out, truth
