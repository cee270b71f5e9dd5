"""Ground truth of the digital MS-brain phantom."""

import re

import numpy as np
import pytest

pytest.importorskip("nilearn")

from qmri_workflows.phantom import anatomy, tissues  # noqa: E402
from qmri_workflows.phantom.anatomy import LocalFraction, build_anatomy, dense  # noqa: E402
from qmri_workflows.phantom.tissues import (  # noqa: E402
    BRAIN_LABELS,
    COMPARTMENT_LABELS,
    LABELS,
    LESION_LABELS,
    dseg_tsv_rows,
    scale_to_field,
    tissue_parameters,
)
from qmri_workflows.phantom.truth import PhantomTruth, _mix, _mix_mtsat, make_phantom  # noqa: E402
from tests.phantom_truths import SHARED_SEED, make_truth  # noqa: E402

WM, CGM, CAUDATE, PUTAMEN, PALLIDUM, THALAMUS = 3, 2, 4, 5, 6, 7
EARLY, LATE, CA_CORE, CA_RIM, INACTIVE, CORTICAL = 8, 9, 10, 11, 12, 13


@pytest.fixture(scope="module")
def patient4():
    return make_phantom(resolution=4.0, subject="patient", seed=0)


@pytest.fixture(scope="module")
def control4():
    return make_phantom(resolution=4.0, subject="control", seed=0)


@pytest.fixture(scope="module")
def patient1():
    # the session's shared 1 mm patient (tests/phantom_truths.py)
    return make_truth(resolution=1.0, subject="patient", seed=SHARED_SEED)


def _region_mean(phantom, name, label):
    return float(getattr(phantom, name)[phantom.dseg == label].mean())


# --- tables -----------------------------------------------------------------------------------


def test_labels_table():
    expected = [
        "background",
        "CSF",
        "cortical GM",
        "WM",
        "caudate",
        "putamen",
        "globus pallidus",
        "thalamus",
        "early active lesion",
        "late active lesion",
        "chronic active lesion core",
        "chronic active lesion rim",
        "chronic inactive lesion",
        "cortical lesion",
        "skull",
        "scalp",
        "vein",
    ]
    assert [LABELS[i] for i in range(len(expected))] == expected
    rows = dseg_tsv_rows()
    assert [row[0] for row in rows] == list(range(17))
    assert all(isinstance(row[2], str) and row[2] for row in rows)
    assert len({row[2] for row in rows}) == len(rows)
    assert set(COMPARTMENT_LABELS.values()) == set(range(1, 17))


def _documented_rows(doc):
    """Rows ``name value value ...`` of the rst tables of the tissues module docstring."""
    rows = {}
    number = r"[-+]?\d+(?:\.\d+)?"
    for line in doc.splitlines():
        match = re.match(
            rf"^([a-zA-Z][a-zA-Z ]+?)(?:\s*\([^)]*\))?\s+({number})\s+({number})"
            rf"\s+({number})\s+({number})\s+({number})",
            line,
        )
        if match:
            rows[match.group(1).strip()] = [float(match.group(i)) for i in range(2, 7)]
    return rows


def test_code_matches_documented_table():
    documented = _documented_rows(tissues.__doc__)
    control = tissues.CONTROL_TISSUES_3T
    patient = tissues.PATIENT_TISSUES_3T
    checks = {
        "CSF": control["csf"],
        "cortical GM": control["cortical_gm"],
        "WM": control["wm"],
        "caudate": control["caudate"],
        "putamen": control["putamen"],
        "globus pallidus": control["globus_pallidus"],
        "thalamus": control["thalamus"],
        "skull": control["skull"],
        "scalp": control["scalp"],
        "NAWM": patient["wm"],
        "early active lesion": patient["early_active"],
        "late active lesion": patient["late_active"],
        "chronic active lesion core": patient["chronic_active_core"],
        "chronic inactive lesion": patient["chronic_inactive"],
        "cortical lesion": patient["cortical_lesion_para"],
        "chronic active lesion rim": patient["chronic_active_rim"],
    }
    for name, values in checks.items():
        assert name in documented, name
        actual = [values.r1, values.r2, values.r2star, values.pd, values.chi]
        np.testing.assert_allclose(actual, documented[name], rtol=1e-9, err_msg=name)
    assert patient["cortical_lesion_dia"].chi < patient["cortical_gm"].chi


def test_every_compartment_obeys_basic_physics():
    for subject in ("patient", "control"):
        for strength in (1.5, 3.0, 7.0):
            for name, p in tissue_parameters(subject, strength).items():
                assert p.r2star >= p.r2 > 0 and p.r1 > 0, name
                assert 0 < p.pd <= 100, name


def test_field_strength_laws():
    wm = tissues.CONTROL_TISSUES_3T["wm"]
    at7 = scale_to_field(wm, 7.0)
    assert at7.r1 == pytest.approx(wm.r1 * (7 / 3) ** -0.38)
    assert at7.r2 == wm.r2 and at7.pd == wm.pd and at7.chi == wm.chi
    assert at7.r2star - at7.r2 == pytest.approx((wm.r2star - wm.r2) * 7 / 3)
    csf = tissues.CONTROL_TISSUES_3T["csf"]
    assert scale_to_field(csf, 1.5).r1 == csf.r1
    with pytest.raises(ValueError, match="-1"):
        scale_to_field(wm, -1)


def test_table_directions_follow_review():
    """Tables 1-2 of the review, row by row, on the parameter tables themselves."""
    control = tissue_parameters("control")
    patient = tissue_parameters("patient")
    nawm = patient["wm"]
    # NAWM vs control WM: R1, R2 down, PD up, R2* down, chi ~ unchanged.
    assert nawm.r1 < control["wm"].r1 and nawm.r2 < control["wm"].r2
    assert nawm.pd > control["wm"].pd and nawm.r2star < control["wm"].r2star
    assert abs(nawm.chi - control["wm"].chi) < 0.002
    early, late = patient["early_active"], patient["late_active"]
    core, rim, inactive = (patient["chronic_active_core"], patient["chronic_active_rim"], patient["chronic_inactive"])
    for lesion in (early, late, core, inactive):
        assert lesion.r1 < nawm.r1 and lesion.r2 < nawm.r2 and lesion.pd > nawm.pd
    assert early.r2star < nawm.r2star and abs(early.chi - nawm.chi) < 0.002
    # same chi as NAWM: nothing adds reversible dephasing R2' = R2* - R2 (edema dilutes it)
    assert early.r2star - early.r2 <= nawm.r2star - nawm.r2
    assert late.r2star < early.r2star and late.chi > nawm.chi + 0.02
    assert core.r1 < late.r1 and core.r2 < late.r2 and core.pd > late.pd
    assert core.r2star < nawm.r2star < rim.r2star
    assert rim.chi > late.chi and rim.chi > nawm.chi + 0.05
    assert inactive.r2star < rim.r2star and inactive.r2star < nawm.r2star
    assert inactive.chi > nawm.chi
    for nucleus in ("caudate", "putamen", "globus_pallidus"):
        assert patient[nucleus].r2star > control[nucleus].r2star
        assert patient[nucleus].chi > control[nucleus].chi
    thalamus = patient["thalamus"], control["thalamus"]
    assert thalamus[0].r1 < thalamus[1].r1 and thalamus[0].r2star < thalamus[1].r2star
    assert thalamus[0].chi < thalamus[1].chi
    cortex = patient["cortical_gm"], control["cortical_gm"]
    assert cortex[0].r1 < cortex[1].r1 and cortex[0].r2star < cortex[1].r2star
    for kind in ("cortical_lesion_para", "cortical_lesion_dia"):
        assert patient[kind].r2star < cortex[0].r2star
    assert patient["cortical_lesion_dia"].chi < cortex[0].chi < patient["cortical_lesion_para"].chi


def test_assumed_values_are_flagged():
    """Values the review does not report carry a machine-readable flag and a reason."""
    patient = tissues.PATIENT_TISSUES_3T
    fields = {"r1", "r2", "r2star", "pd", "chi"}
    for kind in ("cortical_lesion_para", "cortical_lesion_dia"):
        # no R1 study of cortical lesions exists (review); R2*/chi sizes are chosen
        assert {"r1", "r2", "pd"} <= set(patient[kind].assumed) <= fields
        assert "review" in patient[kind].assumption_note
        assert scale_to_field(patient[kind], 7.0).assumed == patient[kind].assumed
    for name, values in {**tissues.CONTROL_TISSUES_3T, **patient}.items():
        assert set(values.assumed) <= fields, name
        assert bool(values.assumed) == bool(values.assumption_note), name
    assert "assumed" in tissues.__doc__


# --- mixing ------------------------------------------------------------------------------------


def test_pure_compartments_give_table_values():
    parameters = tissue_parameters("patient", 3.0)
    names = list(parameters)
    fractions = {name: np.zeros((len(names), 1, 1), dtype=np.float32) for name in names}
    for i, name in enumerate(names):
        fractions[name][i] = 1.0
    r1, r2, r2star, pd, chi = _mix(fractions, parameters)
    for i, name in enumerate(names):
        p = parameters[name]
        np.testing.assert_allclose(
            [r1[i, 0, 0], r2[i, 0, 0], r2star[i, 0, 0], pd[i, 0, 0], chi[i, 0, 0]],
            [p.r1, p.r2, p.r2star, p.pd, p.chi],
            rtol=1e-6,
            atol=1e-7,
            err_msg=name,
        )


def test_mtsat_is_water_weighted():
    parameters = tissue_parameters("patient", 3.0)
    wm, csf = parameters["wm"], parameters["csf"]
    fractions = {"wm": np.array([[[1.0, 0.5, 0.0]]], dtype=np.float32)}
    fractions["csf"] = 1.0 - fractions["wm"]
    pd = _mix(fractions, parameters)[3]
    mtsat = _mix_mtsat(fractions, parameters, pd)
    expected = (0.5 * wm.pd * wm.mtsat + 0.5 * csf.pd * csf.mtsat) / (0.5 * wm.pd + 0.5 * csf.pd)
    np.testing.assert_allclose(mtsat[0, 0], [wm.mtsat, expected, csf.mtsat], rtol=1e-6)


def test_mixing_rule_everywhere(patient4):
    """The maps are the PD-weighted / volume-weighted mixes of the anatomy's fractions."""
    fractions = build_anatomy(resolution=4.0, subject="patient", seed=0).fractions
    # nuclei and lesions are stored in their boxes only
    assert isinstance(fractions["putamen"], LocalFraction) and isinstance(fractions["early_active"], LocalFraction)
    fractions = {name: dense(fraction) for name, fraction in fractions.items()}
    parameters = tissue_parameters("patient", 3.0)
    pd = sum(f * parameters[n].pd for n, f in fractions.items())
    chi = sum(f * parameters[n].chi for n, f in fractions.items())
    r1 = sum(f * parameters[n].pd * parameters[n].r1 for n, f in fractions.items())
    r1 = np.divide(r1, pd, out=np.zeros_like(r1), where=pd > 0)
    np.testing.assert_allclose(patient4.pd, pd, atol=1e-3)
    np.testing.assert_allclose(patient4.chi, chi, atol=1e-6)
    np.testing.assert_allclose(patient4.r1, r1, rtol=1e-5, atol=1e-6)
    total = sum(fractions.values())
    assert total.max() <= 1 + 1e-5 and min(f.min() for f in fractions.values()) >= 0
    assert np.all(patient4.pd[total == 0] == 0) and np.all(patient4.r1[total == 0] == 0)


# --- grid, masks, labels --------------------------------------------------------------------


def test_contract_types_and_grid(patient4):
    p = patient4
    assert isinstance(p, PhantomTruth)
    assert p.voxel_size == (4.0, 4.0, 4.0)
    np.testing.assert_allclose(p.affine[:3, :3], 4 * np.eye(3))
    for name in (
        "r1",
        "r2",
        "r2star",
        "pd",
        "chi",
        "b1",
        "receive",
        "b0_ppm",
        "background_field_ppm",
        "local_field_ppm",
        "phase_offset",
    ):
        array = getattr(p, name)
        assert array.dtype == np.float32 and array.shape == p.shape, name
        assert np.all(np.isfinite(array)), name
    assert p.dseg.dtype == np.int16 and p.brain_mask.dtype == bool and p.head_mask.dtype == bool
    assert np.all(p.r2star >= p.r2)
    assert p.pd.max() <= 100 + 1e-3
    assert not np.any(p.brain_mask & ~p.head_mask)
    assert np.all((p.dseg > 0) == p.head_mask)
    assert np.all(np.isin(p.dseg[p.brain_mask], list(BRAIN_LABELS)))
    # Head in air: ~10 mm of air on every side but the bottom, where the neck leaves the grid.
    index = np.argwhere(p.head_mask)
    low, high = index.min(0), np.asarray(p.shape) - 1 - index.max(0)
    assert low[2] == 0
    low[2] = high[2]
    assert np.all(np.concatenate([low, high]) * 4 >= 6)
    assert np.all(np.concatenate([low, high]) * 4 <= 16)
    # Head is the MNI head: brain centre near the origin of MNI space (world mm).
    centre = np.argwhere(p.brain_mask).mean(0) * 4 + p.affine[:3, 3]
    assert np.all(np.abs(centre - [0, -18, 8]) < 15)


def test_volumes_plausible(patient4):
    voxel_ml = 4.0**3 / 1000
    brain = patient4.brain_mask.sum() * voxel_ml
    head = patient4.head_mask.sum() * voxel_ml
    assert 1500 < brain < 2100  # MNI152 intracranial volume ~1.9 L
    assert 2.5 * 1000 < head < 5000


def test_large_lesion_classes_exist_at_4mm(patient4):
    present = set(np.unique(patient4.dseg))
    for label in (EARLY, LATE, CA_CORE, INACTIVE):
        assert label in present, LABELS[label]
    for label in (1, 2, 3, 4, 5, 7, 14, 15):
        assert label in present, LABELS[label]


def test_control_has_no_lesions(control4):
    assert not np.any(np.isin(control4.dseg, LESION_LABELS))
    assert control4.lesions == ()
    assert control4.subject == "control"


@pytest.mark.slow
def test_every_label_at_1mm(patient1):
    present = set(np.unique(patient1.dseg).tolist())
    assert present == set(LABELS)
    # Lesions are 3-10 mm and do not overlap.
    lesions = patient1.lesions
    assert len(lesions) == len(tissues.WM_LESIONS) + len(tissues.CORTICAL_LESIONS)
    for i, a in enumerate(lesions):
        assert 1.5 <= a.radius <= 5
        for b in lesions[i + 1 :]:
            assert np.linalg.norm(np.subtract(a.centre, b.centre)) >= a.radius + b.radius


@pytest.mark.slow
def test_pure_voxels_at_1mm_equal_table(patient1):
    fractions = build_anatomy(resolution=1.0, subject="patient", seed=SHARED_SEED).fractions
    parameters = tissue_parameters("patient", 3.0)
    checked = 0
    for name, fraction in fractions.items():
        pure = dense(fraction) >= 0.9999
        if not pure.any():
            continue
        p = parameters[name]
        for key in ("r1", "r2", "r2star", "pd", "chi"):
            np.testing.assert_allclose(
                getattr(patient1, key)[pure], getattr(p, key), rtol=2e-4, atol=2e-4, err_msg=f"{name} {key}"
            )
        checked += 1
    assert checked >= 12


@pytest.mark.slow
def test_cortical_lesions_mixed_chi_and_low_r2star(patient1):
    p = patient1
    cortex_chi = tissue_parameters("patient")["cortical_gm"].chi
    centre_index = [
        np.round((np.asarray(lesion.centre) - p.affine[:3, 3]) / 1.0).astype(int)
        for lesion in p.lesions
        if lesion.compartment.startswith("cortical")
    ]
    signs = set()
    for index in centre_index:
        box = tuple(slice(i - 3, i + 4) for i in index)
        mask = p.dseg[box] == CORTICAL
        assert mask.any()
        assert p.r2star[box][mask].mean() < _region_mean(p, "r2star", CGM)
        signs.add(np.sign(p.chi[box][mask].mean() - cortex_chi))
    assert signs == {-1.0, 1.0}


# --- patient vs control (Tables 1-2) on the maps ---------------------------------------------


def test_patient_control_differences_on_maps(patient4, control4):
    def mean(phantom, name, label):
        return _region_mean(phantom, name, label)

    # NAWM row (Table 1)
    assert mean(patient4, "r1", WM) < mean(control4, "r1", WM)
    assert mean(patient4, "r2", WM) < mean(control4, "r2", WM)
    assert mean(patient4, "pd", WM) > mean(control4, "pd", WM)
    assert mean(patient4, "r2star", WM) < mean(control4, "r2star", WM)
    # Lesion rows vs NAWM (partial volume at 4 mm only dilutes, it does not flip signs)
    nawm = {k: mean(patient4, k, WM) for k in ("r1", "r2", "r2star", "pd", "chi")}
    for label in (EARLY, LATE, CA_CORE, INACTIVE):
        assert mean(patient4, "r1", label) < nawm["r1"], LABELS[label]
        assert mean(patient4, "r2", label) < nawm["r2"], LABELS[label]
        assert mean(patient4, "pd", label) > nawm["pd"], LABELS[label]
        if label != CA_CORE:  # the central vein (R2* 50/s) of the larger chronic lesions raises its mean
            assert mean(patient4, "r2star", label) < nawm["r2star"], LABELS[label]
    assert mean(patient4, "r2star", LATE) < mean(patient4, "r2star", EARLY)
    assert mean(patient4, "chi", LATE) > nawm["chi"] + 0.01
    assert mean(patient4, "chi", INACTIVE) > nawm["chi"]
    # Deep grey matter (Table 2)
    for label in (CAUDATE, PUTAMEN, PALLIDUM):
        assert mean(patient4, "r2star", label) > mean(control4, "r2star", label), LABELS[label]
        assert mean(patient4, "chi", label) > mean(control4, "chi", label), LABELS[label]
    for key in ("r1", "r2star", "chi"):
        assert mean(patient4, key, THALAMUS) < mean(control4, key, THALAMUS), key
    # Normal-appearing cortex (Table 2)
    assert mean(patient4, "r1", CGM) < mean(control4, "r1", CGM)
    assert mean(patient4, "r2star", CGM) < mean(control4, "r2star", CGM)


@pytest.mark.slow
def test_chronic_active_rim_at_1mm(patient1):
    p = patient1
    nawm_r2star, nawm_chi = _region_mean(p, "r2star", WM), _region_mean(p, "chi", WM)
    assert _region_mean(p, "r2star", CA_RIM) > nawm_r2star > _region_mean(p, "r2star", CA_CORE)
    assert _region_mean(p, "chi", CA_RIM) > nawm_chi + 0.03


# --- fields -------------------------------------------------------------------------------------


def test_transmit_and_receive_fields(patient4):
    brain = patient4.brain_mask
    b1 = patient4.b1[brain]
    assert 0.7 <= b1.min() and b1.max() <= 1.3
    assert b1.max() - b1.min() > 0.3  # about +-25 % variation is present
    receive = patient4.receive[brain]
    assert receive.mean() == pytest.approx(1.0, abs=1e-3)
    assert 0.69 <= receive.min() and receive.max() <= 1.31
    # Smooth: neighbouring 4 mm voxels differ by a few % at most.
    for field in (patient4.b1, patient4.receive):
        for axis in range(3):
            assert (
                np.abs(np.diff(field, axis=axis))[
                    brain[:-1] if axis == 0 else (brain[:, :-1] if axis == 1 else brain[:, :, :-1])
                ].max()
                < 0.06
            )
    # Centre-bright transmit field (3 T head coil).
    centre = tuple(np.round(np.argwhere(brain).mean(0)).astype(int))
    assert patient4.b1[centre] > np.median(b1)


def test_body_coil_receive_is_nearly_uniform(patient4):
    brain = patient4.brain_mask
    body = patient4.body_receive[brain]
    assert body.mean() == pytest.approx(1.0, abs=1e-3)
    # a few percent, not exactly uniform, and much flatter than the head array
    assert 0.02 < np.abs(body - 1).max() <= 0.03 + 1e-6
    assert np.ptp(body) < 0.2 * np.ptp(patient4.receive[brain])


def test_label_fraction_marks_partial_volume(patient4):
    p = patient4
    assert p.label_fraction.dtype == np.float32 and p.label_fraction.shape == p.shape
    inside = p.head_mask
    assert np.all(p.label_fraction[inside] > 0) and np.all(p.label_fraction <= 1 + 1e-5)
    assert np.all(p.label_fraction[~inside] == 0)
    # deep white matter is (nearly) pure; the thin cortical ribbon is mostly partial volume
    wm, cortex = p.label_fraction[p.dseg == WM], p.label_fraction[p.dseg == CGM]
    assert np.percentile(wm, 90) > 0.9 and np.median(cortex) < np.median(wm)
    # it is the dseg label's own fraction: 1 - label_fraction is what other labels fill
    centre = tuple(np.round(np.argwhere(p.dseg == WM).mean(0)).astype(int))
    assert 0 < p.label_fraction[centre] <= 1


def test_field_below_the_field_grid_is_the_fine_grids_own(control4, monkeypatch):
    """Below FIELD_GRID_MM (1 mm) the dipole transforms run on a coarser grid (polyphase).

    The field assembled at every fine voxel must be the one a single transform of the fine grid
    gives. Exercised cheaply at 4 mm with the field grid moved to 8 mm (the 0.5 mm phantom takes
    minutes); the fields span 3.4 ppm in the brain.
    """
    from qmri_workflows.phantom import truth as truth_module

    monkeypatch.setattr(truth_module, "FIELD_GRID_MM", 8.0)
    assembled = make_phantom(resolution=4.0, subject="control", seed=0)
    reference = control4
    brain = reference.brain_mask
    for name in ("b0_ppm", "background_field_ppm", "local_field_ppm"):
        np.testing.assert_allclose(getattr(assembled, name)[brain], getattr(reference, name)[brain], atol=1e-5)
    assert abs(assembled.b0_ppm[brain].mean()) < 1e-5


def test_b0_is_sum_of_parts(patient4):
    p = patient4
    shim = p.b0_ppm - p.local_field_ppm - p.background_field_ppm
    index = np.argwhere(np.ones(p.shape, bool))
    design = np.column_stack([np.ones(len(index)), index])
    coef, *_ = np.linalg.lstsq(design, shim.ravel(), rcond=None)
    assert np.abs(design @ coef - shim.ravel()).max() < 1e-4  # linear shim residual
    slope_per_80mm = np.linalg.norm(coef[1:]) / 4.0 * 80  # coef is per 4 mm voxel
    assert 0 < slope_per_80mm <= 0.05 + 1e-4  # small first-order residual
    assert abs(p.b0_ppm[p.brain_mask].mean()) < 1e-4  # centre frequency on brain


def _air_probe(phantom, axis, side):
    """Mean background field in a few air voxels just outside the head along an axis."""
    centre = np.round(np.argwhere(phantom.brain_mask).mean(0)).astype(int)
    line = [slice(c, c + 1) for c in centre]
    line[axis] = slice(None)
    profile = phantom.head_mask[tuple(line)].ravel()
    inside = np.flatnonzero(profile)
    edge = inside[-1] + 1 if side > 0 else inside[0] - 1
    values = phantom.background_field_ppm[tuple(line)].ravel()
    return values[edge] if side > 0 else values[edge]


@pytest.mark.parametrize("b0_direction,along,across", [((0, 0, 1), 2, 0), ((1, 0, 0), 0, 2)])
def test_background_field_of_head_in_air(b0_direction, along, across):
    # Tissue is diamagnetic relative to air (-9.41 ppm): like a diamagnetic sphere, the field in the
    # air next to the head is lower on the B0 axis than beside it (dipole pattern 3cos^2 - 1).
    p = make_phantom(resolution=4.0, subject="control", seed=0, b0_direction=b0_direction)
    on_axis = _air_probe(p, along, +1)
    beside = _air_probe(p, across, +1)
    assert on_axis - beside < -2.0
    # Inside the brain the background is smooth and of a few ppm at most.
    bg = p.background_field_ppm[p.brain_mask]
    assert np.ptp(bg) < 6
    # The brain's own (local) field is much weaker than the background.
    local = p.local_field_ppm[p.brain_mask]
    assert np.abs(local).max() < 0.5 * np.abs(bg).max()


def test_background_field_is_harmonic_in_brain(control4):
    """No sources inside the brain: the Laplacian of the background vanishes there."""
    from scipy import ndimage

    p = control4
    bg = p.background_field_ppm.astype(float)
    local = p.local_field_ppm.astype(float)
    # 3 voxels (12 mm) in: the air cavities 1.5 mm from the brain make a steep (harmonic) field
    # whose 4 mm discrete Laplacian is not 0 closer to them
    interior = ndimage.binary_erosion(p.brain_mask, iterations=3)
    lap_bg = np.abs(ndimage.laplace(bg))[interior].mean()
    lap_local = np.abs(ndimage.laplace(local))[interior].mean()
    head_shell = p.head_mask & ~ndimage.binary_dilation(p.brain_mask, iterations=1)
    lap_shell = np.abs(ndimage.laplace(bg))[head_shell].mean()
    assert lap_bg < 0.1 * lap_shell
    assert lap_bg < lap_local


# --- determinism and parameters ----------------------------------------------------------------


def test_deterministic_for_seed(patient4):
    again = make_phantom(resolution=4.0, subject="patient", seed=0)
    for name in ("r1", "chi", "dseg", "b1", "receive", "b0_ppm", "phase_offset"):
        np.testing.assert_array_equal(getattr(again, name), getattr(patient4, name), err_msg=name)
    other = make_phantom(resolution=4.0, subject="patient", seed=1)
    assert other.lesions != patient4.lesions
    assert not np.array_equal(other.b1, patient4.b1)
    assert not np.array_equal(other.phase_offset, patient4.phase_offset)


def test_field_strength_changes_relaxation_only(patient4):
    at7 = make_phantom(resolution=4.0, subject="patient", seed=0, field_strength=7.0)
    wm = patient4.dseg == WM
    assert np.all(at7.r1[wm] < patient4.r1[wm])
    np.testing.assert_allclose(at7.r2, patient4.r2, rtol=1e-5)
    assert np.all(at7.r2star[wm] > patient4.r2star[wm])
    np.testing.assert_array_equal(at7.pd, patient4.pd)
    np.testing.assert_array_equal(at7.chi, patient4.chi)
    assert at7.field_strength == 7.0


@pytest.mark.parametrize(
    "kwargs", [dict(subject="healthy"), dict(resolution=0.0), dict(field_strength=0), dict(b0_direction=(0, 0, 0))]
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        make_phantom(**kwargs)


def test_missing_nilearn_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install qmri-workflows\[phantom\]"):
        anatomy.template_directory()


def test_patient_atrophy_follows_the_documented_changes(patient4, control4):
    voxel = 4.0**3
    volumes = {}
    for name, phantom in (("patient", patient4), ("control", control4)):
        labels = np.asarray(phantom.dseg)
        volumes[name] = {
            label: np.count_nonzero(labels == label) * voxel for label in (CGM, CAUDATE, PUTAMEN, THALAMUS)
        }
    for label, compartment in ((CAUDATE, "caudate"), (PUTAMEN, "putamen"), (THALAMUS, "thalamus")):
        change = volumes["patient"][label] / volumes["control"][label] - 1
        # 4 mm voxels quantise a few-mL nucleus coarsely: the sign and rough size must hold
        assert change < 0, (compartment, change)
        assert abs(change - tissues.PATIENT_ATROPHY[compartment]) < 0.15, (compartment, change)


def test_patient_atrophy_in_fractions():
    control = build_anatomy(resolution=2.0, subject="control")
    patient = build_anatomy(resolution=2.0, subject="patient")
    for compartment in ("thalamus", "caudate", "putamen", "globus_pallidus"):
        change = float(dense(patient.fractions[compartment]).sum() / dense(control.fractions[compartment]).sum()) - 1
        # the ellipsoids shrink by the table's change; their smooth 2 mm edge shrinks less
        assert tissues.PATIENT_ATROPHY[compartment] - 0.01 < change < tissues.PATIENT_ATROPHY[compartment] / 2
    cortex = float(patient.fractions["cortical_gm"].sum() / control.fractions["cortical_gm"].sum()) - 1
    assert -0.07 < cortex < tissues.PATIENT_ATROPHY["cortex"] + 0.005  # lesions take a little more
    assert float(patient.fractions["csf"].sum()) > float(control.fractions["csf"].sum()) * 1.05
    # total tissue is conserved inside the support: atrophy turns tissue into CSF
    total = {
        name: sum(float(dense(f).sum()) for key, f in anatomy_.fractions.items() if key not in ("skull", "scalp"))
        for name, anatomy_ in (("control", control), ("patient", patient))
    }
    assert total["patient"] == pytest.approx(total["control"], rel=1e-4)


def test_ventricles_grow_by_the_requested_volume():
    gm, wm, support, _ = anatomy.load_template()
    csf = np.clip(support - gm - wm, 0, 1)
    before, added = anatomy._grow_ventricles(csf, gm.copy(), wm.copy(), support, 1.0, 0.3)
    assert added == pytest.approx(0.3 * before, rel=0.01)
    assert 10_000 < before < 80_000  # mm^3: adult lateral + third ventricles


def test_lesion_index_numbers_each_lesion(patient4, control4):
    index = patient4.lesion_index
    assert index.dtype == np.int16 and index.shape == patient4.shape
    lesion_voxels = np.isin(patient4.dseg, LESION_LABELS)
    assert np.array_equal(index > 0, lesion_voxels)
    for number in np.unique(index[index > 0]):
        lesion = patient4.lesions[number - 1]
        points = np.argwhere(index == number) @ patient4.affine[:3, :3].T + patient4.affine[:3, 3]
        assert np.linalg.norm(points - lesion.centre, axis=1).max() <= lesion.radius + 4.0
        labels = set(np.unique(patient4.dseg[index == number]).tolist())
        expected = {
            "early_active": {EARLY},
            "late_active": {LATE},
            "chronic_active": {CA_CORE, CA_RIM},
            "chronic_inactive": {INACTIVE},
        }.get(lesion.compartment, {CORTICAL})
        assert labels <= expected, (lesion, labels)
    assert not control4.lesion_index.any()
    assert tissues.lesion_stage("chronic_active_rim") == "chronic active"
    assert tissues.lesion_stage("cortical_lesion_dia") == "cortical"
