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
