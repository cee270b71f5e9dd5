"""Each layer imports without the ones above it (docs/architecture.rst, section "Layers").

Every module of the package is found with :mod:`pkgutil`, so a new module is checked without editing
this file, and a new subpackage fails until its rule is written down here. Two checks per module:

* its source: every import statement, including those inside functions (they run only when the
  function is called), must avoid what its layer forbids; imports under ``if TYPE_CHECKING:`` are
  annotations only and are skipped;
* a fresh interpreter importing the module must not end up with a forbidden module loaded, which
  catches imports through another module.
"""

import ast
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import qmri_workflows

PACKAGE = "qmri_workflows"
_LAYER_2_AND_3 = (f"{PACKAGE}.io", f"{PACKAGE}.interfaces")
_LAYER_3 = (f"{PACKAGE}.workflows", f"{PACKAGE}.cli", f"{PACKAGE}.phantom")

FORBIDDEN_IMPORTS = {
    # the package root is imported by everything: it stays free of every layer and heavy library
    "": ("nipype", "nibabel", "bids", f"{PACKAGE}.core") + _LAYER_2_AND_3 + _LAYER_3,
    "core": ("nipype", "nibabel", "bids") + _LAYER_2_AND_3 + _LAYER_3,
    "io": ("nipype", f"{PACKAGE}.interfaces") + _LAYER_3,
    "interfaces": _LAYER_3,
    # layer 3: workflows serve the BIDS App; the phantom and the App stay independent of each other
    "workflows": (f"{PACKAGE}.cli", f"{PACKAGE}.phantom"),
    "cli": (f"{PACKAGE}.phantom",),
    "phantom": (f"{PACKAGE}.cli", f"{PACKAGE}.workflows"),
}


def _package_modules():
    names = [PACKAGE]
    for info in pkgutil.walk_packages(qmri_workflows.__path__, prefix=f"{PACKAGE}."):
        names.append(info.name)
    return sorted(names)


MODULES = _package_modules()


def _layer(module):
    return module.split(".")[1] if "." in module else ""


def _is_forbidden(imported, forbidden):
    return any(imported == name or imported.startswith(name + ".") for name in forbidden)


def _is_type_checking_block(node):
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports_in_source(module):
    """Absolute names of everything the module's source imports, wherever the statement stands."""
    spec = importlib.util.find_spec(module)
    is_package = spec.submodule_search_locations is not None
    package = module if is_package else module.rpartition(".")[0]
    tree = ast.parse(open(spec.origin, encoding="utf-8").read(), filename=spec.origin)
    imported = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        if _is_type_checking_block(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            imported.add(base)
            imported.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        pending.extend(ast.iter_child_nodes(node))
    return imported


def _modules_after_import(module):
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_discovery_finds_every_layer_and_known_module():
    assert {_layer(module) for module in MODULES} == set(FORBIDDEN_IMPORTS)
    for module in ("io.images", "io.staging", "io.resample", "interfaces.utility", "phantom.cli",
                   "phantom.truth", "core.r2star", "workflows.base", "cli.run"):
        assert f"{PACKAGE}.{module}" in MODULES


@pytest.mark.parametrize("module", MODULES)
def test_source_imports_respect_the_layers(module):
    assert _layer(module) in FORBIDDEN_IMPORTS, (
        f"{module} is in a subpackage with no layer rule: add it to FORBIDDEN_IMPORTS and docs/architecture.rst")
    forbidden = FORBIDDEN_IMPORTS[_layer(module)]
    offending = sorted(name for name in _imports_in_source(module) if _is_forbidden(name, forbidden))
    assert not offending, f"{module} imports {offending}, which its layer must not"


@pytest.mark.parametrize("module", MODULES)
def test_importing_loads_nothing_from_above(module):
    forbidden = FORBIDDEN_IMPORTS.get(_layer(module), ())
    offending = sorted(name for name in _modules_after_import(module) if _is_forbidden(name, forbidden))
    assert not offending, f"importing {module} loads {offending}"


def test_the_checks_can_fail():
    """A module reached through a relative import is resolved and caught."""
    assert f"{PACKAGE}.io.errors" in _imports_in_source(f"{PACKAGE}.io.images")
    assert _is_forbidden("nipype.pipeline.engine", FORBIDDEN_IMPORTS["io"])
    assert not _is_forbidden("bidsschematools", FORBIDDEN_IMPORTS["core"])
    assert "nipype" in _modules_after_import(f"{PACKAGE}.interfaces.utility")
