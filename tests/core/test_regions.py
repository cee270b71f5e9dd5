"""Regional statistics: concentration and content per region, erosion, NAWM, label-name mapping."""

import numpy as np
import pytest

from qmri_workflows.core.regions import (
    REGIONS,
    erode_mask,
    normal_appearing_white_matter,
    region_masks,
    region_statistics,
    regional_statistics,
    regions_from_label_names,
    tissue_classes_from_maps,
)

FREESURFER = {
    0: "Unknown",
    2: "Left-Cerebral-White-Matter",
    3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle",
    5: "Left-Inf-Lat-Vent",
    7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus-Proper",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    14: "3rd-Ventricle",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    24: "CSF",
    41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex",
    49: "Right-Thalamus",
    77: "WM-hypointensities",
    1001: "ctx-lh-bankssts",
    2001: "ctx-rh-bankssts",
}


def test_freesurfer_and_synthseg_names_map_onto_regions():
    regions, unmapped = regions_from_label_names(FREESURFER)
    assert regions == {
        "csf": (4, 5, 14, 24),
        "cortex": (3, 42, 1001, 2001),
        "white_matter": (2, 41),
        "caudate": (11,),
        "putamen": (12,),
        "pallidum": (13,),
        "thalamus": (10, 49),
        "lesion": (77,),
    }
    # cerebellum, brainstem and hippocampus are not among the package's regions
    assert set(unmapped) == {7, 8, 16, 17}


def test_phantom_names_map_onto_regions():
    from qmri_workflows.phantom.tissues import LABELS

    regions, unmapped = regions_from_label_names(LABELS)
    assert regions["pallidum"] == (6,) and regions["cortex"] == (2,) and regions["white_matter"] == (3,)
    assert regions["lesion"] == (8, 9, 10, 11, 12, 13)
    assert set(regions) == set(REGIONS) and set(unmapped.values()) == {"skull", "scalp", "vein"}


def test_statistics_of_a_known_region():
    rng = np.random.default_rng(0)
    values = rng.normal(20.0, 2.0, size=(20, 20, 20))
    mask = np.zeros(values.shape, dtype=bool)
    mask[5:15, 5:15, 5:10] = True
    values[mask.nonzero()[0][0], mask.nonzero()[1][0], mask.nonzero()[2][0]] = np.nan  # a failed fit
    stats = region_statistics(values, mask, voxel_volume_mm3=2.0)
    finite = values[mask][np.isfinite(values[mask])]
    assert stats["voxels"] == 499 and stats["volume_mm3"] == 998.0
    assert stats["mean"] == pytest.approx(finite.mean()) and stats["median"] == pytest.approx(np.median(finite))
    assert stats["sd"] == pytest.approx(finite.std(ddof=1))
    assert stats["content"] == pytest.approx(stats["mean"] * stats["volume_mm3"])
    empty = region_statistics(values, np.zeros_like(mask), 1.0)
    assert empty["voxels"] == 0 and np.isnan(empty["mean"]) and empty["content"] == 0


def test_erosion_removes_the_partial_volume_edge():
    # a 10 mm cube of value 30 in a background of 10, blurred like a partial-volume edge
    from scipy import ndimage

    truth = np.full((30, 30, 30), 10.0)
    cube = np.zeros(truth.shape, dtype=bool)
    cube[10:20, 10:20, 10:20] = True
    truth[cube] = 30.0
    blurred = ndimage.uniform_filter(truth, 3)
    rows = {
        row["erosion_mm"]: row
        for e in (0.0, 1.0)
        for row in regional_statistics({"m": blurred}, {"cube": cube}, (1, 1, 1), erosion_mm=e)
    }
    assert rows[0.0]["mean"] < 28 and rows[1.0]["mean"] == pytest.approx(30.0)
    assert rows[1.0]["voxels"] == 8**3 and rows[1.0]["region_volume_mm3"] == 1000.0
    # anisotropic voxels: a 2 mm margin removes two 1 mm layers but only one 2 mm layer
    eroded = erode_mask(cube, 2.0, (1.0, 1.0, 2.0))
    assert eroded[12:18, 12:18, 11:19].all() and not eroded[11, 15, 15] and not eroded[15, 15, 10]
    with pytest.raises(ValueError, match=">= 0 mm"):
        erode_mask(cube, -1.0, (1, 1, 1))


def test_nawm_leaves_out_lesions_and_their_margin():
    wm = np.ones((20, 20, 20), dtype=bool)
    lesion = np.zeros_like(wm)
    lesion[10, 10, 10] = True
    nawm = normal_appearing_white_matter(wm, lesion, 2.0, (1.0, 1.0, 1.0))
    assert not nawm[10, 10, 10] and not nawm[12, 10, 10] and not nawm[11, 11, 10] and nawm[13, 10, 10]
    assert nawm.sum() == wm.sum() - (lesion | ~nawm).sum()


def test_region_masks_move_lesions_out_of_other_regions():
    labels = np.zeros((4, 4, 4), dtype=int)
    labels[:2] = 2  # white matter
    labels[2:] = 10  # thalamus
    regions, _ = regions_from_label_names(FREESURFER)
    lesion = np.zeros(labels.shape, dtype=bool)
    lesion[0, 0, 0] = True
    masks = region_masks(labels, regions, lesion_mask=lesion)
    assert masks["white_matter"].sum() == 31 and masks["lesion"].sum() == 1 and masks["deep_grey"].sum() == 32
    with pytest.raises(ValueError, match="lesion mask shape"):
        region_masks(labels, regions, lesion_mask=lesion[:2])


def test_tissue_classes_without_a_segmentation():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 3, size=(20, 20, 20))
    r1 = np.choose(truth, [0.25, 0.65, 1.05]) * (1 + 0.03 * rng.standard_normal(truth.shape))
    brain = np.ones(truth.shape, dtype=bool)
    brain[0] = False
    masks, used = tissue_classes_from_maps({"R2starmap": r1 * 0, "R1map": r1}, brain)
    assert used == "R1map"
    for k, region in enumerate(("csf", "grey_matter", "white_matter")):
        assert np.array_equal(masks[region], brain & (truth == k))
    with pytest.raises(ValueError, match="need one of"):
        tissue_classes_from_maps({"Chimap": r1}, brain)


def test_patient_concentration_rises_while_content_falls():
    """Atrophy of the phantom: the caudate's R2* (iron concentration) rises, its R2* mass falls."""
    pytest.importorskip("nilearn")
    from qmri_workflows.phantom.tissues import (
        CONTROL_TISSUES_3T,
        LABELS,
        PATIENT_ATROPHY,
        PATIENT_TISSUES_3T,
    )
    from qmri_workflows.phantom.truth import make_phantom

    rise = PATIENT_TISSUES_3T["caudate"].r2star / CONTROL_TISSUES_3T["caudate"].r2star
    # the truth: concentration up, but volume down by more, so content down
    assert rise > 1 and rise * (1 + PATIENT_ATROPHY["caudate"]) < 1
    regions, _ = regions_from_label_names(LABELS)
    tables = {}
    for subject in ("control", "patient"):
        truth = make_phantom(resolution=3.0, subject=subject)
        rows = regional_statistics({"R2starmap": truth.r2star}, region_masks(truth.dseg, regions), truth.voxel_size)
        tables[subject] = {row["region"]: row for row in rows}
        for row in rows:
            if row["voxels"]:
                assert row["content"] == pytest.approx(row["mean"] * row["volume_mm3"])
    control, patient = tables["control"]["caudate"], tables["patient"]["caudate"]
    assert patient["mean"] > control["mean"] and patient["content"] < control["content"]
    assert patient["volume_mm3"] < control["volume_mm3"]
    # the thalamus loses both (iron loss and atrophy), as Table 2 and Fig 3 of the review say
    assert tables["patient"]["thalamus"]["mean"] < tables["control"]["thalamus"]["mean"]
    assert tables["patient"]["thalamus"]["content"] < tables["control"]["thalamus"]["content"]
    assert tables["patient"]["csf"]["volume_mm3"] > tables["control"]["csf"]["volume_mm3"]
