"""Fixtures of the App's tests."""

import logging

import pytest


@pytest.fixture
def cli_log(caplog, monkeypatch):
    """The CLI logs through its own handler without propagating: listen on its logger directly."""
    logger = logging.getLogger("qmri_workflows")
    monkeypatch.setattr(logger, "handlers", [caplog.handler])
    monkeypatch.setattr(logger, "propagate", False)
    return caplog
