"""Fixtures of the report tests."""

import pytest


@pytest.fixture(scope="session")
def example_with_failure(tmp_path_factory):
    """The shipped example through the App, sub-02 failing in one step (:mod:`tests.report_dataset`)."""
    from tests.report_dataset import run_example_with_a_failure

    return run_example_with_a_failure(tmp_path_factory.mktemp("report"))
