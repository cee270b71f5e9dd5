"""Tests of the steady-state signal models against closed forms and Bloch simulations."""

import numpy as np
import pytest

from qmri_workflows.core.signal import afi_signals, bssfp_signal, multi_echo_phase, spgr_signal


def _rotation_x(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def _rotation_z(angle):
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _bssfp_pulse_train(m0, r1, r2, alpha, tr, theta, increment, n_pulses=4000):
    """Bloch simulation of an RF pulse train with RF phase n (pi + increment).

    Works in the frame rotating at the Larmor frequency of the nominal field;
    each pulse is a rotation about an axis in the transverse plane at the RF
    phase, the receiver demodulates by that phase. Returns the complex signal
    at TE = TR/2 after the last pulse, rotated by -i (excitation axis).
    """
    e1, e2 = np.exp(-tr * r1), np.exp(-tr * r2)
    relax_half = np.diag([np.sqrt(e2), np.sqrt(e2), np.sqrt(e1)])
    precess_half = _rotation_z(theta / 2)
    recovery_half = np.array([0.0, 0.0, m0 * (1 - np.sqrt(e1))])
    magnetisation = np.array([0.0, 0.0, m0])
    for n in range(n_pulses):
        rf_phase = n * (np.pi + increment)
        pulse = _rotation_z(rf_phase) @ _rotation_x(alpha) @ _rotation_z(-rf_phase)
        magnetisation = pulse @ magnetisation
        if n == n_pulses - 1:
            break
        for _ in range(2):
            magnetisation = relax_half @ (precess_half @ magnetisation) + recovery_half
    echo = relax_half @ (precess_half @ magnetisation) + recovery_half
    transverse = (echo[0] + 1j * echo[1]) * np.exp(-1j * rf_phase)
    return -1j * transverse


def test_spgr_matches_ernst_and_decay():
    m0, r1, r2star, tr = 2.0, 1.0, 20.0, 0.025
    alpha = np.deg2rad(np.array([6.0, 21.0]))
    te = np.array([0.0, 0.01])
    e1 = np.exp(-tr * r1)
    expected = m0 * np.sin(alpha) * (1 - e1) / (1 - e1 * np.cos(alpha)) * np.exp(-te * r2star)
    np.testing.assert_allclose(spgr_signal(m0, r1, r2star, alpha, tr, te), expected, rtol=1e-14)
    # b1 scales the flip angle, the Ernst angle maximises the TE = 0 signal
    np.testing.assert_allclose(spgr_signal(m0, r1, r2star, alpha / 2, tr, te, b1=2.0), expected, rtol=1e-14)
    grid = np.linspace(0.01, 0.6, 2001)
    best = grid[np.argmax(spgr_signal(1.0, r1, 0.0, grid, tr, 0.0))]
    assert abs(best - np.arccos(e1)) < 1e-3


def test_spgr_broadcasts_voxels_by_echoes():
    r1 = np.full((3, 4), 1.2)
    te = np.linspace(0.002, 0.02, 5)
    out = spgr_signal(1.0, r1[..., None], 25.0, 0.3, 0.02, te)
    assert out.shape == (3, 4, 5)
    with pytest.raises(ValueError, match="tr must be > 0"):
        spgr_signal(1.0, 1.0, 1.0, 0.3, 0.0, 0.0)


def test_bssfp_on_resonance_closed_form():
    m0, tr = 1.5, 0.005
    r1 = np.array([1.0, 0.6, 0.25])
    r2 = np.array([14.0, 10.0, 0.6])
    alpha = np.deg2rad(np.array([15.0, 50.0, 35.0]))
    e1, e2 = np.exp(-tr * r1), np.exp(-tr * r2)
    expected = m0 * (1 - e1) * np.sin(alpha) * np.sqrt(e2) / (1 - e1 * e2 - (e1 - e2) * np.cos(alpha))
    signal = bssfp_signal(m0, r1, r2, alpha, tr)
    np.testing.assert_allclose(signal.real, expected, rtol=1e-13)
    np.testing.assert_allclose(signal.imag, 0.0, atol=1e-15)


@pytest.mark.parametrize(
    ("theta", "increment", "alpha_deg", "b1"),
    [
        (0.0, 0.0, 30.0, 1.0),
        (0.4, 0.0, 30.0, 1.0),
        (-1.3, np.pi / 2, 50.0, 0.9),
        (2.2, np.pi, 15.0, 1.1),
        (np.pi, 3 * np.pi / 2, 40.0, 1.0),
    ],
)
def test_bssfp_matches_bloch_pulse_train(theta, increment, alpha_deg, b1):
    # T1 = 0.8 s, TR = 5 ms: 4000 pulses = 25 T1, far beyond the approach to steady state
    m0, r1, r2, tr = 1.0, 1.25, 14.0, 0.005
    alpha = np.deg2rad(alpha_deg)
    simulated = _bssfp_pulse_train(m0, r1, r2, b1 * alpha, tr, theta, increment)
    model = bssfp_signal(m0, r1, r2, alpha, tr, off_resonance=theta, phase_increment=increment, b1=b1)
    np.testing.assert_allclose(model, simulated, rtol=1e-9, atol=1e-12)


def test_bssfp_phase_cycles_lie_on_ellipse_shifted_by_increment():
    # shifting the increment and the off-resonance together changes only the e^{i theta/2} factor
    args = (1.0, 1.0, 12.0, 0.5, 0.005)
    a = bssfp_signal(*args, off_resonance=0.3, phase_increment=0.0)
    b = bssfp_signal(*args, off_resonance=0.3 + np.pi / 2, phase_increment=np.pi / 2)
    np.testing.assert_allclose(b, a * np.exp(0.5j * np.pi / 2), rtol=1e-13)
    cycles = bssfp_signal(*args, off_resonance=0.7, phase_increment=np.deg2rad([0, 90, 180, 270]))
    assert cycles.shape == (4,)


def _afi_pulse_train(m0, r1, alpha, tr1, tr2, n_pairs=400):
    magnetisation_z = m0
    e1, e2 = np.exp(-tr1 * r1), np.exp(-tr2 * r1)
    for _ in range(n_pairs):
        s1 = magnetisation_z * np.sin(alpha)
        magnetisation_z = m0 + (magnetisation_z * np.cos(alpha) - m0) * e1
        s2 = magnetisation_z * np.sin(alpha)
        magnetisation_z = m0 + (magnetisation_z * np.cos(alpha) - m0) * e2
    return s1, s2


def test_afi_matches_spoiled_pulse_train():
    m0, r1, tr1, tr2 = 1.0, 1.0, 0.02, 0.1
    for alpha in np.deg2rad([20.0, 60.0, 85.0]):
        s1, s2 = afi_signals(m0, r1, 0.0, alpha, tr1, tr2, 0.0)
        ref1, ref2 = _afi_pulse_train(m0, r1, alpha, tr1, tr2)
        np.testing.assert_allclose([s1, s2], [ref1, ref2], rtol=1e-10)


def test_afi_ratio_recovers_flip_angle():
    tr1, tr2 = 0.02, 0.1
    n = tr2 / tr1
    nominal = np.deg2rad(60.0)
    b1 = np.linspace(0.6, 1.4, 9)
    # nearly infinite T1: the first-order formula is exact in the limit TR/T1 -> 0
    s1, s2 = afi_signals(1.0, 1e-4, 30.0, nominal, tr1, tr2, 0.0025, b1=b1)
    alpha = np.arccos((s2 / s1 * n - 1) / (n - s2 / s1))
    np.testing.assert_allclose(alpha / nominal, b1, rtol=1e-4)
    # brain T1 (0.6-4 s): the second-order bias stays below 1 % here (0.8 % at R1 = 1.7 1/s, b1 = 1.4)
    for r1 in (0.25, 1.0, 1.7):
        s1, s2 = afi_signals(1.0, r1, 30.0, nominal, tr1, tr2, 0.0025, b1=b1)
        alpha = np.arccos((s2 / s1 * n - 1) / (n - s2 / s1))
        np.testing.assert_allclose(alpha / nominal, b1, rtol=0.01)


def test_multi_echo_phase_wraps_and_is_linear():
    te = np.array([0.0023, 0.0046, 0.0069])
    field = np.array([[10.0, -35.0], [200.0, 0.0]])
    offset = np.array([[0.5, -3.0], [3.1, 0.0]])
    phase = multi_echo_phase(field, te, offset)
    assert phase.shape == (2, 2, 3)
    assert np.all(phase > -np.pi) and np.all(phase <= np.pi)
    np.testing.assert_allclose(
        np.exp(1j * phase), np.exp(1j * (offset[..., None] + 2 * np.pi * field[..., None] * te)), atol=1e-12
    )
    np.testing.assert_allclose(multi_echo_phase(0.0, 0.01, np.pi), np.pi)
    np.testing.assert_allclose(multi_echo_phase(0.0, 0.01, -np.pi), np.pi)  # (-pi, pi]: -pi maps to pi
    with pytest.raises(ValueError, match="shape"):
        multi_echo_phase(1.0, np.ones((2, 2)))
