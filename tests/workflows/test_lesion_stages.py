"""Lesion stages from the App's own maps: the 2 mm patient phantom, noiseless and at SNR 30.

The core tests (``tests/core/test_lesions.py``) stage the lesions from the truth maps; here the maps
are the App's fits of simulated images (R2*, R1, PD, R2, QSM), so the stages carry the errors of
every fit, of QSM above all (its lesion contrasts are the finest the stages rely on).
"""

import math

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.core.lesions import label_lesions
from qmri_workflows.io.tables import read_table
from tests.lesion_stages import confusion_table

pytest.importorskip("nilearn")

RESOLUTION = 2.0  # mm: the 8 and 10 mm white-matter lesions keep a core for the rim assessment


def _truth_and_found(root, snr):
    from qmri_workflows.cli import run
    from qmri_workflows.phantom.dataset import write_phantom_dataset

    raw, out = root / "raw", root / "out"
    # sub-01 is the patient; oversample 1 keeps the simulation within a minute
    write_phantom_dataset(raw, resolution=RESOLUTION, snr=snr, subjects=1, seed=0, oversample=1)
    truth = raw / "derivatives" / "phantom"
    arguments = ["--derivatives", str(truth), "--skip-bids-validation", "-w", str(root / "work"), "--nprocs", "2"]
    assert run.main([str(raw), str(out), "participant", *arguments]) == 0
    anat = truth / "sub-01" / "anat"
    numbers = np.asanyarray(nib.load(anat / "sub-01_label-lesion_dseg.nii.gz").dataobj).astype(int)
    stages = {int(row["index"]): row["stage"] for row in read_table(anat / "sub-01_label-lesion_dseg.tsv")}
    # the App numbers connected lesions of the same mask the same way (largest first)
    labels, _ = label_lesions(numbers > 0)
    table = read_table(out / "sub-01" / "anat" / "sub-01_desc-lesions_stats.tsv")
    truth_stages = [stages[int(np.bincount(numbers[labels == int(row["lesion"])]).argmax())] for row in table]
    return table, truth_stages


@pytest.mark.slow
@pytest.mark.parametrize("snr", [math.inf, 30.0], ids=["noiseless", "snr30"])
def test_lesion_stages_from_the_apps_maps(snr, tmp_path):
    table, truth_stages = _truth_and_found(tmp_path, snr)
    found = [row["stage"] for row in table]
    print(f"\nApp's maps, 2 mm, SNR {snr:g}\n" + confusion_table(truth_stages, found))
    for row, truth in zip(table, truth_stages):
        if row["stage"] != truth:
            print(f"lesion {row['lesion']} ({row['voxels']} voxels), {truth} staged {row['stage']}: {row['evidence']}")
    assert len(table) == 15
    matches = sum(f == t for f, t in zip(found, truth_stages))
    assert matches >= 0.8 * len(table)
    if math.isinf(snr):
        # every lesion large enough for a core and a rim is staged right; the misses are lesions of
        # at most 7 voxels, whose chi contrast (about +13 ppb in the truth) the fitted QSM does not resolve
        for row, truth in zip(table, truth_stages):
            if int(row["core_voxels"]) > 0:
                assert row["stage"] == truth, (row["lesion"], truth, row["evidence"])


def test_the_command_line_default_reach_is_the_analysis_one():
    from qmri_workflows.core.lesions import LOCAL_REFERENCE_MM
    from qmri_workflows.interfaces.analysis import SubjectAnalysis
    from qmri_workflows.workflows.analysis import MAP_FAMILIES

    (option,) = [option for family in MAP_FAMILIES for option in family.options if option.dest == "lesion_reference_mm"]
    assert option.kwargs["default"] == LOCAL_REFERENCE_MM == SubjectAnalysis().inputs.lesion_reference_mm
