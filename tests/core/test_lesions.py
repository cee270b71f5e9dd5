"""Lesion-wise analysis against the phantom's truth: every lesion's stage, noiseless and at SNR 30."""

import math

import numpy as np
import pytest

from qmri_workflows.core.lesions import (
    LESION_STAGES,
    UNDETERMINED,
    analyse_lesions,
    label_lesions,
    lesion_shells,
)
from qmri_workflows.core.r2star import fit_r2star_loglinear
from qmri_workflows.core.regions import normal_appearing_white_matter, region_masks, regions_from_label_names
from tests.lesion_stages import confusion_table

pytest.importorskip("nilearn")

from qmri_workflows.phantom.protocol import Protocol  # noqa: E402
from qmri_workflows.phantom.tissues import LABELS, lesion_stage  # noqa: E402
from qmri_workflows.phantom.truth import make_phantom  # noqa: E402

RESOLUTION = 2.0  # mm: every lesion of 4 mm or more keeps a voxel, the 10 mm ones a core and a rim
GAMMA_HZ_PER_T = 42.577e6


@pytest.fixture(scope="module")
def patient():
    return make_phantom(resolution=RESOLUTION, subject="patient", seed=0)


def _inputs(truth):
    regions, _ = regions_from_label_names(LABELS)
    lesion = truth.lesion_index > 0
    masks = region_masks(truth.dseg, regions, lesion_mask=lesion)
    nawm = normal_appearing_white_matter(masks["white_matter"], lesion, 2.0, truth.voxel_size)
    return lesion, masks, nawm


def _truth_stages(truth, labels, rows):
    """Stage of the truth lesion that holds most of each analysed lesion's voxels."""
    stages = []
    for row in rows:
        numbers = truth.lesion_index[labels == row["lesion"]]
        stages.append(lesion_stage(truth.lesions[np.bincount(numbers).argmax() - 1].compartment))
    return stages


def _stage_all(truth, maps):
    lesion, masks, nawm = _inputs(truth)
    labels, rows = analyse_lesions(
        maps, lesion, nawm, truth.voxel_size, cortex=masks["cortex"], white_matter=masks["white_matter"]
    )
    return labels, rows, _truth_stages(truth, labels, rows)


def test_noiseless_phantom_every_lesion_stage_matches_truth(patient):
    maps = {
        "R1map": patient.r1,
        "R2map": patient.r2,
        "R2starmap": patient.r2star,
        "PDmap": patient.pd,
        "Chimap": patient.chi,
    }
    labels, rows, truth_stages = _stage_all(patient, maps)
    found = [row["stage"] for row in rows]
    print("\nnoiseless phantom (truth maps), 2 mm\n" + confusion_table(truth_stages, found))
    # every truth lesion with a voxel on this grid is found once
    assert len(rows) == len(np.unique(patient.lesion_index[patient.lesion_index > 0]))
    assert set(truth_stages) == set(LESION_STAGES)
    assert found == truth_stages, [
        (row["lesion"], t, row["evidence"]) for row, t in zip(rows, truth_stages) if row["stage"] != t
    ]
    for row in rows:
        assert row["evidence"]
        # lesions are demyelinated: R1 below NAWM in every white-matter lesion
        if row["stage"] != "cortical":
            assert row["R1map_relative_contrast"] < 0


def _noisy_maps(truth, snr, seed):
    """Maps estimated from data at ``snr`` (white-matter first-echo magnitude over noise SD).

    R2*: the package's log-linear fit of Rician multi-echo magnitudes of the phantom's echo times.
    Chi: white noise of the SD of the field fitted from the phase of the same echoes (phase SD =
    sigma / S per echo), doubled for the noise amplification of the dipole inversion (an
    approximation: real QSM noise is spatially correlated). R1: 5 % relative noise, the precision of
    a two-flip-angle VFA fit at this SNR.
    """
    rng = np.random.default_rng(seed)
    echo_times = np.asarray(Protocol().vfa.echo_times)
    brain = truth.brain_mask
    s0 = truth.pd[brain]
    signal = s0[:, None] * np.exp(-truth.r2star[brain][:, None] * echo_times)
    white_matter = truth.dseg[brain] == 3
    sigma = np.median(signal[white_matter, 0]) / snr
    noisy = np.abs(signal + sigma * (rng.standard_normal(signal.shape) + 1j * rng.standard_normal(signal.shape)))
    _, r2star_brain = fit_r2star_loglinear(noisy, echo_times)
    r2star = np.zeros(truth.shape, dtype=float)
    r2star[brain] = r2star_brain
    with np.errstate(divide="ignore"):
        field_sd_rad = sigma / np.sqrt(np.sum((signal * echo_times) ** 2, axis=1))  # rad/s
    chi_sd_ppm = 2 * field_sd_rad / (2 * np.pi * GAMMA_HZ_PER_T * truth.field_strength) * 1e6
    chi = truth.chi.astype(float).copy()
    chi[brain] += np.where(np.isfinite(chi_sd_ppm), chi_sd_ppm, 0) * rng.standard_normal(brain.sum())
    r1 = truth.r1 * (1 + 0.05 * rng.standard_normal(truth.shape))
    return {"R1map": r1, "R2starmap": r2star, "Chimap": chi}, float(np.median(chi_sd_ppm[white_matter]))


def test_snr30_at_least_80_percent_of_stages_match_truth(patient):
    maps, chi_sd = _noisy_maps(patient, 30.0, seed=1)
    labels, rows, truth_stages = _stage_all(patient, maps)
    found = [row["stage"] for row in rows]
    matches = sum(f == t for f, t in zip(found, truth_stages))
    print(f"\nSNR 30 (chi noise {1000 * chi_sd:.1f} ppb in WM), 2 mm\n" + confusion_table(truth_stages, found))
    assert matches >= 0.8 * len(rows)


def test_rim_needs_a_value_above_core_and_nawm():
    # a sphere whose edge is brighter than both core and surroundings, and one whose edge is between
    shape, voxel = (24, 24, 24), (1.0, 1.0, 1.0)
    grid = np.indices(shape) - 11.5
    radius = np.sqrt((grid**2).sum(0))
    lesion = radius <= 5
    rng = np.random.default_rng(0)
    background = -0.03
    rim_lesion = np.where(radius <= 4, -0.02, np.where(lesion, 0.04, background)) + 0.002 * rng.standard_normal(shape)
    plain_lesion = np.where(lesion, 0.01, background) + 0.002 * rng.standard_normal(shape)
    r1 = np.where(lesion, 0.7, 1.0)
    nawm = ~lesion & (radius > 7)
    _, (with_rim,) = analyse_lesions({"Chimap": rim_lesion, "R1map": r1}, lesion, nawm, voxel)
    _, (without,) = analyse_lesions({"Chimap": plain_lesion, "R1map": r1}, lesion, nawm, voxel)
    assert with_rim["Chimap_rim"] and with_rim["stage"] == "chronic active"
    assert not without["Chimap_rim"] and without["stage"] == "late active"  # +40 ppb for 30 % R1 loss
    # gadolinium: an enhancing lesion is active, a non-enhancing one without rim chronic inactive
    _, (enhancing,) = analyse_lesions({"Chimap": plain_lesion, "R1map": r1}, lesion, nawm, voxel, enhancing=lesion)
    _, (quiet,) = analyse_lesions({"Chimap": plain_lesion, "R1map": r1}, lesion, nawm, voxel, enhancing=~lesion)
    assert enhancing["stage"] == "late active" and enhancing["enhancing"] is True
    assert quiet["stage"] == "chronic inactive" and "not enhancing" in quiet["evidence"]
    # without QSM or gadolinium a lesion without an R2* rim cannot be staged
    _, (no_qsm,) = analyse_lesions({"R1map": r1, "R2starmap": np.where(lesion, 12.0, 20.0)}, lesion, nawm, voxel)
    assert no_qsm["stage"] == UNDETERMINED and "QSM" in no_qsm["evidence"]


def test_labels_and_shells():
    mask = np.zeros((12, 12, 12), dtype=bool)
    mask[1:8, 1:8, 1:8] = True  # 343 voxels
    mask[10, 10, 10] = True
    labels, count = label_lesions(mask)
    assert count == 2 and (labels == 1).sum() == 343 and labels[10, 10, 10] == 2
    assert label_lesions(mask, min_voxels=2)[1] == 1
    core, rim = lesion_shells(labels == 1, 1.0, (1, 1, 1))
    assert core.sum() == 125 and rim.sum() == 343 - 125
    core, rim = lesion_shells(labels == 2, 1.0, (1, 1, 1))
    assert not core.any() and not rim.any()
    with pytest.raises(ValueError, match="NAWM"):
        analyse_lesions({"R1map": np.ones(mask.shape)}, mask, np.zeros_like(mask), (1, 1, 1))
    assert math.isnan(analyse_lesions({"R1map": np.ones(mask.shape)}, mask, ~mask, (1, 1, 1))[1][1]["R1map_core"])


def _sphere(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    return distance <= radius, distance


def test_a_central_vein_does_not_hide_the_iron_rim():
    """A paramagnetic vein through the core lifts the core's mean chi above the rim's; medians see the rim."""
    shape, voxel, centre = (24, 24, 24), (1.0, 1.0, 1.0), (11.5, 11.5, 11.5)
    lesion, distance = _sphere(shape, centre, 5.0)
    core = distance <= 4.0
    vein = np.zeros(shape, dtype=bool)
    vein[10:14, 10:14, :] = True  # a 4 mm vein along the third axis through the centre
    rng = np.random.default_rng(0)
    chi = np.where(core, -0.02, np.where(lesion, 0.02, -0.03)) + 0.002 * rng.standard_normal(shape)
    chi[vein] = 0.25  # deoxyhaemoglobin: far more paramagnetic than any iron rim
    r2star = np.where(core, 12.0, np.where(lesion, 28.0, 20.0)) + 0.5 * rng.standard_normal(shape)
    r2star[vein] = 50.0
    r1 = np.where(lesion, 0.7, 1.0)
    nawm = ~lesion & (distance > 7)
    maps = {"Chimap": chi, "R2starmap": r2star, "R1map": r1}
    _, (row,) = analyse_lesions(maps, lesion, nawm, voxel)
    shells = lesion_shells(lesion, 1.0, voxel)
    assert chi[shells[0]].mean() > chi[shells[1]].mean()  # the means alone would see no rim
    assert row["Chimap_rim"] and row["R2starmap_rim"] and row["stage"] == "chronic active", row["evidence"]


def test_a_rim_needs_chi_and_r2star_to_rise_together():
    """Iron raises chi and R2*; a chi rim whose R2* falls below core and NAWM is not an iron rim."""
    shape, voxel, centre = (24, 24, 24), (1.0, 1.0, 1.0), (11.5, 11.5, 11.5)
    lesion, distance = _sphere(shape, centre, 5.0)
    core = distance <= 4.0
    rng = np.random.default_rng(1)
    chi = np.where(core, -0.02, np.where(lesion, 0.02, -0.03)) + 0.002 * rng.standard_normal(shape)
    r1 = np.where(lesion, 0.7, 1.0)
    nawm = ~lesion & (distance > 7)
    falling = np.where(core, 15.0, np.where(lesion, 12.0, 20.0)) + 0.5 * rng.standard_normal(shape)
    _, (row,) = analyse_lesions({"Chimap": chi, "R2starmap": falling, "R1map": r1}, lesion, nawm, voxel)
    assert row["Chimap_rim"] and row["R2starmap_rim_score"] < 0
    assert row["stage"] != "chronic active" and "do not both rise" in row["evidence"], row["evidence"]
    # a significant R2* rim with a chi rim above core and NAWM, too weak to be significant alone: iron
    faint = np.where(core, -0.02, np.where(lesion, -0.019, -0.03)) + 0.01 * rng.standard_normal(shape)
    rising = np.where(core, 12.0, np.where(lesion, 28.0, 20.0)) + 0.5 * rng.standard_normal(shape)
    _, (row,) = analyse_lesions({"Chimap": faint, "R2starmap": rising, "R1map": r1}, lesion, nawm, voxel)
    assert not row["Chimap_rim"] and row["Chimap_rim_score"] > 0 and row["R2starmap_rim"]
    assert row["stage"] == "chronic active", row["evidence"]


def test_contrasts_against_the_white_matter_around_the_lesion():
    """A smooth residual across the brain (QSM background, B1+) cancels against the local NAWM."""
    shape, voxel = (60, 20, 20), (2.0, 2.0, 2.0)
    lesion, distance = _sphere(shape, (45.0, 9.5, 9.5), 2.5)
    nawm = ~lesion & (distance > 1.5)  # the perilesional margin of the NAWM mask
    gradient = -0.002 * 2.0 * (np.indices(shape)[0] - 30.0)  # -2 ppb per mm: -60 ppb at the lesion
    chi = np.where(lesion, -0.018, -0.030) + gradient  # +12 ppb over NAWM: a chronic inactive lesion
    r1 = np.where(lesion, 0.7, 1.0)  # 30 % R1 loss: 0.4 ppb per percent
    _, (local,) = analyse_lesions({"Chimap": chi, "R1map": r1}, lesion, nawm, voxel)
    _, (whole,) = analyse_lesions({"Chimap": chi, "R1map": r1}, lesion, nawm, voxel, reference_mm=0)
    assert local["Chimap_contrast"] == pytest.approx(0.012, abs=0.002)
    assert local["stage"] == "chronic inactive", local["evidence"]
    assert whole["Chimap_contrast"] < -0.02 and whole["stage"] == "early active"
    assert local["reference_voxels"] < whole["reference_voxels"] == nawm.sum()
