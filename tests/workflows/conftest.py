"""Phantom datasets shared by the App-level phantom tests.

Simulating the oversampled 2 mm phantom (a 1 mm truth, then every image) costs far more than one
App run on it, and most tests need the same noiseless subject with a different choice of scans.
So each spoiling model is simulated once per test session with every scan the tests use, and a
test takes the subset it needs: a hard-linked copy without the other scans' files, which is a
real BIDS dataset of its own (the App never writes to its input, so the links are safe).
"""

import pytest

from qmri_workflows.phantom.dataset import write_phantom_dataset
from qmri_workflows.phantom.protocol import Protocol
from tests.phantom_truths import SHARED_SEED, make_truth


@pytest.fixture(scope="session")
def noiseless_phantom_2mm(tmp_path_factory):
    """``build(spoiling)``: the noiseless 2 mm patient (seed 11) simulated at 1 mm (oversample 2),
    with the VFA, AFI and bSSFP scans, spoiled ``"ideal"`` or by ``"epg"``; built on first use from
    the session's shared 1 mm truth (``tests/phantom_truths.py``)."""
    built = {}

    def build(spoiling):
        if spoiling not in built:
            built[spoiling] = write_phantom_dataset(
                tmp_path_factory.mktemp(f"phantom-2mm-{spoiling}") / "raw",
                resolution=2.0,
                snr=float("inf"),
                subjects=1,
                seed=SHARED_SEED,
                protocol=Protocol(rb1cor=None, spoiling=spoiling),
                oversample=2,
                make_truth=make_truth,
            )
        return built[spoiling]

    return build
