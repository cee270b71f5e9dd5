"""Finite RF pulses in the bSSFP estimators: off-resonance, small ``b``, linear DESPOT2, PLANET and joint fit.

The data come from the time-stepped Bloch simulation of ``tests/core/bssfp_bloch.py`` (independent
of the package) and, for sweeps too large for it, from the phantom's exact steady state
(:mod:`qmri_workflows.phantom.bssfp_steady_state`, checked against the same Bloch simulation in
``tests/phantom/test_bssfp_steady_state.py``).
"""

import numpy as np
import pytest
from scipy.linalg import expm

from qmri_workflows.core.bssfp import (
    band_free_signal,
    finite_pulse_off_resonance,
    fit_bssfp_joint,
    fit_despot2,
    fit_ellipse,
    geometric_off_resonance,
    planet_relaxation,
)
from qmri_workflows.core.signal import bssfp_signal
from tests.bssfp_cases import FLIPS, FOUR_CYCLES, TISSUES, TR, phantom_cycles
from tests.core.bssfp_bloch import simulate_bssfp

PULSE = 0.001


def _wrapped_hz(error):
    return np.angle(np.exp(2j * np.pi * error * TR)) / (2 * np.pi * TR)


def _cycles(t1, t2, flip, frequencies, *, b1=1.0, pulse_duration=PULSE, increments=FOUR_CYCLES):
    """Exact steady state (..., n_cycle) of the phantom's simulator, 1 ms pulses by default."""
    return phantom_cycles(t1, t2, flip, frequencies, b1=b1, pulse_duration=pulse_duration, increments=increments)


def test_pulse_is_a_precession_a_turn_about_x_and_the_same_precession():
    """The decomposition behind finite_pulse_off_resonance, on the exact rotation of the pulse."""
    for flip_deg in (15.0, 50.0, 90.0):
        alpha = np.deg2rad(flip_deg)
        for frequency in (-90.0, 13.0, 60.0):
            precession = 2 * np.pi * frequency * PULSE
            generator = np.array([[0.0, -precession, 0.0], [precession, 0.0, alpha], [0.0, -alpha, 0.0]])
            pulse = expm(generator)  # W x M with W = (-alpha / T, 0, omega), over T
            rotation = np.hypot(alpha, precession)
            beta = np.arctan2(np.sin(rotation / 2) * precession / rotation, np.cos(rotation / 2))
            cos_b, sin_b = np.cos(beta), np.sin(beta)
            turn_z = np.array([[cos_b, sin_b, 0.0], [-sin_b, cos_b, 0.0], [0.0, 0.0, 1.0]])  # by -beta
            about_x = turn_z @ pulse @ turn_z
            np.testing.assert_allclose(about_x[0], [1.0, 0.0, 0.0], atol=1e-12)
            np.testing.assert_allclose(about_x[:, 0], [1.0, 0.0, 0.0], atol=1e-12)


def test_off_resonance_inversion_round_trips_and_vanishes_without_pulse():
    apparent = np.linspace(-95.0, 95.0, 38)
    alpha = np.deg2rad(55.0)
    np.testing.assert_array_equal(finite_pulse_off_resonance(apparent, alpha, TR, 0.0), apparent)
    true = finite_pulse_off_resonance(apparent, alpha, TR, PULSE)
    # the pulse reads as a higher frequency, by about (g - 1)(T / TR)(1 - T / TR)
    g = 2 * np.tan(alpha / 2) / alpha
    np.testing.assert_allclose(apparent / true - 1, (g - 1) * PULSE / TR * (1 - PULSE / TR), rtol=0.03)
    # and the phase model maps the result back onto the input
    from qmri_workflows.core.bssfp import _finite_pulse_phase

    theta, _ = _finite_pulse_phase(2 * np.pi * true, alpha, TR, PULSE)
    np.testing.assert_allclose(theta / (2 * np.pi * TR), apparent, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="pulse_duration"):
        finite_pulse_off_resonance(apparent, alpha, TR, TR)
    with pytest.raises(ValueError, match="flip_angle"):
        geometric_off_resonance(_cycles(0.85, 0.07, alpha, [10.0]), FOUR_CYCLES, TR, pulse_duration=PULSE)


@pytest.mark.parametrize(("flip_deg", "tolerance_hz"), [(15.0, 0.002), (50.0, 0.015), (70.0, 0.06)])
def test_geometric_off_resonance_with_finite_pulses_matches_the_bloch_simulation(flip_deg, tolerance_hz):
    """Bloch simulation, 1 ms pulses at TR 5 ms, up to 95 Hz: errors in Hz."""
    t1, t2 = TISSUES["wm"]
    frequencies = np.array([-80.0, -37.0, 0.0, 23.0, 61.0, 95.0])
    alpha = np.deg2rad(flip_deg)
    signals = np.stack(
        [
            simulate_bssfp(1.0, 1 / t1, 1 / t2, alpha, TR, frequencies, increment, pulse_duration=PULSE, rf_steps=128)
            for increment in FOUR_CYCLES
        ],
        axis=-1,
    )
    uncorrected, _ = geometric_off_resonance(signals, FOUR_CYCLES, TR)
    corrected, _ = geometric_off_resonance(signals, FOUR_CYCLES, TR, flip_angle=alpha, pulse_duration=PULSE)
    error = np.abs(_wrapped_hz(corrected - frequencies))
    before = np.abs(_wrapped_hz(uncorrected - frequencies))
    print(f"\n{flip_deg:g} deg: max |error| {before.max():.3f} Hz uncorrected, {error.max():.4f} Hz corrected")
    assert error.max() < tolerance_hz
    assert before.max() > 10 * error.max()


def test_off_resonance_correction_across_tissues_b1_and_frequencies():
    """Exact steady state: the geometric estimate within 0.03 Hz (B1+ 0.8-1.2 at 50 deg, 0-95 Hz)."""
    frequencies = np.linspace(-95.0, 95.0, 39)
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        for b1 in (0.8, 1.0, 1.2):
            signals = _cycles(t1, t2, FLIPS[1], frequencies, b1=b1)
            actual = b1 * FLIPS[1]
            geometric, _ = geometric_off_resonance(signals, FOUR_CYCLES, TR, flip_angle=actual, pulse_duration=PULSE)
            assert np.abs(_wrapped_hz(geometric - frequencies)).max() < 0.03, (tissue, b1)
            # the ellipse fit's phase follows the curve's bend off the ellipse (documented)
            fitted = fit_ellipse(signals, FOUR_CYCLES, TR, flip_angle=actual, pulse_duration=PULSE).off_resonance
            assert np.abs(_wrapped_hz(fitted - frequencies)).max() < 1.2, (tissue, b1)


def test_small_b_does_not_turn_the_frequency_by_half_a_period():
    """60 deg actual, T2 50 ms: b is about 0 with 1 ms pulses (-0.0002); the phase comes from a."""
    t1, t2 = TISSUES["nucleus"]
    frequencies = np.array([-20.0, -9.0, -1.0, 0.0, 1.0, 9.0, 20.0])
    alpha = np.deg2rad(60.0)
    signals = _cycles(t1, t2, alpha, frequencies)
    geometric, b = geometric_off_resonance(signals, FOUR_CYCLES, TR, flip_angle=alpha, pulse_duration=PULSE)
    assert np.all(np.abs(b) < 0.01)
    assert np.abs(geometric - frequencies).max() < 0.01
    fit = fit_ellipse(signals, FOUR_CYCLES, TR, flip_angle=alpha, pulse_duration=PULSE)
    assert np.all(fit.a > 0.8) and np.abs(fit.off_resonance - frequencies).max() < 0.5
    # with instantaneous pulses b is small too (0.06): noise flips its sign, not the frequency
    # (a phase taken from b put 26 % of these voxels over 25 Hz off, most near 100 Hz)
    clean = np.stack(
        [
            bssfp_signal(1.0, 1 / t1, 1 / t2, alpha, TR, off_resonance=0.0, phase_increment=increment)
            for increment in FOUR_CYCLES
        ],
        axis=-1,
    )
    rng = np.random.default_rng(9)
    sigma = 0.03 * np.abs(clean).mean()
    noisy = clean + sigma * (rng.standard_normal((2000, 4, 2)) @ np.array([1.0, 1j]))
    geometric, b = geometric_off_resonance(noisy, FOUR_CYCLES, TR)
    fit = fit_ellipse(noisy, FOUR_CYCLES, TR)
    assert (b < 0).mean() > 0.05 and (fit.b < 0).mean() > 0.005
    for estimate in (geometric, fit.off_resonance):
        assert np.abs(estimate).max() < 15.0


@pytest.mark.parametrize("method", ["linear", "nonlinear"])
def test_despot2_with_finite_pulses_is_exact_on_its_model(method):
    """Both estimators use each flip angle's E1 (the linear one used their mean: up to 2 % off)."""
    t1 = np.array([0.85, 1.4, 1.5, 1.2, 4.0])
    t2 = np.array([0.07, 0.08, 0.2, 0.05, 2.0])
    b1 = np.array([1.0, 0.85, 1.2, 1.0, 1.1])
    frequency = np.array([0.0, 40.0, 90.0, -60.0, 20.0])
    signal = np.stack(
        [band_free_signal(1.0, 1 / t1, 1 / t2, flip, TR, b1=b1, pulse_duration=PULSE, off_resonance=frequency)
         for flip in FLIPS],
        axis=-1,
    )  # fmt: skip
    fit = fit_despot2(signal, FLIPS, TR, 1 / t1, b1=b1, pulse_duration=PULSE, off_resonance=frequency, method=method)
    np.testing.assert_allclose(fit.r2, 1 / t2, rtol=1e-9)


def test_planet_and_joint_fit_assume_instantaneous_pulses():
    """Measured bias with 1 ms pulses (documented in planet_relaxation and fit_bssfp_joint)."""
    frequencies = np.array([0.0, 30.0, 60.0, 90.0])
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        signals = np.stack([_cycles(t1, t2, flip, frequencies) for flip in FLIPS], axis=-2)
        ellipse = fit_ellipse(signals[:, 1], FOUR_CYCLES, TR)
        r1, r2 = planet_relaxation(ellipse.a, ellipse.b, FLIPS[1], TR)
        assert np.all(np.abs(r2 * t2 - 1) < 0.015), tissue
        assert np.all((r1 * t1 - 1 < -0.1) & (r1 * t1 - 1 > -0.7)), tissue
        joint = fit_bssfp_joint(signals, FLIPS, FOUR_CYCLES, TR, 1 / t1)
        assert np.all((joint.r2 * t2 - 1 < -0.04) & (joint.r2 * t2 - 1 > -0.15)), tissue
