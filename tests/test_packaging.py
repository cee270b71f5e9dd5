"""setup.cfg says only true things: its package data exist and every dependency is used."""

import configparser
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

from tests.package_source import PACKAGE, imports_in_source, package_modules

ROOT = Path(__file__).resolve().parents[1]

UNUSED_DEPENDENCY_ALLOW_LIST: dict = {}
"""install_requires entries not imported yet, each with the reason it is kept."""


def _setup_cfg():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg", encoding="utf-8")
    return config


def _listed(value):
    return [item.strip() for item in re.split(r"[,\n]", value) if item.strip()]


def _normalise(distribution):
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _requirement_names(requirements):
    """Normalised distribution names of setup.cfg requirement lines (``%(extra)s`` references skipped)."""
    return {
        _normalise(re.match(r"[A-Za-z0-9._-]+", line).group())
        for line in _listed(requirements)
        if not line.startswith("%(")
    }


def _imported_top_level_modules():
    return {name.split(".")[0] for module in package_modules() for name in imports_in_source(module)}


@functools.cache
def _distributions_by_module():
    # scans every installed distribution's file list: seconds per call in a full environment
    return importlib.metadata.packages_distributions()


def _distributions(top_level_module):
    return {_normalise(dist) for dist in _distributions_by_module().get(top_level_module, ())}


def test_every_package_data_pattern_matches_a_file():
    """(setup.cfg declares no package data at present; this guards the next declaration.)"""
    config = _setup_cfg()
    if not config.has_section("options.package_data"):
        return
    for package, patterns in config["options.package_data"].items():
        folder = ROOT / package.replace(".", "/") if package else ROOT / PACKAGE
        for pattern in _listed(patterns):
            assert list(folder.glob(pattern)), f"package_data pattern {pattern!r} of {package} matches no file"


def test_every_install_requirement_is_imported_or_explained():
    required = _requirement_names(_setup_cfg()["options"]["install_requires"])
    imported = set().union(*map(_distributions, _imported_top_level_modules()))
    unexplained = sorted(required - imported - set(UNUSED_DEPENDENCY_ALLOW_LIST))
    assert not unexplained, f"install_requires lists {unexplained}, which the package never imports"
    stale = sorted(set(UNUSED_DEPENDENCY_ALLOW_LIST) & imported)
    assert not stale, f"{stale} are imported now: remove them from UNUSED_DEPENDENCY_ALLOW_LIST"
    assert set(UNUSED_DEPENDENCY_ALLOW_LIST) <= required


def test_every_third_party_import_is_declared():
    config = _setup_cfg()
    declared = _requirement_names(config["options"]["install_requires"])
    for requirements in config["options.extras_require"].values():
        declared |= _requirement_names(requirements)
    third_party = _imported_top_level_modules() - set(sys.stdlib_module_names) - {PACKAGE}
    undeclared = sorted(name for name in third_party if not _distributions(name) & declared)
    assert not undeclared, f"the package imports {undeclared}, which setup.cfg does not declare"
