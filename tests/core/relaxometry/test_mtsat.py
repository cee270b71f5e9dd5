"""MTsat (Helms 2008) against closed-form signals, with and without transmit-field errors."""

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.mtsat import HELMS_B1_COEFFICIENT, mtsat

# hMRI-style MPM protocol: MTw 6 deg, PDw 6 deg, T1w 21 deg, TR 25 ms
FLIPS = np.radians([6.0, 6.0, 21.0])
TRS = (0.025, 0.025, 0.025)
M0, R1 = 1000.0, np.array([0.24, 0.65, 1.05])
DELTA = np.array([0.002, 0.012, 0.018])  # MT saturation per TR (0.2-1.8 p.u.: CSF, GM, WM)


def _rational(alpha, tr, r1, delta=0.0):
    """Helms's rational approximation of the FLASH signal, with MT saturation delta."""
    return M0 * alpha * r1 * tr / (r1 * tr + alpha**2 / 2 + delta)


def _exact(alpha, tr, r1, delta=0.0):
    """Steady state with a fraction delta of Mz removed before each excitation (Ernst equation + MT)."""
    e1 = np.exp(-r1 * tr)
    return M0 * np.sin(alpha) * (1 - e1) / (1 - (1 - delta) * e1 * np.cos(alpha))


def _signals(model, b1=1.0, delta=DELTA):
    actual = FLIPS * np.asarray(b1)[..., None] if np.ndim(b1) else FLIPS * b1
    if np.ndim(b1):
        return (
            model(actual[..., 0], TRS[0], R1, delta),
            model(actual[..., 1], TRS[1], R1),
            model(actual[..., 2], TRS[2], R1),
        )
    return model(actual[0], TRS[0], R1, delta), model(actual[1], TRS[1], R1), model(actual[2], TRS[2], R1)


def test_exact_inversion_of_the_rational_approximation():
    result = mtsat(*_signals(_rational), FLIPS, TRS)
    np.testing.assert_allclose(result.mtsat, 100 * DELTA, rtol=1e-9)
    np.testing.assert_allclose(result.r1, R1, rtol=1e-9)
    np.testing.assert_allclose(result.amplitude, M0, rtol=1e-9)


def test_close_to_the_truth_with_the_exact_steady_state():
    result = mtsat(*_signals(_exact), FLIPS, TRS)
    error = result.mtsat - 100 * DELTA
    print(f"\nMTsat from the exact steady state: error {np.round(error, 3)} p.u. for truth {100 * DELTA} p.u.")
    assert np.all(np.abs(error) < 0.1)  # p.u.: the rational approximation at 6/21 deg


def test_nominal_angles_cancel_a_quadratic_b1_dependence_and_the_empirical_factor_is_applied():
    b1 = np.array([0.8, 1.0, 1.2])[:, None]
    # the MT pulse saturates ~ B1^2 in its linear regime
    mt, pd, t1 = _signals(_rational, b1=np.broadcast_to(b1, (3, 3)), delta=DELTA * b1**2)
    uncorrected = mtsat(mt, pd, t1, FLIPS, TRS)
    np.testing.assert_allclose(uncorrected.mtsat, np.broadcast_to(100 * DELTA, (3, 3)), rtol=1e-9)
    corrected = mtsat(mt, pd, t1, FLIPS, TRS, b1=b1)
    factor = (1 - HELMS_B1_COEFFICIENT) / (1 - HELMS_B1_COEFFICIENT * b1)
    np.testing.assert_allclose(corrected.mtsat, uncorrected.mtsat * factor, rtol=1e-12)
    # B1 > 1: the MT pulse saturates less than quadratically, the correction raises MTsat
    assert np.all(corrected.mtsat[2] > uncorrected.mtsat[2]) and np.allclose(corrected.mtsat[1], uncorrected.mtsat[1])


def test_bad_protocols_get_a_clear_error():
    signals = _signals(_rational)
    with pytest.raises(ValueError, match="radians, not degrees"):
        mtsat(*signals, np.degrees(FLIPS), TRS)
    with pytest.raises(ValueError, match="larger than the PD-weighted"):
        mtsat(*signals, FLIPS[[0, 2, 1]], TRS)
    with pytest.raises(ValueError, match="positive seconds"):
        mtsat(*signals, FLIPS, (0.025, 0.0, 0.025))


def test_exact_inversion_with_three_different_flip_angles_and_repetition_times():
    # Equal TRs and equal MT/PD angles (the protocol above) hide any swap of TR or angle.
    flips, trs = np.radians([5.0, 7.0, 18.0]), (0.031, 0.024, 0.019)
    mt, pd, t1 = (_rational(flips[i], trs[i], R1, DELTA if i == 0 else 0.0) for i in range(3))
    result = mtsat(mt, pd, t1, flips, trs)
    np.testing.assert_allclose(result.mtsat, 100 * DELTA, rtol=1e-9)
    np.testing.assert_allclose(result.r1, R1, rtol=1e-9)
    np.testing.assert_allclose(result.amplitude, M0, rtol=1e-9)


def test_non_positive_signals_and_non_positive_r1_give_nan():
    mt, pd, t1 = _signals(_rational)
    result = mtsat(np.array([0.0, -mt[1], mt[2]]), pd, t1, FLIPS, TRS)
    assert np.isnan(result.mtsat[:2]).all() and np.isfinite(result.mtsat[2])
    # a T1-weighted signal too large for the PD-weighted one (R1 < 0), e.g. misregistered images
    swapped = mtsat(mt, pd, pd * FLIPS[2] / FLIPS[1] * 1.01, FLIPS, TRS)
    assert np.isnan(swapped.mtsat).all() and np.isnan(swapped.r1).all()
