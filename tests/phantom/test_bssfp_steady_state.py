"""The phantom's bSSFP steady state against the time-stepped Bloch simulation and the closed form.

Also where DESPOT2's finite-pulse correction (core.bssfp.finite_pulse_equivalent) is checked
against this simulator's exact steady state.
"""

import numpy as np
import pytest

from qmri_workflows.core.bssfp import fit_despot2, geometric_solution
from qmri_workflows.core.signal import bssfp_signal
from qmri_workflows.phantom.bssfp_steady_state import bssfp_steady_state
from tests.bssfp_cases import FLIPS, FOUR_CYCLES, TISSUES, TR, phantom_cycles
from tests.core.bssfp_bloch import simulate_bssfp


def test_instantaneous_pulses_give_the_closed_form():
    rng = np.random.default_rng(4)
    n = 2000
    m0, t1, t2 = rng.uniform(0.2, 2.0, n), rng.uniform(0.3, 4.0, n), rng.uniform(0.02, 2.0, n)
    t2 = np.minimum(t2, t1)
    b1, frequency = rng.uniform(0.6, 1.4, n), rng.uniform(-400.0, 400.0, n)
    for flip_deg, increment_deg in ((5.0, 0.0), (30.0, 90.0), (70.0, 225.0)):
        simulated = bssfp_steady_state(
            m0, 1 / t1, 1 / t2, np.deg2rad(flip_deg), TR, off_resonance=frequency,
            phase_increment=np.deg2rad(increment_deg), b1=b1, chunk_voxels=300,
        )  # fmt: skip
        closed = bssfp_signal(
            m0, 1 / t1, 1 / t2, np.deg2rad(flip_deg), TR, off_resonance=2 * np.pi * frequency * TR,
            phase_increment=np.deg2rad(increment_deg), b1=b1,
        )  # fmt: skip
        np.testing.assert_allclose(simulated, closed, rtol=0, atol=1e-12 * m0.max())


@pytest.mark.parametrize("pulse_duration", [0.0, 0.0005, 0.0015])
@pytest.mark.parametrize(("tissue", "flip_deg", "b1"), [("wm", 15.0, 1.0), ("gm", 50.0, 0.85), ("lesion", 50.0, 1.2)])
def test_matches_the_time_stepped_bloch_simulation(tissue, flip_deg, b1, pulse_duration):
    """Max |difference| / M0: 1e-11 with hard pulses; 2e-7 (the Bloch steps' splitting error) with finite ones."""
    t1, t2 = TISSUES[tissue]
    frequencies = np.array([-170.0, -93.0, -40.0, 0.0, 12.5, 77.0, 100.0, 230.0])
    for increment in np.deg2rad([0.0, 90.0, 135.0, 270.0]):
        bloch = simulate_bssfp(
            1.0, 1 / t1, 1 / t2, b1 * np.deg2rad(flip_deg), TR, frequencies, increment,
            pulse_duration=pulse_duration, rf_steps=256,
        )  # fmt: skip
        simulated = bssfp_steady_state(
            1.0, 1 / t1, 1 / t2, np.deg2rad(flip_deg), TR, off_resonance=frequencies, phase_increment=increment,
            b1=b1, pulse_duration=pulse_duration,
        )  # fmt: skip
        np.testing.assert_allclose(simulated, bloch, rtol=0, atol=1e-9 if pulse_duration == 0 else 1e-6)


def test_finite_pulses_change_the_signal():
    """1 ms pulses at TR 5 ms raise the on-resonance 50 deg signal by several percent (Bieri 2009)."""
    t1, t2 = TISSUES["wm"]
    hard = bssfp_steady_state(1.0, 1 / t1, 1 / t2, FLIPS[1], TR)
    finite = bssfp_steady_state(1.0, 1 / t1, 1 / t2, FLIPS[1], TR, pulse_duration=0.001)
    assert 1.02 < abs(finite) / abs(hard) < 1.15


def test_air_and_invalid_input():
    signal = bssfp_steady_state(np.array([0.0, 1.0, 1.0]), np.array([0.0, 0.0, 1.0]), 10.0, 0.5, TR)
    assert signal[0] == 0 and np.isnan(signal[1]) and np.isfinite(signal[2])
    with pytest.raises(ValueError, match="pulse_duration"):
        bssfp_steady_state(1.0, 1.0, 10.0, 0.5, TR, pulse_duration=TR)
    with pytest.raises(ValueError, match="tr"):
        bssfp_steady_state(1.0, 1.0, 10.0, 0.5, 0.0)


def _band_free(t1, t2, b1, frequencies, pulse_duration):
    """Geometric solution per flip angle (n_freq, n_flip) of the exact finite-pulse steady state."""
    cycles = np.stack(
        [phantom_cycles(t1, t2, flip, frequencies, b1=b1, pulse_duration=pulse_duration) for flip in FLIPS], axis=-2
    )
    return geometric_solution(cycles, FOUR_CYCLES)


@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_despot2_finite_pulse_correction(tissue):
    """DESPOT2 (15/50 deg, TR 5 ms, 1 ms pulses) on the exact band-free signal, true off-resonance given.

    Measured: without the correction R2 is 7-13 % low; with it within 0.5 % (B1+ 0.8-1.2, 0-90 Hz).
    """
    t1, t2 = TISSUES[tissue]
    pulse = 0.001
    frequencies = np.array([0.0, 30.0, 60.0, 90.0, -90.0])
    for b1 in (0.8, 1.0, 1.2):
        band_free = _band_free(t1, t2, b1, frequencies, pulse)
        uncorrected = fit_despot2(band_free, FLIPS, TR, 1 / t1, b1=b1).r2 * t2 - 1
        corrected = (
            fit_despot2(band_free, FLIPS, TR, 1 / t1, b1=b1, pulse_duration=pulse, off_resonance=frequencies).r2 * t2
            - 1
        )
        on_resonance = fit_despot2(band_free, FLIPS, TR, 1 / t1, b1=b1, pulse_duration=pulse).r2 * t2 - 1
        assert np.all(uncorrected < -0.06), uncorrected
        assert np.all(np.abs(corrected) < 0.006), corrected
        # without the off-resonance map the correction is exact on resonance only (90 Hz: about -3 %)
        assert abs(on_resonance[0]) < 0.008 and np.all(np.abs(on_resonance) < 0.04)


def test_correction_with_half_millisecond_pulses_and_instantaneous_limit():
    t1, t2 = TISSUES["wm"]
    frequencies = np.array([0.0, 45.0, -80.0])
    band_free = _band_free(t1, t2, 1.0, frequencies, 0.0005)
    corrected = fit_despot2(band_free, FLIPS, TR, 1 / t1, pulse_duration=0.0005, off_resonance=frequencies).r2
    np.testing.assert_allclose(corrected * t2, 1.0, atol=0.004)
    # instantaneous pulses: the uncorrected model is exact whatever the off-resonance
    band_free = _band_free(t1, t2, 1.0, frequencies, 0.0)
    np.testing.assert_allclose(fit_despot2(band_free, FLIPS, TR, 1 / t1).r2 * t2, 1.0, atol=1e-6)
