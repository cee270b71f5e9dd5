"""Map-free B1+ estimate from VFA data: closed-form block phantom and the 2 mm MS phantom."""

import math
import time

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.b1_free import estimate_b1_from_vfa
from qmri_workflows.core.relaxometry.despot1 import fit_r1
from qmri_workflows.core.signal import spgr_signal

from .phantom_2mm import Subject2mm, format_errors

FLIPS = np.radians([6.0, 21.0])
TR = 0.025


def _block_volume(shape=(44, 48, 40), seed=3):
    rng = np.random.default_rng(seed)
    coarse = rng.choice([0.24, 0.65, 1.05], p=[0.1, 0.5, 0.4], size=[n // 4 + 1 for n in shape])
    r1 = np.kron(coarse, np.ones((4, 4, 4)))[: shape[0], : shape[1], : shape[2]]
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    b1 = 1.05 - 0.15 * (x**2 + y**2) + 0.05 * x - 0.08 * z**2
    return r1, b1


def test_recovers_a_smooth_field_over_piecewise_constant_r1():
    r1, b1 = _block_volume()
    mask = np.ones(r1.shape, bool)
    b1 = b1 / b1.mean()  # the estimate fixes the mean to 1: give the truth that scale
    signals = np.stack([spgr_signal(1000.0, r1, 0.0, a, TR, 0.0, b1=b1) for a in FLIPS], axis=-1)
    estimate = estimate_b1_from_vfa(signals, FLIPS, TR, mask, voxel_size=(2.0, 2.0, 2.0))
    b1_error = np.abs(estimate.b1 / b1 - 1)
    r1_error = np.abs(estimate.r1 / r1 - 1)
    print(
        f"\nmap-free B1, block volume: B1 error median {100 * np.median(b1_error):.2f} %, "
        f"R1 {100 * np.median(r1_error):.2f} %"
    )
    assert np.median(b1_error) < 0.01 and np.median(r1_error) < 0.02


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mask.shape"):
        estimate_b1_from_vfa(np.ones((4, 4, 4, 2)), FLIPS, TR, np.ones((4, 4, 5), bool))


def test_halves_the_r1_error_of_the_uncorrected_fit_on_the_phantom():
    subject = Subject2mm("patient")
    truth = subject.truth
    mask = subject.brain_mask
    start = time.perf_counter()
    estimate = estimate_b1_from_vfa(
        subject.intercepts, subject.flip_angles, subject.repetition_time, mask, voxel_size=truth.voxel_size
    )
    elapsed = time.perf_counter() - start
    uncorrected = fit_r1(
        subject.intercepts, subject.flip_angles, subject.repetition_time, mask=mask, method="two_angle"
    ).r1
    with_true_b1 = fit_r1(
        subject.intercepts, subject.flip_angles, subject.repetition_time, mask=mask, b1=truth.b1, method="two_angle"
    ).r1
    tissue = mask & (truth.dseg >= 2) & (truth.dseg <= 13)
    error_uncorrected = np.median(np.abs(uncorrected[tissue] / truth.r1[tissue] - 1))
    error_estimated = np.median(np.abs(estimate.r1[tissue] / truth.r1[tissue] - 1))
    error_true_b1 = np.median(np.abs(with_true_b1[tissue] / truth.r1[tissue] - 1))
    b1_error = np.abs(estimate.b1[mask] / truth.b1[mask] - 1)
    print(
        f"\nmap-free B1 on the 2 mm phantom ({elapsed:.1f} s): median |R1 error| in brain tissue "
        f"{100 * error_uncorrected:.1f} % uncorrected, {100 * error_estimated:.1f} % with the estimate, "
        f"{100 * error_true_b1:.2f} % with the true B1; B1 error median {100 * np.median(b1_error):.1f} %, "
        f"95th percentile {100 * np.percentile(b1_error, 95):.1f} %"
    )
    print("per region, uncorrected:", format_errors(subject.median_errors(uncorrected, truth.r1)))
    print("per region, estimated B1:", format_errors(subject.median_errors(estimate.r1, truth.r1)))
    assert error_uncorrected > 0.05  # the transmit field matters on this phantom
    assert error_estimated <= 0.5 * error_uncorrected
    assert math.isclose(float(np.mean(estimate.b1[mask])), 1.0, rel_tol=1e-6)


def test_mean_b1_sets_the_scale_the_data_cannot_give():
    """A transmitter calibrated 10 % high: with mean_b1 = 1.1 the field and R1 are recovered."""
    r1, b1 = _block_volume(shape=(32, 32, 32))
    b1 = 1.1 * b1 / b1.mean()
    mask = np.ones(r1.shape, bool)
    signals = np.stack([spgr_signal(1000.0, r1, 0.0, a, TR, 0.0, b1=b1) for a in FLIPS], axis=-1)
    estimate = estimate_b1_from_vfa(signals, FLIPS, TR, mask, voxel_size=(2.0, 2.0, 2.0), mean_b1=1.1)
    assert float(np.mean(estimate.b1)) == pytest.approx(1.1, rel=1e-6)
    assert np.median(np.abs(estimate.b1 / b1 - 1)) < 0.01
    assert np.median(np.abs(estimate.r1 / r1 - 1)) < 0.02
