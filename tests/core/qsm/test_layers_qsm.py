"""The QSM core imports no file or workflow machinery (layer 1)."""

import subprocess
import sys

import pytest

MODULES = [
    "qmri_workflows.core.qsm",
    "qmri_workflows.core.qsm.phase",
    "qmri_workflows.core.qsm.field",
    "qmri_workflows.core.qsm.background",
    "qmri_workflows.core.qsm.inversion",
    "qmri_workflows.core.qsm.referencing",
]


@pytest.mark.parametrize("module", MODULES)
def test_qsm_core_needs_no_files_or_nipype(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    for forbidden in ("nipype", "nibabel", "bids", "qmri_workflows.interfaces", "qmri_workflows.io"):
        assert forbidden not in loaded, f"{module} imports {forbidden}"
