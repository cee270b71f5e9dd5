"""Tests of the R2* Cramér-Rao bounds: closed form for two echoes and finite-difference Fisher."""

import numpy as np
import pytest

from qmri_workflows.core import crlb

ECHO_TIMES = np.array([2.3, 4.6, 6.9, 9.2, 11.5, 13.8, 16.1, 18.4]) * 1e-3


def _numeric_fisher(s0, r2star, echo_times, sigma, step=1e-6):
    """Fisher information J^T J / sigma^2 with a central finite-difference Jacobian."""
    params = np.append(np.asarray(s0, float), r2star)
    n_contrast = len(s0)

    def model(p):
        return np.concatenate([p[c] * np.exp(-p[-1] * echo_times[c]) for c in range(n_contrast)])

    columns = []
    for k in range(params.size):
        delta = np.zeros_like(params)
        delta[k] = step * max(abs(params[k]), 1.0)
        columns.append((model(params + delta) - model(params - delta)) / (2 * delta[k]))
    jac = np.stack(columns, axis=-1)
    return jac.T @ jac / sigma**2


def test_two_echo_closed_form():
    # Two echoes: R2* = ln(S1/S2) / dTE, so var = sigma^2 (1/S1^2 + 1/S2^2) / dTE^2 exactly.
    s0, r2star, sigma = 150.0, 25.0, 2.0
    te = np.array([3e-3, 15e-3])
    s1, s2 = s0 * np.exp(-r2star * te)
    expected = sigma * np.sqrt(1 / s1**2 + 1 / s2**2) / (te[1] - te[0])
    assert crlb.r2star_crlb(s0, r2star, te, sigma) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("s0", [[100.0], [100.0, 60.0], [80.0, 120.0, 40.0]])
@pytest.mark.parametrize("r2star", [5.0, 20.0, 100.0])
def test_matches_finite_difference_fisher(s0, r2star):
    sigma = 1.7
    te = np.broadcast_to(ECHO_TIMES, (len(s0), ECHO_TIMES.size))
    fisher = _numeric_fisher(s0, r2star, te, sigma)
    expected = np.sqrt(np.linalg.inv(fisher)[-1, -1])
    actual = crlb.estatics_crlb(np.array(s0), r2star, ECHO_TIMES, sigma)
    assert actual == pytest.approx(expected, rel=1e-6)
    analytic_fisher = crlb.estatics_fisher_information(np.array(s0), r2star, ECHO_TIMES, sigma)
    np.testing.assert_allclose(analytic_fisher, fisher, rtol=1e-6)


def test_vectorised_over_voxels_and_sigma_map():
    s0 = np.array([[100.0, 50.0], [200.0, 10.0], [30.0, 30.0]])
    r2star = np.array([10.0, 30.0, 60.0])
    sigma = np.array([1.0, 2.0, 0.5])
    result = crlb.estatics_crlb(s0, r2star, ECHO_TIMES, sigma)
    for i in range(3):
        single = crlb.estatics_crlb(s0[i], r2star[i], ECHO_TIMES, sigma[i])
        assert result[i] == pytest.approx(single)


def test_single_contrast_equals_estatics_with_one_contrast_and_more_contrasts_help():
    single = crlb.r2star_crlb(100.0, 20.0, ECHO_TIMES, 1.0)
    assert single == pytest.approx(crlb.estatics_crlb(np.array([100.0]), 20.0, ECHO_TIMES, 1.0))
    # A second identical contrast doubles the information: SD / sqrt(2).
    joint = crlb.estatics_crlb(np.array([100.0, 100.0]), 20.0, ECHO_TIMES, 1.0)
    assert joint == pytest.approx(single / np.sqrt(2), rel=1e-12)


def test_nan_echoes_are_dropped():
    te = np.array([ECHO_TIMES, np.where(np.arange(8) < 6, ECHO_TIMES, np.nan)])
    with_nan = crlb.estatics_crlb(np.array([100.0, 70.0]), 20.0, te, 1.0)
    fisher = _numeric_fisher([100.0, 70.0], 20.0, [ECHO_TIMES, ECHO_TIMES[:6]], 1.0)
    assert with_nan == pytest.approx(np.sqrt(np.linalg.inv(fisher)[-1, -1]), rel=1e-6)


def test_invalid_shapes_raise():
    with pytest.raises(ValueError, match="echo_times"):
        crlb.estatics_crlb(np.ones((4, 2)), 20.0, np.ones((3, 8)) * 1e-3, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        crlb.r2star_crlb(100.0, 20.0, ECHO_TIMES, 0.0)


def test_per_voxel_missing_echoes():
    # Echo times with a voxel axis: each voxel drops its own samples, as separate calls would.
    s0 = np.array([[100.0, 70.0], [80.0, 50.0], [60.0, 90.0]])
    r2star = np.array([20.0, 35.0, 10.0])
    te = np.broadcast_to(ECHO_TIMES, (3, 2, 8)).copy()
    te[0, 1, 5:] = np.nan
    te[1, 0, ::2] = np.nan
    te[2, 0, 1:] = np.nan  # one echo left in the first contrast: it adds nothing on R2*
    information = crlb.estatics_r2star_information(s0, r2star, te)
    for voxel in range(3):
        single = crlb.estatics_crlb(s0[voxel], r2star[voxel], te[voxel], 1.0)
        assert information[voxel] == pytest.approx(single**-2, rel=1e-12)
    second_only = crlb.estatics_crlb(s0[2, 1:], r2star[2], ECHO_TIMES, 1.0)
    assert information[2] == pytest.approx(second_only**-2, rel=1e-9)


@pytest.mark.parametrize("s0", [[100.0], [100.0, 60.0], [80.0, 120.0, 40.0]])
@pytest.mark.parametrize("r2star", [5.0, 40.0])
def test_intercept_covariance_is_the_intercept_block_of_the_inverse_fisher(s0, r2star):
    sigma = 1.7
    te = np.array([ECHO_TIMES] * len(s0))
    te[-1, 5:] = np.nan  # a shorter last contrast
    finite_te = [row[np.isfinite(row)] for row in te]
    expected = np.linalg.inv(_numeric_fisher(s0, r2star, finite_te, sigma))[:-1, :-1]
    actual = crlb.estatics_intercept_covariance(np.array(s0), r2star, te, sigma=sigma)
    np.testing.assert_allclose(actual, expected, rtol=1e-6)


def test_intercept_covariance_from_the_r2star_standard_error_equals_the_one_from_sigma():
    # A fit whose R2* standard error is the bound for noise SD sigma has noise SD sigma.
    s0 = np.array([[100.0, 60.0], [30.0, 90.0]])
    r2star = np.array([20.0, 55.0])
    sigma = np.array([1.7, 0.4])
    stderr = crlb.estatics_crlb(s0, r2star, ECHO_TIMES, sigma)
    from_stderr = crlb.estatics_intercept_covariance(s0, r2star, ECHO_TIMES, r2star_stderr=stderr)
    from_sigma = crlb.estatics_intercept_covariance(s0, r2star, ECHO_TIMES, sigma=sigma)
    np.testing.assert_allclose(from_stderr, from_sigma, rtol=1e-10)


def test_intercept_covariance_is_nan_for_a_contrast_without_echoes():
    te = np.array([ECHO_TIMES, np.full(8, np.nan)])
    covariance = crlb.estatics_intercept_covariance(np.array([100.0, 60.0]), 20.0, te, sigma=1.0)
    assert np.isnan(covariance).all()
