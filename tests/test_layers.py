"""Each layer imports without the ones above it (DEVELOPERS.md: three layers)."""

import subprocess
import sys

import pytest

CORE_MODULES = [
    "qmri_workflows.core.r2star",
    "qmri_workflows.core.noise",
    "qmri_workflows.core.crlb",
    "qmri_workflows.core.masking",
    "qmri_workflows.core.signal",
    "qmri_workflows.core.dipole",
]


def _modules_after_import(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_needs_no_files_or_nipype(module):
    loaded = _modules_after_import(module)
    for forbidden in ("nipype", "nibabel", "bids", "qmri_workflows.interfaces", "qmri_workflows.io"):
        assert forbidden not in loaded, f"{module} imports {forbidden}"


@pytest.mark.parametrize(
    "module",
    ["qmri_workflows.interfaces.r2star", "qmri_workflows.interfaces.masking",
     "qmri_workflows.interfaces.bids", "qmri_workflows.io.query", "qmri_workflows.io.derivatives"],
)
def test_interfaces_and_io_need_no_workflows(module):
    loaded = _modules_after_import(module)
    for forbidden in ("qmri_workflows.workflows", "qmri_workflows.cli", "qmri_workflows.phantom"):
        assert forbidden not in loaded, f"{module} imports {forbidden}"


def test_io_needs_no_nipype():
    for module in ("qmri_workflows.io.query", "qmri_workflows.io.derivatives"):
        assert "nipype" not in _modules_after_import(module)
