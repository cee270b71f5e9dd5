"""Shared test set-up."""

import logging

import pytest


@pytest.fixture(autouse=True)
def _app_messages_reach_caplog():
    """Let the App's messages propagate to pytest's handlers, whichever test calls the App first.

    ``qmri_workflows.cli.run.main`` installs its own stderr handler and stops propagation unless
    the logger already has a handler; a NullHandler stands in for it during tests.
    """
    logger = logging.getLogger("qmri_workflows")
    saved = (list(logger.handlers), logger.propagate)
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = True
    yield
    logger.handlers[:], logger.propagate = saved


@pytest.fixture(scope="session")
def phantom_participant_outputs(tmp_path_factory):
    """``(raw, out, truth)`` of the two-subject analysis phantom run through the participant level
    once per session (``tests/analysis_dataset.py``); tests only read it, the group-level test adds
    ``out/group``."""
    from tests.analysis_dataset import participant_outputs

    return participant_outputs(tmp_path_factory.mktemp("analysis"))


# Session fixtures that simulate or run something expensive once per session. Under pytest-xdist
# each worker would build its own copy, so the modules that use one are kept on one worker.
EXPENSIVE_SESSION_FIXTURES = ("noiseless_phantom_2mm", "phantom_participant_outputs", "example_with_failure")


def pytest_collection_modifyitems(config, items):
    """Give every test an ``xdist_group``: its module's, or the group of the expensive session
    fixtures its module shares with other modules (``--dist loadgroup`` in setup.cfg), and run
    the groups that hold slow tests first.

    Whole modules stay on one worker so that module-scoped fixtures (a phantom per module) are
    built once, as in a serial run.
    """
    if not config.pluginmanager.hasplugin("xdist"):
        return
    parent = {}

    def root(name):
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    def module(item):
        return item.nodeid.split("::")[0]

    sources = {}
    for item in items:
        if module(item) not in sources:  # a fixture may be requested by name (getfixturevalue)
            sources[module(item)] = item.path.read_text(encoding="utf-8")
        for fixture in EXPENSIVE_SESSION_FIXTURES:
            if fixture in item.fixturenames or fixture in sources[module(item)]:
                parent[root(module(item))] = root(fixture)
    for item in items:
        item.add_marker(pytest.mark.xdist_group(root(module(item))))
    # Groups with the most slow tests first, so that the longest ones do not start last on one
    # worker while the other idles; each group keeps its own order.
    first_seen, slow_tests = {}, {}
    for index, item in enumerate(items):
        group = root(module(item))
        first_seen.setdefault(group, index)
        slow_tests[group] = slow_tests.get(group, 0) + bool(item.get_closest_marker("slow"))
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-slow_tests[root(module(item))], first_seen[root(module(item))], order[id(item)]))
