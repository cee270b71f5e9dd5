"""Each layer imports without the ones above it (docs/architecture.rst, section "Layers").

Every module of the package is found with :mod:`pkgutil`, so a new module is checked without editing
this file, and a new subpackage fails until its rule is written down here. Two checks per module:

* its source: every import statement, including those inside functions (they run only when the
  function is called), must avoid what its layer forbids; imports under ``if TYPE_CHECKING:`` are
  annotations only and are skipped;
* a fresh interpreter importing the module must not end up with a forbidden module loaded, which
  catches imports through another module.
"""

import subprocess
import sys

import pytest

from tests.package_source import PACKAGE, imports_in_source, package_modules

_LAYER_2 = (f"{PACKAGE}.io", f"{PACKAGE}.interfaces")
_LAYER_3 = (f"{PACKAGE}.workflows", f"{PACKAGE}.cli", f"{PACKAGE}.phantom")

FORBIDDEN_IMPORTS = {
    # the package root is imported by everything: it stays free of every layer and heavy library
    "": ("nipype", "nibabel", "bids", f"{PACKAGE}.core") + _LAYER_2 + _LAYER_3,
    "core": ("nipype", "nibabel", "bids") + _LAYER_2 + _LAYER_3,
    "io": ("nipype", f"{PACKAGE}.interfaces") + _LAYER_3,
    "interfaces": _LAYER_3,
    # layer 3: workflows serve the BIDS App; the phantom and the App stay independent of each other
    "workflows": (f"{PACKAGE}.cli", f"{PACKAGE}.phantom"),
    "cli": (f"{PACKAGE}.phantom",),
    "phantom": (f"{PACKAGE}.cli", f"{PACKAGE}.workflows"),
    # the visual report reads published files: the core and io only
    "reports": ("nipype", "bids", f"{PACKAGE}.interfaces") + _LAYER_3,
}

MODULES = package_modules()


def _layer(module):
    return module.split(".")[1] if "." in module else ""


def _is_forbidden(imported, forbidden):
    return any(imported == name or imported.startswith(name + ".") for name in forbidden)


def _modules_after_import(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_discovery_finds_every_layer_and_known_module():
    assert {_layer(module) for module in MODULES} == set(FORBIDDEN_IMPORTS)
    for module in (
        "io.images",
        "io.staging",
        "io.resample",
        "interfaces.utility",
        "phantom.cli",
        "phantom.truth",
        "core.r2star",
        "workflows.base",
        "cli.run",
    ):
        assert f"{PACKAGE}.{module}" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_source_imports_respect_the_layers(module):
    assert _layer(module) in FORBIDDEN_IMPORTS, (
        f"{module} is in a subpackage with no layer rule: add it to FORBIDDEN_IMPORTS and docs/architecture.rst"
    )
    forbidden = FORBIDDEN_IMPORTS[_layer(module)]
    offending = sorted(name for name in imports_in_source(module) if _is_forbidden(name, forbidden))
    assert not offending, f"{module} imports {offending}, which its layer must not"


@pytest.mark.parametrize("module", MODULES)
def test_importing_loads_nothing_from_above(module):
    forbidden = FORBIDDEN_IMPORTS.get(_layer(module), ())
    offending = sorted(name for name in _modules_after_import(module) if _is_forbidden(name, forbidden))
    assert not offending, f"importing {module} loads {offending}"


def test_the_checks_can_fail():
    """A module reached through a relative import is resolved and caught."""
    assert f"{PACKAGE}.io.errors" in imports_in_source(f"{PACKAGE}.io.images")
    assert _is_forbidden("nipype.pipeline.engine", FORBIDDEN_IMPORTS["io"])
    assert not _is_forbidden("bidsschematools", FORBIDDEN_IMPORTS["core"])
    assert "nipype" in _modules_after_import(f"{PACKAGE}.interfaces.utility")
