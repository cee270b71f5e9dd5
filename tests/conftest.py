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


def pytest_collection_modifyitems(config, items):
    """Run the test modules with the most slow tests first (a stable sort: each module keeps its order).

    pytest-xdist distributes whole modules (``--dist loadscope`` in setup.cfg), in this order, so the
    longest modules do not start last on one worker while the other idles.
    """

    def module(item):
        return item.nodeid.split("::")[0]

    slow_tests, first_seen = {}, {}
    for index, item in enumerate(items):
        first_seen.setdefault(module(item), index)
        slow_tests[module(item)] = slow_tests.get(module(item), 0) + bool(item.get_closest_marker("slow"))
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (-slow_tests[module(item)], first_seen[module(item)], order[id(item)]))
