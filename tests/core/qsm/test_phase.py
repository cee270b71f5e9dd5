"""Phase unwrapping against known phase: spatial unwrappers and echo-referenced unwrapping."""

import numpy as np
import pytest

from qmri_workflows.core.qsm.field import fit_field_linear
from qmri_workflows.core.qsm.phase import (
    unwrap_echoes,
    unwrap_laplacian,
    unwrap_region_growing,
    wrap_phase,
)
from tests.core.qsm._analytic import ball, nrmse, sample

N = 56
CENTRE = (N - 1) / 2
HZ_PER_PPM = 42.577478518 * 3.0
ECHO_TIMES = 4e-3 * np.arange(1, 7)  # 4 .. 24 ms


def _offset_by_constant_cycles(estimate, truth, mask):
    """True where estimate - truth is the same multiple of 2 pi everywhere in the mask."""
    cycles = (estimate - truth)[mask] / (2 * np.pi)
    integer = np.rint(cycles)
    return np.abs(cycles - integer).max() < 1e-6, np.mean(integer == np.median(integer))


def _smooth_background():
    x, y, z = np.meshgrid(*[np.arange(N) - CENTRE] * 3, indexing="ij")
    field_hz = 60 * x / CENTRE + 40 * (y / CENTRE) ** 2 - 20 * x * z / CENTRE**2
    offset = 1.0 + 2.5 * np.sin(x / 15.0) * np.cos(z / 20.0)
    return field_hz, offset


@pytest.fixture(scope="module")
def multi_echo():
    """Six echoes with wraps at every echo and a strong sphere (>pi steps at late echoes)."""
    rng = np.random.default_rng(3)
    mask = ball((N,) * 3, (CENTRE,) * 3, 25)
    _, source_ppm = sample(
        (N,) * 3,
        1.0,
        [("sphere", dict(centre=(CENTRE, CENTRE, CENTRE + 6), radius=4.0, chi=1.2))],
        (0, 0, 1),
        supersampling=1,
    )
    background_hz, offset = _smooth_background()
    field_hz = background_hz + HZ_PER_PPM * source_ppm
    true_phase = offset[..., None] + 2 * np.pi * field_hz[..., None] * ECHO_TIMES
    magnitude = np.ones((N,) * 3 + (len(ECHO_TIMES),)) * np.exp(-ECHO_TIMES * 20)
    noise = 0.01 * (rng.standard_normal(true_phase.shape) + 1j * rng.standard_normal(true_phase.shape))
    signal = magnitude * np.exp(1j * true_phase) + noise
    return dict(mask=mask, field=field_hz, true_phase=true_phase, signal=signal)


def test_wrap_phase_range():
    values = np.linspace(-20, 20, 1001)
    wrapped = wrap_phase(values)
    assert wrapped.min() >= -np.pi and wrapped.max() < np.pi
    np.testing.assert_allclose(np.rint((values - wrapped) / (2 * np.pi)), (values - wrapped) / (2 * np.pi), atol=1e-9)


def test_region_growing_keeps_true_values(multi_echo):
    mask = multi_echo["mask"]
    truth = multi_echo["true_phase"][..., 0]
    noisy = np.angle(multi_echo["signal"][..., 0])
    assert np.ptp(truth[mask]) > 2 * np.pi  # really wrapped
    unwrapped = unwrap_region_growing(noisy, magnitude=np.abs(multi_echo["signal"][..., 0]), mask=mask)
    exact, share = _offset_by_constant_cycles(unwrapped, truth + wrap_phase(noisy - truth), mask)
    assert exact and share == 1.0
    np.testing.assert_array_equal(unwrapped[~mask], noisy[~mask])


def test_region_growing_unwraps_each_region_separately():
    truth = np.zeros((20, 20, 20))
    truth[:, :, :9] = np.linspace(0, 12, 20)[:, None, None]
    truth[:, :, 11:] = np.linspace(-3, 9, 20)[None, :, None]
    mask = np.ones(truth.shape, bool)
    mask[:, :, 9:11] = False
    unwrapped = unwrap_region_growing(wrap_phase(truth), mask=mask)
    for region in (np.s_[:, :, :9], np.s_[:, :, 11:]):
        exact, share = _offset_by_constant_cycles(unwrapped[region], truth[region], mask[region])
        assert exact and share == 1.0


def test_laplacian_unwrapping_recovers_smooth_phase():
    background_hz, offset = _smooth_background()
    truth = offset + 2 * np.pi * background_hz * 8e-3
    unwrapped = unwrap_laplacian(wrap_phase(truth), 1.0)
    inner = ball(truth.shape, (CENTRE,) * 3, 20)
    # The Laplacian solution differs from the truth by a smooth harmonic function; its
    # congruent version is exact where that difference stays below pi.
    assert nrmse(unwrapped, truth, inner) < 5
    congruent = unwrap_laplacian(wrap_phase(truth), 1.0, congruent=True)
    exact, share = _offset_by_constant_cycles(congruent, truth, inner)
    assert exact and share > 0.99


@pytest.mark.parametrize("spatial_method", ["region_growing", "laplacian"])
def test_echo_referenced_beats_per_echo_spatial(multi_echo, spatial_method):
    mask, signal = multi_echo["mask"], multi_echo["signal"]
    phase, magnitude = np.angle(signal), np.abs(signal)
    truth = multi_echo["true_phase"]
    # The sphere makes true steps larger than pi between neighbours at the last echo only.
    for echo, expected in ((0, False), (-1, True)):
        steps = np.abs(np.diff(truth[..., echo], axis=2))[mask[:, :, 1:] & mask[:, :, :-1]]
        assert (steps.max() > np.pi) == expected
    unwrapped = unwrap_echoes(phase, ECHO_TIMES, magnitude=magnitude, mask=mask, spatial_method=spatial_method)
    noise_free = truth + wrap_phase(phase - truth)
    # One common multiple of 2 pi for every echo and voxel (true phase up to a constant).
    cycles = np.rint((unwrapped - noise_free)[mask] / (2 * np.pi))
    share_temporal = np.mean(cycles == np.median(cycles))
    per_echo = np.stack(
        [unwrap_region_growing(phase[..., e], magnitude=magnitude[..., e], mask=mask) for e in range(len(ECHO_TIMES))],
        axis=-1,
    )
    field_temporal, _, _ = fit_field_linear(unwrapped, ECHO_TIMES, magnitude=magnitude, mask=mask)
    field_per_echo, _, _ = fit_field_linear(per_echo, ECHO_TIMES, magnitude=magnitude, mask=mask)
    error_temporal = nrmse(field_temporal, multi_echo["field"], mask)
    error_per_echo = nrmse(field_per_echo, multi_echo["field"], mask)
    print(
        f"{spatial_method}: exact share {share_temporal:.5f}; field NRMSE echo-referenced "
        f"{error_temporal:.2f} %, per-echo spatial {error_per_echo:.2f} %"
    )
    assert share_temporal > 0.999
    assert error_temporal < 1.0
    assert error_per_echo > 5 * error_temporal


def test_unwrap_echoes_rejects_bad_echo_times(multi_echo):
    phase = np.zeros((4, 4, 4, 3))
    with pytest.raises(ValueError, match="echo_times"):
        unwrap_echoes(phase, [1e-3, 2e-3])
    with pytest.raises(ValueError, match="increase"):
        unwrap_echoes(phase, [1e-3, 3e-3, 2e-3])
    with pytest.raises(ValueError, match="spatial_method"):
        unwrap_echoes(phase, [1e-3, 2e-3, 3e-3], spatial_method="quality")


def test_combine_series_equals_the_complex_weighted_average():
    """The real-arithmetic combination equals the defining complex formula, offsets removed."""
    from qmri_workflows.core.qsm import combine_series

    rng = np.random.default_rng(3)
    shape = (9, 7, 5, 4)
    true_phase = rng.uniform(-np.pi, np.pi, shape)
    magnitudes = [rng.uniform(0.1, 2.0, shape) for _ in range(3)]
    offsets = [0.0, 1.3, -2.5]  # each series its own per-acquisition phase offset
    phases = [np.angle(np.exp(1j * (true_phase + offset))) for offset in offsets]
    magnitudes[1][0, 0, 0] = 0.0  # a voxel without signal in one series

    magnitude, phase = combine_series(magnitudes, phases, n_jobs=2)

    signals = [m * np.exp(1j * p) for m, p in zip(magnitudes, phases)]
    total = np.zeros(shape, complex)
    for signal in signals:
        offset = np.angle((signal * np.conj(signals[0])).sum(-1, keepdims=True))
        total += np.abs(signal) * signal * np.exp(-1j * offset)
    expected = total / np.sqrt(sum(np.abs(s) ** 2 for s in signals))
    assert magnitude.dtype == np.float32
    np.testing.assert_allclose(magnitude, np.abs(expected), rtol=1e-5)
    np.testing.assert_allclose(np.angle(np.exp(1j * (phase - np.angle(expected)))), 0, atol=1e-5)
    # the offsets are removed: the combined phase is the first series' phase
    np.testing.assert_allclose(np.angle(np.exp(1j * (phase - phases[0]))), 0, atol=1e-5)
