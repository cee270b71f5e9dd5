"""The package's modules and what their source imports, for the architecture and packaging tests."""

import ast
import importlib.util
import pkgutil

import qmri_workflows

PACKAGE = "qmri_workflows"


def package_modules():
    """Names of the package and every module below it (found with pkgutil, so new ones count)."""
    names = [PACKAGE]
    for info in pkgutil.walk_packages(qmri_workflows.__path__, prefix=f"{PACKAGE}."):
        names.append(info.name)
    return sorted(names)


def _is_type_checking_block(node):
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_in_source(module):
    """Absolute names of everything the module's source imports, wherever the statement stands.

    Imports inside functions count (they run when the function is called); imports under
    ``if TYPE_CHECKING:`` do not (annotations only). ``from pkg import name`` yields both ``pkg``
    and ``pkg.name``, since ``name`` may be a module.
    """
    spec = importlib.util.find_spec(module)
    is_package = spec.submodule_search_locations is not None
    package = module if is_package else module.rpartition(".")[0]
    with open(spec.origin, encoding="utf-8") as source:
        tree = ast.parse(source.read(), filename=spec.origin)
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
            imported.update(f"{base}.{alias.name}" for alias in node.names)
        pending.extend(ast.iter_child_nodes(node))
    return imported
