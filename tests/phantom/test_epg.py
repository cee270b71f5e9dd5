"""The phantom's spoiled-GRE/AFI EPG against brute-force isochromats and the ideal-spoiling limit."""

import math
import time

import numpy as np
import pytest

from qmri_workflows.core.signal import afi_signals, spgr_signal
from qmri_workflows.phantom.epg import (
    afi_steady_state,
    dephasing_from_gradient_moment,
    spgr_steady_state,
    spgr_steady_state_table,
)
from tests.isochromats import simulate

TISSUES = {"white matter": (0.85, 0.07), "grey matter": (1.4, 0.08), "long-T2 lesion": (1.5, 0.2)}


@pytest.mark.parametrize("increment", [50.0, 117.0, 150.0])
def test_spgr_matches_isochromats(increment):
    t1, t2 = np.array([v for v in TISSUES.values()]).T
    flips = np.array([6.0, 21.0, 30.0])
    b1 = np.array([1.2, 0.8, 1.0])
    reference = simulate(t1, t2, np.deg2rad(flips * b1), [(0.025, 1)], math.radians(increment))[:, 0]
    epg = spgr_steady_state(t1, t2, flips, 0.025, phase_increment_deg=increment, diffusion=0.0, b1=b1)
    np.testing.assert_allclose(epg, reference, rtol=1e-5)
    # the effect being simulated is not negligible: at 21-30 deg the signal departs from Ernst
    ernst = spgr_signal(1.0, 1 / t1, 0.0, np.deg2rad(flips), 0.025, 0.0, b1=b1)
    assert np.max(np.abs(epg / ernst - 1)) > 0.01


def test_afi_matches_isochromats():
    reference = simulate(
        [1.0, 0.85], [0.1, 0.07], np.deg2rad([60.0, 66.0]), [(0.02, 1), (0.1, 5)], math.radians(39.0), n_pulses=800
    )
    s1, s2 = afi_steady_state(
        [1.0, 0.85], [0.1, 0.07], 60.0, 0.02, 0.1, phase_increment_deg=39.0, diffusion=0.0, b1=[1.0, 1.1]
    )
    np.testing.assert_allclose(np.stack([s1, s2], -1), reference, rtol=2e-4)


def test_strong_diffusion_damping_gives_the_ernst_and_ideal_afi_signals():
    t1 = np.array([0.85, 1.4, 4.0])
    t2 = np.array([0.07, 0.08, 2.0])
    spgr = spgr_steady_state(t1, t2, 21.0, 0.025, gradient_moment=100.0, diffusion=3e-3, b1=1.1)
    np.testing.assert_allclose(spgr, spgr_signal(1.0, 1 / t1, 0.0, math.radians(21), 0.025, 0.0, b1=1.1), rtol=1e-6)
    s1, s2 = afi_steady_state(t1, t2, 60.0, 0.02, 0.1, gradient_moment=100.0, diffusion=3e-3, b1=0.9)
    ideal = afi_signals(1.0, 1 / t1, 0.0, math.radians(60), 0.02, 0.1, 0.0, b1=0.9)
    np.testing.assert_allclose(s1, ideal[0], rtol=1e-6)
    np.testing.assert_allclose(s2, ideal[1], rtol=1e-6)


def test_table_interpolates_the_epg():
    rng = np.random.default_rng(3)
    t1 = rng.uniform(0.6, 4.5, 200)
    t2 = np.exp(rng.uniform(np.log(0.04), np.log(2.0), 200))
    b1 = rng.uniform(0.7, 1.3, 200)
    kwargs = dict(phase_increment_deg=50.0, gradient_moment=4.0, diffusion=0.8e-3)
    start = time.perf_counter()
    table = spgr_steady_state_table(t1, t2, 21.0, 0.025, b1=b1, **kwargs)
    build = time.perf_counter() - start
    direct = spgr_steady_state(t1, t2, 21.0, 0.025, b1=b1, **kwargs)
    error = np.max(np.abs(table / direct - 1))
    print(f"EPG table (14 x 16 x 13) built and used in {build:.2f} s; max interpolation error {error:.1e}")
    assert error < 2e-4


def test_gradient_moment_conversion():
    # 26 mT/m for 3 ms = 0.078 mT s/m: gamma-bar * area = 42.577 MHz/T * 7.8e-5 T s/m = 3.32 cycles/mm
    assert dephasing_from_gradient_moment(0.078) == pytest.approx(3.3210, rel=1e-4)


def test_invalid_inputs_are_refused():
    with pytest.raises(ValueError, match="tr2 > tr1"):
        afi_steady_state(1.0, 0.1, 60.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="positive"):
        spgr_steady_state(-1.0, 0.1, 20.0, 0.025)
