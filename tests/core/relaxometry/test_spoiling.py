"""The core's spoiling EPG (steady state in the RF-following frame) and the protocol helper."""

import math

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.spoiling import (
    DEFAULT_GRADIENT_DEPHASING,
    SpoilingProtocol,
    epg_spoiled_signal,
    spoiling_protocol,
    spoiling_ratio,
)
from qmri_workflows.core.signal import spgr_signal
from qmri_workflows.phantom.epg import spgr_steady_state
from tests.isochromats import simulate


@pytest.mark.parametrize("increment_deg", [50.0, 117.0, 150.0, 84.0])
def test_steady_state_matches_isochromats(increment_deg):
    t1 = np.array([0.85, 1.4, 1.5, 0.3])
    t2 = np.array([0.07, 0.08, 0.2, 0.05])
    alpha = np.deg2rad([21.0, 6.0, 25.2, 40.0])
    reference = simulate(t1, t2, alpha, [(0.025, 1)], math.radians(increment_deg))[:, 0]
    epg = epg_spoiled_signal(t1, t2, alpha, 0.025, math.radians(increment_deg), diffusion=0.0)
    np.testing.assert_allclose(epg, reference, rtol=1e-5)


def test_ideal_spoiling_limit_is_the_ernst_equation():
    t1 = np.array([0.85, 1.4, 4.0])
    t2 = np.array([0.07, 0.08, 2.0])
    epg = epg_spoiled_signal(
        t1, t2, math.radians(21), 0.025, math.radians(50), gradient_dephasing=100.0, diffusion=3e-3, b1=1.1
    )
    np.testing.assert_allclose(epg, spgr_signal(1.0, 1 / t1, 0.0, math.radians(21), 0.025, 0.0, b1=1.1), rtol=1e-6)


def test_agrees_with_the_phantom_epg_with_diffusion():
    t1 = np.array([0.85, 1.5, 3.0])
    t2 = np.array([0.07, 0.2, 1.0])
    b1 = np.array([0.8, 1.2, 1.0])
    core = epg_spoiled_signal(
        t1, t2, math.radians(21), 0.025, math.radians(117), gradient_dephasing=4.0, diffusion=0.8e-3, b1=b1
    )
    phantom = spgr_steady_state(
        t1, t2, 21.0, 0.025, phase_increment_deg=117.0, gradient_moment=4.0, diffusion=0.8e-3, b1=b1
    )
    np.testing.assert_allclose(core, phantom, rtol=1e-5)


def test_protocol_uses_sidecar_increment_then_vendor_default():
    flips = np.deg2rad([6.0, 21.0])
    given = spoiling_protocol(flips, 0.025, phase_increment_deg=117.0, manufacturer="Siemens")
    assert given.phase_increment == pytest.approx(math.radians(117.0))
    assert given.source == "SpoilingRFPhaseIncrement"
    for manufacturer, increment in [("SIEMENS", 50.0), ("GE MEDICAL SYSTEMS", 117.0), ("Philips", 150.0)]:
        protocol = spoiling_protocol(flips, 0.025, manufacturer=manufacturer)
        assert protocol.phase_increment == pytest.approx(math.radians(increment))
        assert f"{increment:g} deg" in protocol.source
    assert spoiling_protocol(flips, 0.025, manufacturer="Siemens").gradient_dephasing == DEFAULT_GRADIENT_DEPHASING
    assert spoiling_protocol(flips, 0.025, manufacturer="Siemens", gradient_moment=0.078).gradient_dephasing == (
        pytest.approx(3.3210, rel=1e-4)
    )
    with pytest.raises(ValueError, match="SpoilingRFPhaseIncrement.*Manufacturer"):
        spoiling_protocol(flips, 0.025)
    with pytest.raises(ValueError, match="flip angles"):
        spoiling_protocol([6.0, 21.0], 0.025, manufacturer="Siemens")  # degrees by mistake


def test_ratio_table_matches_the_direct_epg():
    protocol = SpoilingProtocol((math.radians(6), math.radians(21)), 0.025, math.radians(50), 4.0, 0.8e-3)
    rng = np.random.default_rng(0)
    t1 = rng.uniform(0.5, 4.0, 50)
    t2 = np.exp(rng.uniform(np.log(0.03), np.log(1.0), 50))
    b1 = rng.uniform(0.7, 1.3, 50)
    ratio = spoiling_ratio(protocol, t1, t2, b1)
    assert ratio.shape == (50, 2)
    for index, flip in enumerate(protocol.flip_angles):
        direct = epg_spoiled_signal(
            t1, t2, flip, 0.025, protocol.phase_increment, gradient_dephasing=4.0, diffusion=0.8e-3, b1=b1
        )
        expected = direct / spgr_signal(1.0, 1 / t1, 0.0, flip, 0.025, 0.0, b1=b1)
        np.testing.assert_allclose(ratio[:, index], expected, rtol=3e-4)


def test_ratio_table_matches_the_direct_epg_at_the_edges_of_its_grid():
    """CSF-like T1 and T2 (up to 6 s and 3 s) and B1 up to 1.7: the last cells of the table."""
    protocol = SpoilingProtocol((math.radians(6), math.radians(21)), 0.025, math.radians(50), 4.0, 0.8e-3)
    t1 = np.array([0.2, 0.21, 4.6, 5.3, 5.9, 6.0])
    t2 = np.array([0.01, 0.011, 2.2, 2.6, 2.9, 3.0])
    b1 = np.array([0.3, 0.32, 1.5, 1.62, 1.68, 1.7])
    ratio = spoiling_ratio(protocol, t1, t2, b1)
    for index, flip in enumerate(protocol.flip_angles):
        direct = epg_spoiled_signal(
            t1, t2, flip, 0.025, protocol.phase_increment, gradient_dephasing=4.0, diffusion=0.8e-3, b1=b1
        )
        expected = direct / spgr_signal(1.0, 1 / t1, 0.0, flip, 0.025, 0.0, b1=b1)
        # cubic spline with "nearest" ends: 0.08 % at worst in the last cells (3e-4 inside)
        np.testing.assert_allclose(ratio[:, index], expected, rtol=1e-3)
