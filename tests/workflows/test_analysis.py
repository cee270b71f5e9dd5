"""The analysis family on a phantom: regional tables match the truth, lesion tables, maps flow in."""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.core.lesions import LESION_STAGES, UNDETERMINED
from qmri_workflows.core.regions import (
    normal_appearing_white_matter,
    region_masks,
    region_statistics,
    regions_from_label_names,
)
from qmri_workflows.interfaces.analysis import SubjectAnalysis, read_label_table
from qmri_workflows.io.query import collect_inputs, open_layout
from qmri_workflows.io.tables import read_table
from qmri_workflows.workflows import registry
from qmri_workflows.workflows.base import init_qmri_wf
from tests.bids_factory import make_vfa_dataset

pytest.importorskip("nilearn")

from tests.analysis_dataset import RESOLUTION  # noqa: E402


@pytest.fixture(scope="module")
def outputs(phantom_participant_outputs):
    return phantom_participant_outputs


def _load(path):
    return np.asanyarray(nib.load(path).dataobj)


def _truth_regions(truth, subject):
    anat = truth / f"sub-{subject}" / "anat"
    labels = _load(anat / f"sub-{subject}_dseg.nii.gz")
    lesion_file = anat / f"sub-{subject}_label-lesion_mask.nii.gz"
    lesion = _load(lesion_file) > 0 if lesion_file.exists() else np.zeros(labels.shape, dtype=bool)
    regions, _ = regions_from_label_names(read_label_table(anat / f"sub-{subject}_dseg.tsv"))
    masks = region_masks(labels, regions, lesion_mask=lesion)
    voxel = (RESOLUTION,) * 3
    masks["nawm"] = normal_appearing_white_matter(masks["white_matter"], lesion, 2.0, voxel)
    return masks, lesion


@pytest.mark.parametrize("subject", ["01", "02"])
def test_regional_r2star_matches_truth(outputs, subject):
    """Noiseless, unoversampled images are the exact model: the R2* table equals the truth's."""
    _, out, truth = outputs
    masks, _ = _truth_regions(truth, subject)
    truth_r2star = _load(truth / f"sub-{subject}" / "anat" / f"sub-{subject}_R2starmap.nii.gz")
    table = read_table(out / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-regions_stats.tsv")
    rows = {(row["region"], row["map"]): row for row in table}
    assert {name for _, name in rows} == {"R2starmap", "Chimap", "R1map", "PDmap", "R2map"}
    assert set(masks) == {region for region, _ in rows}
    for region, mask in masks.items():
        expected = region_statistics(truth_r2star, mask, RESOLUTION**3)
        row = rows[(region, "R2starmap")]
        assert int(row["voxels"]) == expected["voxels"], region
        assert float(row["volume_mm3"]) == pytest.approx(expected["volume_mm3"], rel=1e-5)
        if expected["voxels"]:
            # the R2* accuracy target of noiseless exact-model data (tests/workflows/test_r2star_phantom.py)
            assert float(row["mean"]) == pytest.approx(expected["mean"], rel=1e-3), region
            assert float(row["content"]) == pytest.approx(float(row["mean"]) * float(row["volume_mm3"]), rel=1e-5)
    sidecar = json.loads((out / f"sub-{subject}" / "anat" / f"sub-{subject}_desc-regions_stats.json").read_text())
    assert sidecar["content"]["Units"] == "unit of the map x mm^3"
    assert set(sidecar["Maps"]) == {"R2starmap", "Chimap", "R1map", "PDmap", "R2map"}
    assert "labels of" in sidecar["Segmentation"] and sidecar["Sources"]


def test_lesion_table(outputs):
    _, out, truth = outputs
    _, lesion = _truth_regions(truth, "01")
    from scipy import ndimage

    anat = out / "sub-01" / "anat"
    table = read_table(anat / "sub-01_desc-lesions_stats.tsv")
    assert len(table) == ndimage.label(lesion)[1] > 0
    assert sum(int(row["voxels"]) for row in table) == int(lesion.sum())
    for row in table:
        assert row["stage"] in LESION_STAGES + (UNDETERMINED,) and row["evidence"]
    # lesion means add up to the truth's R2* over the lesion mask (exact-model data)
    truth_r2star = _load(truth / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz")
    total = sum(float(row["R2starmap_mean"]) * int(row["voxels"]) for row in table)
    assert total == pytest.approx(float(truth_r2star[lesion].sum()), rel=1e-3)
    dictionary = json.loads((anat / "sub-01_desc-lesions_stats.json").read_text())
    assert set(table[0]) <= set(dictionary) and dictionary["LesionMask"] == "from the lesion mask"
    # the control has no lesion: a table with its header only
    control = (out / "sub-02" / "anat" / "sub-02_desc-lesions_stats.tsv").read_text().splitlines()
    assert len(control) == 1 and control[0].startswith("lesion\tvoxels")


def test_without_segmentation_tissue_classes_of_the_maps(outputs, tmp_path, monkeypatch):
    _, out, _ = outputs
    anat = out / "sub-02" / "anat"
    monkeypatch.chdir(tmp_path)
    results = (
        SubjectAnalysis(
            map_files=[str(anat / "sub-02_R2starmap.nii.gz")],
            map_names=["R2starmap"],
            brain_mask_file=str(anat / "sub-02_desc-brain_mask.nii.gz"),
        )
        .run()
        .outputs
    )
    rows = {row["region"]: row for row in read_table(results.regions_file)}
    assert set(rows) == {"csf", "grey_matter", "white_matter", "nawm"}
    assert float(rows["csf"]["mean"]) < float(rows["grey_matter"]["mean"]) < float(rows["white_matter"]["mean"])
    assert "no deep grey nuclei" in results.metadata["Segmentation"]


def test_maps_flagged_quantitative_flow_into_the_analysis(tmp_path):
    """A family from outside the package flags its map: the analysis reads it without new code."""
    from tests.workflows.test_registry import TOY

    flagged = registry.MapFamily(
        **{
            **{f: getattr(TOY, f) for f in TOY.__dataclass_fields__},
            "outputs": lambda inputs: [
                registry.Output(
                    field="ratio_file",
                    suffix="MTsat",
                    source_files=tuple(inputs.gre[0].magnitude[:2]),
                    quantitative=True,
                )
            ],
        }
    )
    registry.register(flagged)
    try:
        raw = make_vfa_dataset(tmp_path / "raw")
        inputs = collect_inputs(open_layout(raw), "01")
        plans = {plan.key: plan for plan in registry.plan_families(inputs)}
        assert plans["analysis"].run
        workflow, _ = init_qmri_wf(subjects=[inputs], output_dir=str(tmp_path / "out"))
        node = workflow.get_node("sub_01_wf.analysis_wf.inputnode")
        assert sorted(node.inputs.map_names) == ["Chimap", "MTsat", "PDmap", "R1map", "R2starmap"]
    finally:
        registry.unregister(flagged.key)
    # without any quantitative map the analysis does not run
    raw = make_vfa_dataset(tmp_path / "raw1", n_echoes=1, flip_angles=(20.0,))
    plans = {plan.key: plan for plan in registry.plan_families(collect_inputs(open_layout(raw), "01"))}
    assert not plans["analysis"].run and plans["analysis"].reason == "no quantitative map is computed"


def test_gadolinium_mask_from_derivatives_reaches_the_lesion_stages(outputs, tmp_path):
    """An enhancement mask given with --derivatives: enhancing lesions active, the others chronic."""
    import shutil

    from qmri_workflows.cli import run

    raw, _, truth = outputs
    derivatives = tmp_path / "gd"
    shutil.copytree(truth, derivatives)
    anat = derivatives / "sub-01" / "anat"
    lesions = nib.load(anat / "sub-01_label-lesion_dseg.nii.gz")
    numbers = np.asanyarray(lesions.dataobj)
    stages = {int(row["index"]): row["stage"] for row in read_table(anat / "sub-01_label-lesion_dseg.tsv")}
    active = [n for n, stage in stages.items() if stage in ("early active", "late active")]
    enhancing = np.isin(numbers, active).astype(np.uint8)
    nib.save(nib.Nifti1Image(enhancing, lesions.affine), anat / "sub-01_label-enhancing_mask.nii.gz")
    out = tmp_path / "out"
    arguments = ["--participant-label", "01", "--skip-bids-validation", "-w", str(tmp_path / "work")]
    assert run.main([str(raw), str(out), "participant", "--derivatives", str(derivatives), *arguments]) == 0
    table = read_table(out / "sub-01" / "anat" / "sub-01_desc-lesions_stats.tsv")
    assert {row["enhancing"] for row in table} == {"true", "false"}
    for row in table:
        if row["enhancing"] == "false" and row["stage"] != "cortical":
            assert row["stage"] in ("chronic active", "chronic inactive"), row["evidence"]
        if row["enhancing"] == "true":
            assert row["stage"] != "chronic inactive", row["evidence"]
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_desc-lesions_stats.json").read_text())
    assert sidecar["EnhancementMask"] is True


def test_a_label_table_without_known_names_is_one_clear_error(tmp_path, monkeypatch):
    affine = np.eye(4)
    map_file, dseg_file = tmp_path / "R2starmap.nii.gz", tmp_path / "dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 20.0, np.float32), affine), map_file)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), affine), dseg_file)
    (tmp_path / "dseg.tsv").write_text("index\tname\n1\tblob\n")
    monkeypatch.chdir(tmp_path)
    interface = SubjectAnalysis(
        map_files=[str(map_file)],
        map_names=["R2starmap"],
        dseg_file=str(dseg_file),
        dseg_tsv=str(tmp_path / "dseg.tsv"),
    )
    with pytest.raises(ValueError, match=r"none of the label names of .*dseg.tsv .*name them as FreeSurfer does"):
        interface.run()
