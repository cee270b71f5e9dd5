"""Receive sensitivity, receive bias from the 1/PD-R1 relation, and PD calibration against ground truth."""

import numpy as np
import pytest

from qmri_workflows.core.relaxometry.pd import (
    CSF,
    GREY,
    WHITE,
    calibrate_pd,
    classify_by_r1,
    receive_bias_from_r1,
    receive_sensitivity,
)

from .phantom_2mm import Subject2mm, format_errors


def _blocks(shape, seed=0):
    """Piecewise-constant tissue labels 1 (CSF), 2 (GM), 3 (WM) in 4-voxel blocks."""
    rng = np.random.default_rng(seed)
    coarse = rng.choice([1, 2, 3], p=[0.15, 0.45, 0.4], size=[n // 4 + 1 for n in shape])
    return np.kron(coarse, np.ones((4, 4, 4), dtype=int))[: shape[0], : shape[1], : shape[2]]


def _smooth(shape, coefficients):
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    a, b, c, d = coefficients
    return 1.0 + a * x + b * y**2 + c * z + d * x * y


TISSUE_PD = {1: 100.0, 2: 82.0, 3: 69.0}
TISSUE_R1 = {1: 0.24, 2: 0.65, 3: 1.05}


def _synthetic(shape=(40, 44, 36)):
    labels = _blocks(shape)
    pd = np.vectorize(TISSUE_PD.get)(labels).astype(float)
    r1 = np.vectorize(TISSUE_R1.get)(labels).astype(float)
    return labels, pd, r1


def test_receive_sensitivity_recovers_a_smooth_field_and_fills_low_signal_holes():
    labels, pd, _ = _synthetic()
    shape = pd.shape
    head_mask = np.zeros(shape, bool)
    head_mask[3:-3, 3:-3, 3:-3] = True
    pd = np.where(head_mask, pd, 0.0)
    pd[18:22, 18:22, 16:20] = 0.5  # sinus: no signal
    field = _smooth(shape, (0.25, -0.15, 0.1, 0.05))
    body_field = _smooth(shape, (0.0, 0.0, 0.0, 0.0))
    head, body = 10 * pd * field, 10 * pd * body_field
    estimate = receive_sensitivity(head, body, voxel_size=(2.0, 2.0, 2.0), smoothing_fwhm=8.0)
    assert np.all(np.isfinite(estimate))
    interior = np.zeros(shape, bool)
    interior[8:-8, 8:-8, 8:-8] = True
    relative = estimate / field
    relative /= np.median(relative[interior])
    error = np.abs(relative - 1)[interior]
    print(f"\nRB1COR ratio, block phantom: median {100 * np.median(error):.2f} %, max {100 * error.max():.2f} %")
    assert np.median(error) < 0.005 and error.max() < 0.03
    assert abs(relative[20, 20, 18] - 1) < 0.02  # the hole is filled from its surroundings
    # the documented scale: median 1 over the voxels used (the head without the sinus)
    used = head_mask & (pd > 1.0)
    assert np.median(estimate[used]) == pytest.approx(1.0, rel=1e-12)


def test_receive_sensitivity_rejects_mismatched_or_empty_pairs():
    with pytest.raises(ValueError, match="share a grid"):
        receive_sensitivity(np.ones((4, 4, 4)), np.ones((4, 4, 5)))
    with pytest.raises(ValueError, match="no voxel has signal"):
        receive_sensitivity(np.ones((4, 4, 4)), np.ones((4, 4, 4)), mask=np.zeros((4, 4, 4), bool))


def test_classes_follow_r1():
    labels, _, r1 = _synthetic()
    found, centres = classify_by_r1(r1, np.ones(r1.shape, bool))
    np.testing.assert_array_equal(found, labels)
    np.testing.assert_allclose(centres, [TISSUE_R1[1], TISSUE_R1[2], TISSUE_R1[3]], rtol=1e-6)
    assert (CSF, GREY, WHITE) == (1, 2, 3)


@pytest.mark.parametrize("reference", ["csf", "wm"])
def test_calibration_is_exact_with_the_true_receive_field(reference):
    _, pd, r1 = _synthetic()
    field = _smooth(pd.shape, (0.3, 0.1, -0.2, 0.0))
    m0 = 123.0 * pd * field
    result = calibrate_pd(m0, r1, np.ones(pd.shape, bool), receive=field, reference=reference)
    np.testing.assert_allclose(result.pd, pd, rtol=1e-9)
    # another water content for the reference (e.g. CSF at 95 %) scales every voxel
    own_reference = calibrate_pd(m0, r1, np.ones(pd.shape, bool), receive=field, reference=reference, reference_pd=95.0)
    np.testing.assert_allclose(own_reference.pd, pd * 95.0 / TISSUE_PD[1 if reference == "csf" else 3], rtol=1e-9)
    with pytest.raises(ValueError, match="reference must be one of"):
        calibrate_pd(m0, r1, np.ones(pd.shape, bool), reference="gm")


def test_receive_bias_from_r1_on_a_block_phantom_that_obeys_the_relation():
    labels, _, r1 = _synthetic(shape=(48, 48, 40))
    # water content exactly on the line 1/PD = A (1 + kappa R1)
    kappa, a = 0.7, 0.0085
    pd = 1.0 / (a * (1 + kappa * r1))
    field = np.exp(0.2 * (_smooth(pd.shape, (0.8, -0.5, 0.4, 0.3)) - 1.0))
    bias = receive_bias_from_r1(pd * field, r1, np.ones(pd.shape, bool), voxel_size=(2.0, 2.0, 2.0), degree=2)
    assert abs(bias.kappa / kappa - 1) < 0.02
    relative = bias.field / field
    relative /= np.median(relative)
    assert np.max(np.abs(relative - 1)) < 0.01


@pytest.fixture(scope="module")
def patient():
    return Subject2mm("patient")


@pytest.fixture(scope="module")
def control():
    return Subject2mm("control")


def _m0(subject):
    truth = subject.truth
    return truth.pd / 100.0 * truth.receive * 1000.0


def test_pd_with_the_body_coil_pair_within_two_percent_on_the_patient(patient):
    truth = patient.truth
    receive = receive_sensitivity(patient.head, patient.body, mask=truth.head_mask, voxel_size=truth.voxel_size)
    result = calibrate_pd(_m0(patient), truth.r1, patient.brain_mask, receive=receive, reference="csf")
    errors = patient.median_errors(result.pd, truth.pd)
    uncorrected = patient.median_errors(calibrate_pd(_m0(patient), truth.r1, patient.brain_mask).pd, truth.pd)
    print(f"\nPD, RB1COR pair, CSF = 100 %: {format_errors(errors)}")
    print(f"PD, no receive correction, CSF = 100 %: {format_errors(uncorrected)}")
    assert max(abs(e) for e in errors.values()) < 2.0
    assert max(abs(e) for e in uncorrected.values()) > 5.0  # the test can fail: the field matters


def test_white_matter_calibration_on_the_control(control):
    truth = control.truth
    receive = receive_sensitivity(control.head, control.body, mask=truth.head_mask, voxel_size=truth.voxel_size)
    result = calibrate_pd(_m0(control), truth.r1, control.brain_mask, receive=receive, reference="wm")
    errors = control.median_errors(result.pd, truth.pd)
    print(f"\nPD, RB1COR pair, WM = 69 % (control): {format_errors(errors)}")
    assert max(abs(e) for e in errors.values()) < 2.0


def test_pd_with_the_r1_bias_estimate_instead_of_a_body_coil(patient):
    truth = patient.truth
    m0 = _m0(patient)
    bias = receive_bias_from_r1(m0, truth.r1, patient.brain_mask, voxel_size=truth.voxel_size)
    result = calibrate_pd(m0, truth.r1, patient.brain_mask, receive=bias.field, reference="csf")
    errors = patient.median_errors(result.pd, truth.pd)
    field_error = bias.field / truth.receive
    brain = patient.brain_mask
    field_error /= np.median(field_error[brain])
    wm, gm = truth.dseg == 3, truth.dseg == 2
    inverse_pd = [np.median(1 / truth.pd[m]) for m in (wm, gm)]
    r1 = [np.median(truth.r1[m]) for m in (wm, gm)]
    slope = (inverse_pd[0] - inverse_pd[1]) / (r1[0] - r1[1])
    kappa = slope / (inverse_pd[0] - slope * r1[0])
    print(
        f"\nPD, 1/PD-R1 receive estimate (kappa {bias.kappa:.3f} s, WM/GM truth {kappa:.3f} s; field error "
        f"median {100 * np.median(np.abs(field_error[brain] - 1)):.2f} %): {format_errors(errors)}"
    )
    assert abs(bias.kappa / kappa - 1) < 0.1
    assert np.median(np.abs(field_error[brain] - 1)) < 0.02
    assert max(abs(e) for e in errors.values()) < 3.0


def test_calibration_with_noisy_m0_and_r1_stays_within_two_percent(patient):
    """SNR 50 (white matter, flip 1): M0 and R1 from the two-angle fit of noisy Rician intercepts."""
    from qmri_workflows.core.relaxometry.despot1 import fit_r1

    truth = patient.truth
    sigma = np.median(patient.intercepts[..., 0][patient.masks[3]]) / 50.0
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(patient.intercepts.shape) + 1j * rng.standard_normal(patient.intercepts.shape)
    noisy = np.abs(patient.intercepts + sigma * noise)
    fit = fit_r1(noisy, patient.flip_angles, patient.repetition_time, b1=truth.b1, mask=patient.brain_mask)
    result = calibrate_pd(fit.m0, fit.r1, patient.brain_mask, receive=truth.receive, reference="csf")
    errors = patient.median_errors(result.pd, truth.pd)
    print(f"\nPD from noisy data (SNR 50), true receive field, CSF = 100 %: {format_errors(errors)}")
    large = {name: error for name, error in errors.items() if "lesion" not in name}
    assert max(abs(e) for e in large.values()) < 2.0
