"""Field fits and units against known fields."""

import numpy as np
import pytest

from qmri_workflows.core.qsm.field import fit_field_complex, fit_field_linear
from qmri_workflows.core.qsm.referencing import hz_to_ppm, ppm_to_hz, reference_to_region

ECHO_TIMES = np.array([3e-3, 7e-3, 11e-3, 15e-3, 19e-3])


def _signal(n_voxels, noise_sd, seed=0):
    rng = np.random.default_rng(seed)
    field = rng.uniform(-40, 40, n_voxels)  # Hz, wraps at every echo
    offset = rng.uniform(-np.pi, np.pi, n_voxels)
    amplitude = rng.uniform(0.5, 1.0, n_voxels)[:, None] * np.exp(-ECHO_TIMES * 25)
    phase = offset[:, None] + 2 * np.pi * field[:, None] * ECHO_TIMES
    noise = noise_sd * (rng.standard_normal(phase.shape) + 1j * rng.standard_normal(phase.shape))
    return amplitude * np.exp(1j * phase) + noise, field, offset, phase


def test_linear_fit_is_exact_without_noise():
    signal, field, offset, phase = _signal(1000, 0.0)
    fitted, fitted_offset, sd = fit_field_linear(phase, ECHO_TIMES, magnitude=np.abs(signal))
    np.testing.assert_allclose(fitted, field, atol=1e-9)
    np.testing.assert_allclose(fitted_offset, offset, atol=1e-9)
    np.testing.assert_allclose(sd, 0, atol=1e-9)


@pytest.mark.parametrize("known_noise", [True, False])
def test_linear_fit_noise_sd_matches_scatter(known_noise):
    noise_sd = 0.02
    signal, field, _, phase = _signal(20000, noise_sd, seed=1)
    # Unwrap with the truth: only the noise is left to fit.
    measured = phase + np.angle(signal * np.exp(-1j * phase))
    fitted, _, sd = fit_field_linear(
        measured, ECHO_TIMES, magnitude=np.abs(signal), noise_sd=noise_sd if known_noise else None
    )
    error = fitted - field
    assert abs(np.mean(error / sd)) < 0.05
    # A per-voxel SD from 3 residual degrees of freedom is itself noisy (z would be t-distributed):
    # compare variances, which it estimates without bias.
    assert 0.9 < np.mean(error**2) / np.mean(sd**2) < 1.1


def test_fit_without_offset_uses_te_squared_weights():
    _, field, _, _ = _signal(100, 0.0)
    phase = 2 * np.pi * field[:, None] * ECHO_TIMES
    fitted, offset, _ = fit_field_linear(phase, ECHO_TIMES, fit_offset=False)
    np.testing.assert_allclose(fitted, field, atol=1e-9)
    assert np.all(offset == 0)


def test_complex_fit_recovers_field_from_wrapped_signal():
    noise_sd = 0.02
    signal, field, offset, _ = _signal(20000, noise_sd, seed=2)
    # Start from the echo-difference estimate: |field| < 1 / (2 * 4 ms) = 125 Hz, so no alias.
    fitted, fitted_offset, sd = fit_field_complex(signal, ECHO_TIMES, noise_sd=noise_sd)
    z = (fitted - field) / sd
    assert abs(np.mean(z)) < 0.05
    assert 0.9 < np.std(z) < 1.1
    _, _, estimated_sd = fit_field_complex(signal, ECHO_TIMES)
    assert 0.9 < np.mean((fitted - field) ** 2) / np.mean(estimated_sd**2) < 1.1
    assert np.abs(np.angle(np.exp(1j * (fitted_offset - offset)))).max() < 0.3
    # From a start one alias away it stays in that alias: the start picks the branch.
    shifted, _, _ = fit_field_complex(signal, ECHO_TIMES, initial_field=field + 250.0)
    np.testing.assert_allclose(np.median(shifted - field), 250.0, atol=0.5)


def test_complex_fit_needs_complex_signal():
    with pytest.raises(ValueError, match="complex"):
        fit_field_complex(np.ones((3, 5)), ECHO_TIMES)
    with pytest.raises(ValueError, match="echo_times"):
        fit_field_linear(np.ones((3, 4)), ECHO_TIMES)


def test_units_and_referencing():
    assert hz_to_ppm(127.732435554, 3.0) == pytest.approx(1.0)
    assert ppm_to_hz(hz_to_ppm(50.0, 7.0), 7.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="b0_tesla"):
        hz_to_ppm(1.0, 0.0)
    chi = np.arange(27, dtype=float).reshape(3, 3, 3)
    reference = np.zeros((3, 3, 3), bool)
    reference[0, 0, :2] = True
    referenced, value = reference_to_region(chi, reference)
    assert value == pytest.approx(0.5)
    assert referenced[reference].mean() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no voxel"):
        reference_to_region(chi, np.zeros((3, 3, 3), bool))
