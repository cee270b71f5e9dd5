"""Band-free bSSFP signal, ellipse fit, PLANET and DESPOT2 (qmri_workflows.core.bssfp)."""

import time

import numpy as np
import pytest

from qmri_workflows.core.bssfp import (
    band_free_signal,
    complex_sum,
    despot2_crlb,
    finite_pulse_equivalent,
    fit_bssfp_joint,
    fit_despot2,
    fit_ellipse,
    geometric_off_resonance,
    geometric_solution,
    magnitude_combination,
    planet_relaxation,
)
from qmri_workflows.core.signal import bssfp_signal

TR = 0.005
TISSUES = {"wm": (0.85, 0.07), "gm": (1.4, 0.08), "lesion": (1.5, 0.2)}
FLIPS = np.deg2rad([15.0, 50.0])
# A full 1/TR range of off-resonance, finely sampled.
FREQUENCIES = np.linspace(-1 / (2 * TR), 1 / (2 * TR), 128, endpoint=False)


def _cycles(n_cycle):
    return np.deg2rad(np.arange(n_cycle) * 360.0 / n_cycle)


def _phase_cycled(t1, t2, increments, frequencies, *, m0=1.0, b1=1.0, transceive_phase=0.7):
    """Complex signals (n_frequency, n_flip, n_cycle) of one isochromat per voxel."""
    theta = 2 * np.pi * np.asarray(frequencies)[:, None, None] * TR
    signal = bssfp_signal(
        m0, 1 / t1, 1 / t2, FLIPS[:, None], TR, off_resonance=theta, phase_increment=increments, b1=b1
    )
    return signal * np.exp(1j * transceive_phase)


def _modulation(values):
    """Peak-to-peak over the frequency axis (0) relative to the mean."""
    values = np.abs(values)
    return np.ptp(values, axis=0) / values.mean(axis=0)


# --------------------------------------------------------------------------------------------
# Band-free signal
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cycle", [4, 8])
@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_geometric_solution_is_band_free(n_cycle, tissue):
    t1, t2 = TISSUES[tissue]
    increments = _cycles(n_cycle)
    signals = _phase_cycled(t1, t2, increments, FREQUENCIES, b1=1.1)
    band_free, weight = geometric_solution(signals, increments, return_weight=True)
    assert np.all(weight == 1.0)  # noiseless, one isochromat: never regularised
    assert np.all(_modulation(band_free) < 0.02)
    np.testing.assert_allclose(
        np.abs(band_free),
        band_free_signal(1.0, 1 / t1, 1 / t2, FLIPS, TR, b1=1.1) * np.ones((FREQUENCIES.size, 1)),
        rtol=1e-10,
    )
    # The complex sum is not band-free with four cycles (residual modulation of several percent)
    if n_cycle == 4:
        assert np.max(_modulation(complex_sum(signals))) > 0.02


@pytest.mark.parametrize("n_cycle", [4, 8])
def test_magnitude_only_combinations_keep_a_modulation(n_cycle):
    t1, t2 = TISSUES["wm"]
    increments = _cycles(n_cycle)
    magnitudes = np.abs(_phase_cycled(t1, t2, increments, FREQUENCIES))
    rms = _modulation(magnitude_combination(magnitudes, method="rms"))
    peak = _modulation(magnitude_combination(magnitudes, method="max"))
    print(
        f"\n{n_cycle} cycles, WM, flips 15/50 deg: residual modulation RMS {np.round(100 * rms, 2)} %, "
        f"MIP {np.round(100 * peak, 2)} %"
    )
    assert np.max(peak) > 0.005  # magnitude-only data are never band-free
    with pytest.raises(ValueError, match="'rms' or 'max'"):
        magnitude_combination(magnitudes, method="mean")


def test_geometric_solution_falls_back_to_the_complex_sum_when_ill_conditioned():
    increments = _cycles(4)
    # Four collinear points: the two chords are parallel, the intersection undefined.
    collinear = np.array([[1.0, 2.0, 3.0, 2.5]]) * np.exp(0.3j)
    # A noisy voxel whose chords (at 11 degrees) cross beyond the largest magnitude (at 1.5).
    outside = np.array([[1.0, 1.0 + 0.1j, 1.1, 1.1 + 0.08j]])
    for signals in (collinear, outside):
        band_free, weight = geometric_solution(signals, increments, return_weight=True)
        assert weight[0] == 0.0
        np.testing.assert_allclose(band_free, signals.mean(axis=-1), rtol=1e-12)
    zeros = geometric_solution(np.zeros((3, 4), complex), increments)
    np.testing.assert_array_equal(zeros, 0.0)


def test_geometric_solution_checks_its_input():
    signals = np.ones((2, 4), complex)
    with pytest.raises(ValueError, match="opposite pairs"):
        geometric_solution(signals, np.deg2rad([0, 90, 180, 200]))
    with pytest.raises(ValueError, match="radians"):
        geometric_solution(signals, [0, 90, 180, 270])
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        geometric_solution(signals, _cycles(6))
    with pytest.raises(ValueError, match="at least 4"):
        geometric_solution(signals[:, :2], _cycles(2))


def test_geometric_solution_chunks_and_mask():
    t1, t2 = TISSUES["gm"]
    increments = _cycles(4)
    signals = _phase_cycled(t1, t2, increments, FREQUENCIES).reshape(16, 8, 2, 4)
    mask = np.zeros((16, 8, 2), bool)
    mask[::3] = True
    whole = geometric_solution(signals, increments)
    chunked = geometric_solution(signals, increments, mask=mask, chunk_size=7, n_jobs=2)
    np.testing.assert_allclose(chunked[mask], whole[mask], rtol=1e-14)
    assert np.all(chunked[~mask] == 0)


@pytest.mark.parametrize("n_cycle", [4, 8])
def test_geometric_off_resonance_is_exact_and_cheaper_than_the_fit(n_cycle):
    increments = _cycles(n_cycle)
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        signals = _phase_cycled(t1, t2, increments, FREQUENCIES, b1=1.1)
        off_resonance, b = geometric_off_resonance(signals, increments, TR)
        wrapped = np.angle(np.exp(2j * np.pi * (off_resonance - FREQUENCIES[:, None]) * TR))
        np.testing.assert_allclose(wrapped, 0.0, atol=1e-10, err_msg=tissue)
        np.testing.assert_allclose(b, fit_ellipse(signals, increments, TR).b, rtol=1e-9)
    # with noise both are unbiased; the fit is the more precise (report)
    rng = np.random.default_rng(4)
    sigma = 0.0005
    t1, t2 = TISSUES["wm"]
    clean = _phase_cycled(t1, t2, increments, FREQUENCIES[::8])
    noisy = clean + sigma * (rng.standard_normal((100,) + clean.shape + (2,)) @ np.array([1.0, 1j]))
    geometric, _ = geometric_off_resonance(noisy, increments, TR)
    fitted = fit_ellipse(noisy, increments, TR).off_resonance
    errors = [
        np.angle(np.exp(2j * np.pi * (estimate - FREQUENCIES[::8, None]) * TR)) / (2 * np.pi * TR)
        for estimate in (geometric, fitted)
    ]
    spread = [np.std(error, axis=(0, 1)) for error in errors]
    assert np.all(np.abs([np.mean(error) for error in errors]) < 0.2)
    assert np.all(spread[0] < 5.0)
    print(
        f"\n{n_cycle} cycles, WM, sigma {sigma}: off-resonance SD (Hz) per flip angle, closed form "
        f"{np.round(spread[0], 2)}, ellipse fit {np.round(spread[1], 2)}"
    )


# --------------------------------------------------------------------------------------------
# Ellipse fit and PLANET
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cycle", [3, 4, 8])
@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_ellipse_fit_and_planet_recover_noiseless_parameters(n_cycle, tissue):
    t1, t2 = TISSUES[tissue]
    increments = _cycles(n_cycle) + 0.1  # any distinct increments
    b1 = 0.9
    signals = _phase_cycled(t1, t2, increments, FREQUENCIES, b1=b1)
    for flip_index, flip in enumerate(FLIPS):
        fit = fit_ellipse(signals[:, flip_index], increments, TR)
        np.testing.assert_allclose(fit.a, np.exp(-TR / t2), rtol=1e-8)
        wrapped = np.angle(np.exp(2j * np.pi * (fit.off_resonance - FREQUENCIES) * TR))
        np.testing.assert_allclose(wrapped, 0.0, atol=1e-8)
        np.testing.assert_allclose(
            np.abs(fit.amplitude), band_free_signal(1.0, 1 / t1, 1 / t2, flip, TR, b1=b1), rtol=1e-8
        )
        r1, r2 = planet_relaxation(fit.a, fit.b, flip, TR, b1=b1)
        np.testing.assert_allclose(r1, 1 / t1, rtol=1e-5)
        np.testing.assert_allclose(r2, 1 / t2, rtol=1e-6)  # -ln(a) amplifies a's rounding


def test_ellipse_fit_flags_a_spread_of_frequencies():
    t1, t2 = TISSUES["wm"]
    increments = _cycles(8)
    single = _phase_cycled(t1, t2, increments, [20.0])[:, 1]
    spread = _phase_cycled(t1, t2, increments, np.linspace(-20, 60, 41))[:, 1].mean(axis=0)
    fits = fit_ellipse(np.stack([single[0], spread]), increments, TR)
    assert fits.rms_residual[0] < 1e-10 * np.abs(single).max()
    assert fits.rms_residual[1] > 1e-4 * np.abs(spread).max()


# --------------------------------------------------------------------------------------------
# DESPOT2
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["linear", "nonlinear"])
@pytest.mark.parametrize("n_cycle", [4, 8])
def test_despot2_noiseless_recovery(method, n_cycle):
    increments = _cycles(n_cycle)
    b1 = np.linspace(0.8, 1.2, FREQUENCIES.size)
    for tissue, (t1, t2) in TISSUES.items():
        signals = _phase_cycled(t1, t2, increments, FREQUENCIES, m0=1500.0, b1=b1[:, None, None])
        band_free = geometric_solution(signals, increments)
        fit = fit_despot2(band_free, FLIPS, TR, np.full(b1.shape, 1 / t1), b1=b1, method=method, chunk_size=50)
        assert np.max(np.abs(fit.r2 * t2 - 1)) < 0.02, tissue
        np.testing.assert_allclose(fit.r2, 1 / t2, rtol=1e-8)
        np.testing.assert_allclose(fit.amplitude, 1500.0 * np.exp(-TR / t2 / 2), rtol=1e-8)


def test_despot2_three_flips_estimates_its_own_error():
    t1, t2 = TISSUES["gm"]
    flips = np.deg2rad([10.0, 30.0, 60.0])
    rng = np.random.default_rng(3)
    signal = band_free_signal(1.0, 1 / t1, 1 / t2, flips, TR)
    sigma = 0.002
    noisy = signal + sigma * rng.standard_normal((4000, 3))
    fit = fit_despot2(noisy, flips, TR, 1 / t1)
    bound = despot2_crlb(1.0, 1 / t1, 1 / t2, flips, TR, sigma)
    assert abs(np.std(fit.r2) / bound - 1) < 0.3
    # residual-based standard error, averaged, is the bound (unbiased noise variance estimate)
    assert abs(np.sqrt(np.mean(fit.r2_se**2)) / bound - 1) < 0.1
    two_flips = fit_despot2(noisy[:, :2], flips[:2], TR, 1 / t1)
    assert np.all(np.isnan(two_flips.r2_se))


def test_despot2_crlb_matches_a_numerical_fisher_matrix():
    t1, t2 = TISSUES["lesion"]
    sigma = np.array([0.001, 0.003])
    step = 1e-4

    def model(amplitude, r2):
        # amplitude = M0 sqrt(E2) is free; R2 enters through the denominator
        return amplitude * band_free_signal(1.0, 1 / t1, r2, FLIPS, TR) / np.exp(-TR * r2 / 2)

    amplitude = np.exp(-TR / t2 / 2)
    jac = np.stack(
        [model(1.0, 1 / t2), (model(amplitude, 1 / t2 + step) - model(amplitude, 1 / t2 - step)) / (2 * step)], axis=-1
    )
    fisher = jac.T @ np.diag(1 / sigma**2) @ jac
    expected = np.sqrt(np.linalg.inv(fisher)[1, 1])
    np.testing.assert_allclose(despot2_crlb(1.0, 1 / t1, 1 / t2, FLIPS, TR, sigma), expected, rtol=1e-6)


def _band_free_noise_gain(signals, increments, step=1e-7):
    """d|GS| / d(each real input) by central differences: the GS noise SD is sigma * norm."""
    gains = np.zeros(signals.shape[:-1])
    for cycle in range(signals.shape[-1]):
        for direction in (step, 1j * step):
            plus, minus = signals.copy(), signals.copy()
            plus[..., cycle] += direction
            minus[..., cycle] -= direction
            derivative = (
                np.abs(geometric_solution(plus, increments)) - np.abs(geometric_solution(minus, increments))
            ) / (2 * step)
            gains += derivative**2
    return np.sqrt(gains)


def _full_data_crlb(t1, t2, increments, theta, sigma):
    """CRLB of R2 from all complex phase cycles; unknowns M0, R2, off-resonance, phase."""

    def data(params):
        m0, r2, off, phase = params
        signal = bssfp_signal(
            m0, 1 / t1, r2, FLIPS[:, None], TR, off_resonance=off, phase_increment=increments
        ) * np.exp(1j * phase)
        return np.concatenate([signal.real.ravel(), signal.imag.ravel()])

    truth = np.array([1.0, 1 / t2, theta, 0.3])
    steps = np.array([1e-6, 1e-4, 1e-6, 1e-6])
    jac = np.stack(
        [
            (data(truth + np.eye(4)[k] * steps[k]) - data(truth - np.eye(4)[k] * steps[k])) / (2 * steps[k])
            for k in range(4)
        ],
        axis=-1,
    )
    return sigma * np.sqrt(np.linalg.inv(jac.T @ jac)[1, 1])


@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_despot2_with_noise_is_unbiased_and_efficient(tissue):
    t1, t2 = TISSUES[tissue]
    increments = _cycles(4)
    sigma = 0.002  # per real and imaginary part of each phase cycle, M0 = 1
    rng = np.random.default_rng(11)
    n_repeat = 3000
    lines = []
    for theta in (0.0, 1.0, 2.5, np.pi):
        clean = bssfp_signal(1.0, 1 / t1, 1 / t2, FLIPS[:, None], TR, off_resonance=theta, phase_increment=increments)
        noise = rng.standard_normal((n_repeat,) + clean.shape + (2,)) @ np.array([1.0, 1j])
        band_free = geometric_solution(clean + sigma * noise, increments)
        fit = fit_despot2(band_free, FLIPS, TR, 1 / t1)
        band_free_sigma = sigma * _band_free_noise_gain(clean, increments)
        bound = despot2_crlb(1.0, 1 / t1, 1 / t2, FLIPS, TR, band_free_sigma)
        bias = np.mean(fit.r2) * t2 - 1
        ratio = np.std(fit.r2) / bound
        assert abs(bias) < 0.03
        assert abs(ratio - 1) < 0.3
        full = _full_data_crlb(t1, t2, increments, theta, sigma)
        snr = band_free_signal(1.0, 1 / t1, 1 / t2, FLIPS, TR) / band_free_sigma
        lines.append(
            f"theta {theta:.2f}: bias {100 * bias:+.2f} %, SD/CRLB {ratio:.3f}, "
            f"SD/full-data CRLB {np.std(fit.r2) / full:.2f}, CV {100 * np.std(fit.r2) * t2:.1f} %, "
            f"band-free SNR {np.round(snr, 0)}"
        )
    print(f"\n{tissue}: " + "; ".join(lines))


def test_despot2_standard_error_with_known_sigma():
    t1, t2 = TISSUES["wm"]
    rng = np.random.default_rng(5)
    signal = band_free_signal(1.0, 1 / t1, 1 / t2, FLIPS, TR)
    sigma = 0.0015
    fit = fit_despot2(signal + sigma * rng.standard_normal((4000, 2)), FLIPS, TR, 1 / t1, sigma=sigma)
    assert abs(np.median(fit.r2_se) / np.std(fit.r2) - 1) < 0.15


def test_despot2_error_from_b1_and_r1_errors():
    """Report how B1+ and R1 errors propagate into R2 (the issue asks for a 10 % B1+ error)."""
    lines = []
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        band_free = band_free_signal(1.0, 1 / t1, 1 / t2, FLIPS, TR)
        exact = fit_despot2(band_free, FLIPS, TR, 1 / t1).r2 * t2 - 1
        high = fit_despot2(band_free, FLIPS, TR, 1 / t1, b1=1.1).r2 * t2 - 1
        low = fit_despot2(band_free, FLIPS, TR, 1 / t1, b1=0.9).r2 * t2 - 1
        r1_high = fit_despot2(band_free, FLIPS, TR, 1.1 / t1).r2 * t2 - 1
        assert abs(exact) < 1e-8
        # a 10 % B1+ error is far larger than the 2 % accuracy target: B1+ must be mapped
        assert high < -0.05 and low > 0.05
        assert r1_high > 0.05
        lines.append(
            f"{tissue}: B1 +10 % -> R2 {100 * high:+.1f} %, B1 -10 % -> {100 * low:+.1f} %, "
            f"R1 +10 % -> {100 * r1_high:+.1f} %"
        )
    print("\n" + "; ".join(lines))


def test_single_phase_cycle_error_is_reported():
    """Without banding removal (one phase cycle), DESPOT2 fails near the bands."""
    t1, t2 = TISSUES["wm"]
    single = np.abs(_phase_cycled(t1, t2, np.zeros(1), FREQUENCIES)[..., 0])
    error = fit_despot2(single, FLIPS, TR, 1 / t1).r2 * t2 - 1
    quantiles = np.percentile(np.abs(error), [50, 90])
    print(
        f"\none phase cycle, WM over 1/TR: |R2 error| median {100 * quantiles[0]:.1f} %, "
        f"90th percentile {100 * quantiles[1]:.0f} %"
    )
    assert quantiles[1] > 0.1


def test_intravoxel_frequency_spread_bias_is_reported():
    """A voxel holding a spread of frequencies is not on one ellipse: report the R2 bias."""
    centres = np.linspace(-1 / (2 * TR), 1 / (2 * TR), 32, endpoint=False)
    report = []
    for n_cycle in (4, 8):
        increments = _cycles(n_cycle)
        for tissue, (t1, t2) in sorted(TISSUES.items()):
            biases = []
            for width in (0.0, 10.0, 20.0, 40.0):
                sub_voxels = centres[:, None] + width * np.linspace(-0.5, 0.5, 33)
                signals = (
                    _phase_cycled(t1, t2, increments, sub_voxels.ravel())
                    .reshape(centres.size, 33, FLIPS.size, n_cycle)
                    .mean(axis=1)
                )
                r2 = fit_despot2(geometric_solution(signals, increments), FLIPS, TR, 1 / t1).r2
                joint = fit_bssfp_joint(signals, FLIPS, increments, TR, 1 / t1).r2
                biases.append((np.median(r2) * t2 - 1, np.median(joint) * t2 - 1))
            biases = np.array(biases)
            assert np.all(np.abs(biases[0]) < 1e-8)
            assert np.all(np.abs(biases[1]) < 0.01)  # 10 Hz (2 % of 1/TR) spread: negligible
            assert np.all(np.abs(biases[3]) > np.abs(biases[1]))
            report.append(
                f"{n_cycle} cycles {tissue}: "
                + ", ".join(
                    f"{w:.0f} Hz {100 * b[0]:+.2f} % (joint {100 * b[1]:+.2f} %)"
                    for w, b in zip((0, 10, 20, 40), biases)
                )
            )
    print(
        "\nmedian R2 bias vs uniform intravoxel frequency spread (1/TR = 200 Hz), DESPOT2 on the "
        "geometric solution (joint fit):\n" + "\n".join(report)
    )


@pytest.mark.slow
def test_cost_on_two_million_voxels():
    """The R2 steps on 2 M voxels, 2 flips x 4 cycles, 2 threads: under 30 s (issue target)."""
    import resource

    n_voxel = 2_000_000
    increments = _cycles(4)
    rng = np.random.default_rng(0)
    r1 = rng.uniform(0.6, 1.3, n_voxel)
    r2 = rng.uniform(5.0, 20.0, n_voxel)
    theta = rng.uniform(-np.pi, np.pi, n_voxel)
    signals = np.empty((n_voxel, FLIPS.size, 4), np.complex64)
    for start in range(0, n_voxel, 250_000):
        part = slice(start, start + 250_000)
        signals[part] = bssfp_signal(
            1.0,
            r1[part, None, None],
            r2[part, None, None],
            FLIPS[:, None],
            TR,
            off_resonance=theta[part, None, None],
            phase_increment=increments,
        )
    times = [time.perf_counter()]
    band_free = geometric_solution(signals, increments, n_jobs=2)
    times.append(time.perf_counter())
    fit = fit_despot2(band_free, FLIPS, TR, r1, sigma=0.001, n_jobs=2)
    times.append(time.perf_counter())
    off_resonance, _ = geometric_off_resonance(signals, increments, TR, band_free=band_free, n_jobs=2)
    times.append(time.perf_counter())
    subset = slice(0, 200_000)
    fit_bssfp_joint(signals[subset], FLIPS, increments, TR, r1[subset], n_jobs=2)
    times.append(time.perf_counter())
    steps = np.diff(times)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(
        f"\n2 M voxels, 2 threads: geometric solution {steps[0]:.1f} s, DESPOT2 {steps[1]:.1f} s, "
        f"off-resonance {steps[2]:.1f} s; joint fit {steps[3] * 10:.0f} s (extrapolated from 200 k); "
        f"peak RSS {peak_gb:.2f} GB (input {signals.nbytes / 1e9:.2f} GB)"
    )
    # single-precision input limits the accuracy
    assert np.median(np.abs(fit.r2 / r2 - 1)) < 1e-3
    wrapped = np.angle(np.exp(2j * np.pi * off_resonance[:, 1] * TR - 1j * theta))
    assert np.median(np.abs(wrapped)) < 1e-3
    assert times[3] - times[0] < 30.0


def _ellipse_r2_crlb(t1, t2, flip, increments, theta, sigma):
    """CRLB of R2 = -ln(a)/TR from one flip angle's complex cycles; unknowns M0, R1, R2, theta, phase."""

    def data(params):
        m0, r1, r2, off, phase = params
        signal = bssfp_signal(m0, r1, r2, flip, TR, off_resonance=off, phase_increment=increments) * np.exp(1j * phase)
        return np.concatenate([signal.real, signal.imag])

    truth = np.array([1.0, 1 / t1, 1 / t2, theta, 0.5])
    steps = np.array([1e-6, 1e-5, 1e-5, 1e-6, 1e-6])
    jac = np.stack(
        [
            (data(truth + np.eye(5)[k] * steps[k]) - data(truth - np.eye(5)[k] * steps[k])) / (2 * steps[k])
            for k in range(5)
        ],
        axis=-1,
    )
    return sigma * np.sqrt(np.linalg.inv(jac.T @ jac)[2, 2])


@pytest.mark.parametrize("n_cycle", [4, 8])
def test_planet_r2_with_noise_reaches_its_bound_but_needs_high_snr(n_cycle):
    """The ellipse-based R2 (one flip angle) is efficient, but far noisier than DESPOT2."""
    increments = _cycles(n_cycle)
    sigma = 0.0005
    rng = np.random.default_rng(7)
    lines = []
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        for theta in (0.3, 2.0):
            clean = bssfp_signal(
                1.0, 1 / t1, 1 / t2, FLIPS[1], TR, off_resonance=theta, phase_increment=increments
            ) * np.exp(0.5j)
            noise = rng.standard_normal((3000, n_cycle, 2)) @ np.array([1.0, 1j])
            fit = fit_ellipse(clean + sigma * noise, increments, TR)
            r1, r2 = planet_relaxation(fit.a, fit.b, FLIPS[1], TR)
            bound = _ellipse_r2_crlb(t1, t2, FLIPS[1], increments, theta, sigma)
            bias = np.mean(r2) * t2 - 1
            assert abs(bias) < 0.03
            assert abs(np.std(r2) / bound - 1) < 0.3
            wrapped = np.angle(np.exp(2j * np.pi * fit.off_resonance * TR - 1j * theta))
            lines.append(
                f"{tissue} theta {theta}: R2 bias {100 * bias:+.2f} %, "
                f"SD/CRLB {np.std(r2) / bound:.2f}, CV {100 * np.std(r2) * t2:.1f} %, "
                f"R1 median error {100 * (np.nanmedian(r1) * t1 - 1):+.1f} %, "
                f"off-resonance SD {np.std(wrapped) / (2 * np.pi * TR):.2f} Hz"
            )
    print(f"\nPLANET, {n_cycle} cycles, 50 deg, sigma {sigma}:\n" + "\n".join(lines))


# --------------------------------------------------------------------------------------------
# Joint fit of all cycles and flip angles
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_cycle", [4, 8])
def test_joint_fit_noiseless_recovery(n_cycle):
    increments = _cycles(n_cycle)
    b1 = np.linspace(0.8, 1.2, FREQUENCIES.size)
    for tissue, (t1, t2) in sorted(TISSUES.items()):
        signals = _phase_cycled(t1, t2, increments, FREQUENCIES, m0=800.0, b1=b1[:, None, None])
        for start in ({}, {"r2_start": 10.0, "off_resonance_start": FREQUENCIES + 25.0}):
            fit = fit_bssfp_joint(signals, FLIPS, increments, TR, 1 / t1, b1=b1, chunk_size=40, **start)
            np.testing.assert_allclose(fit.r2, 1 / t2, rtol=1e-8, err_msg=tissue)
            wrapped = np.angle(np.exp(2j * np.pi * (fit.off_resonance - FREQUENCIES) * TR))
            np.testing.assert_allclose(wrapped, 0.0, atol=1e-8)
            np.testing.assert_allclose(np.abs(fit.amplitude), 800.0, rtol=1e-8)
            # at exactly +-1/(2 TR) the phase is defined modulo pi (e^{i theta / 2} in the model)
            np.testing.assert_allclose(fit.amplitude[1:], 800.0 * np.exp(0.7j), rtol=1e-8)


@pytest.mark.parametrize("tissue", sorted(TISSUES))
def test_joint_fit_with_noise_reaches_the_full_data_bound(tissue):
    t1, t2 = TISSUES[tissue]
    increments = _cycles(4)
    sigma = 0.002
    rng = np.random.default_rng(13)
    lines = []
    for theta in (0.0, 2.5):
        clean = bssfp_signal(1.0, 1 / t1, 1 / t2, FLIPS[:, None], TR, off_resonance=theta, phase_increment=increments)
        noisy = clean + sigma * (rng.standard_normal((3000,) + clean.shape + (2,)) @ np.array([1.0, 1j]))
        fit = fit_bssfp_joint(noisy, FLIPS, increments, TR, 1 / t1, sigma=sigma)
        bound = _full_data_crlb(t1, t2, increments, theta, sigma)
        bias = np.mean(fit.r2) * t2 - 1
        ratio = np.std(fit.r2) / bound
        assert abs(bias) < 0.03
        assert abs(ratio - 1) < 0.3
        assert abs(np.median(fit.r2_se) / bound - 1) < 0.1
        despot2 = fit_despot2(geometric_solution(noisy, increments), FLIPS, TR, 1 / t1)
        lines.append(
            f"theta {theta}: bias {100 * bias:+.2f} %, SD/CRLB {ratio:.2f}, "
            f"SD relative to DESPOT2 on the geometric solution {np.std(fit.r2) / np.std(despot2.r2):.2f}"
        )
    print(f"\njoint fit, {tissue}: " + "; ".join(lines))


def test_bad_voxels_give_flagged_values_without_warnings():
    increments = _cycles(4)
    t1, t2 = TISSUES["wm"]
    signals = _phase_cycled(t1, t2, increments, [10.0, 20.0, 30.0, 40.0])
    signals[0, 0, 1] = np.nan
    signals[1] = 0.0
    signals[2, 1] = np.inf
    with np.errstate(all="raise"):
        band_free = geometric_solution(signals, increments)
        despot2 = fit_despot2(band_free, FLIPS, TR, 1 / t1)
        joint = fit_bssfp_joint(signals, FLIPS, increments, TR, 1 / t1)
        ellipse = fit_ellipse(signals[:, 1], increments, TR)
        off_resonance, _ = geometric_off_resonance(signals, increments, TR)
    for fit in (despot2, joint):
        np.testing.assert_array_equal(fit.r2[:3], 0.0)
        assert np.all(np.isinf(fit.r2_se[:3]))
        np.testing.assert_allclose(fit.r2[3], 1 / t2, rtol=1e-8)
    assert np.isinf(ellipse.rms_residual[1]) and np.isinf(ellipse.rms_residual[2])
    assert np.all(np.isfinite(off_resonance))


def _rotation(axis, angle):
    """Right-handed rotation matrix about the unit ``axis`` by ``angle``."""
    x, y, z = axis
    c, s, t = np.cos(angle), np.sin(angle), 1 - np.cos(angle)
    return np.array(
        [
            [c + x * x * t, x * y * t - z * s, x * z * t + y * s],
            [y * x * t + z * s, c + y * y * t, y * z * t - x * s],
            [z * x * t - y * s, z * y * t + x * s, c + z * z * t],
        ]
    )


@pytest.mark.parametrize(("flip_deg", "frequency"), [(15.0, 90.0), (50.0, -60.0), (70.0, 150.0)])
def test_finite_pulse_equivalent_flip_angle_is_the_rotation_without_its_z_parts(flip_deg, frequency):
    """Without relaxation a tilted-axis pulse is z-precession, an x-rotation by the equivalent flip, z-precession."""
    alpha, duration = np.deg2rad(flip_deg), 0.001
    precession = 2 * np.pi * frequency * duration
    field = np.array([-alpha, 0.0, precession])
    pulse = _rotation(field / np.linalg.norm(field), np.linalg.norm(field))
    equivalent = finite_pulse_equivalent(alpha, 0.005, duration, off_resonance=frequency)
    # the rotation maps +z to (sin a' sin g, sin a' cos g, cos a') for some turn g about z
    assert pulse[2, 2] == pytest.approx(np.cos(equivalent.flip_angle), abs=1e-12)
    assert equivalent.tr_r2 == pytest.approx(0.005 - duration / 3)
    assert equivalent.tr_r1 == pytest.approx(0.005 + duration * np.tan(equivalent.flip_angle / 2) ** 2 / 4)


def test_finite_pulse_correction_vanishes_for_instantaneous_pulses_and_checks_the_duration():
    flips = np.deg2rad([15.0, 50.0])
    equivalent = finite_pulse_equivalent(flips, 0.005, 0.0, off_resonance=80.0)
    np.testing.assert_array_equal(equivalent.flip_angle, flips)
    assert equivalent.tr_r2 == 0.005 and np.all(equivalent.tr_r1 == 0.005)
    signal = band_free_signal(1.0, 1 / 0.85, 1 / 0.07, flips, 0.005)
    np.testing.assert_array_equal(band_free_signal(1.0, 1 / 0.85, 1 / 0.07, flips, 0.005, pulse_duration=0.0), signal)
    # the model with finite pulses is what DESPOT2 then inverts exactly
    finite = band_free_signal(1.0, 1 / 0.85, 1 / 0.07, flips, 0.005, pulse_duration=0.001, off_resonance=40.0)
    fit = fit_despot2(finite, flips, 0.005, 1 / 0.85, pulse_duration=0.001, off_resonance=40.0)
    assert fit.r2 == pytest.approx(1 / 0.07, rel=1e-8)
    assert fit_despot2(finite, flips, 0.005, 1 / 0.85).r2 < 0.95 / 0.07
    for wrong in (-0.001, 0.005):
        with pytest.raises(ValueError, match="pulse_duration"):
            fit_despot2(finite, flips, 0.005, 1 / 0.85, pulse_duration=wrong)
