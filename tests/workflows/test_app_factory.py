"""The BIDS App on small synthetic datasets: graph shape, plugins, sessions, failure handling."""

import hashlib
import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.cli import run
from qmri_workflows.io.query import collect_inputs, open_layout
from qmri_workflows.io.staging import STAGING_FOLDER
from qmri_workflows.workflows.base import init_qmri_wf
from qmri_workflows.workflows.qsm import BASE_GB
from tests.bids_factory import make_megre_dataset, make_vfa_dataset


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_graph_has_named_nodes_and_honest_resources(tmp_path):
    raw = make_vfa_dataset(tmp_path / "raw", subjects=("01", "02"))
    layout = open_layout(raw)
    subjects = [collect_inputs(layout, label) for label in ("01", "02")]
    workflow, plans = init_qmri_wf(subjects=subjects, output_dir=str(tmp_path / "out"), omp_nthreads=2)
    names = set(workflow.list_node_names())
    for subject in ("01", "02"):
        for node in (
            "brain_mask_wf.brain_mask",
            "r2star_wf.fit_r2star",
            "ds_wf.ds_r2star_R2starmap",
            "ds_wf.ds_r2star_S0map_flip1_0",
            "ds_wf.ds_r2star_S0map_flip2_1",
            "ds_wf.ds_brainmask_mask_brain",
            "ds_wf.commit",
        ):
            assert f"sub_{subject}_wf.{node}" in names
    # One commit per subject, whatever maps it has.
    assert sum(name.endswith(".commit") for name in names) == 2
    fit = workflow.get_node("sub_01_wf.r2star_wf.fit_r2star")
    assert fit.n_procs == 2 and fit.mem_gb >= 0.5
    assert [plan.name for plan in plans[("01", None)] if plan.run] == [
        "brain mask",
        "R2*",
        "R1",
        "PD",
        "QSM",
        "regional and lesion statistics",
    ]
    # The FFT-heavy QSM steps use the threads they are given; every step declares its memory.
    for node in ("total_field", "qsm_mask", "remove_background", "invert_dipole", "reference"):
        qsm_node = workflow.get_node(f"sub_01_wf.qsm_wf.{node}")
        assert qsm_node.mem_gb >= BASE_GB
    assert workflow.get_node("sub_01_wf.qsm_wf.invert_dipole").n_procs == 2


def test_megre_sessions_linear_plugin_writes_valid_derivatives(tmp_path):
    raw = make_megre_dataset(tmp_path / "raw", sessions=("a", "b"), n_echoes=4)
    before = _digest(raw)
    out = tmp_path / "out"
    code = run.main(
        [
            str(raw),
            str(out),
            "participant",
            "--nprocs",
            "1",
            "--session-label",
            "ses-b",
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
        ]
    )
    assert code == 0
    anat = out / "sub-01" / "ses-b" / "anat"
    names = sorted(p.name for p in anat.iterdir())
    assert names == sorted([
        "sub-01_ses-b_R2starmap.nii.gz", "sub-01_ses-b_R2starmap.json",
        "sub-01_ses-b_desc-stderr_R2starmap.nii.gz", "sub-01_ses-b_desc-stderr_R2starmap.json",
        "sub-01_ses-b_T2starmap.nii.gz", "sub-01_ses-b_T2starmap.json",
        "sub-01_ses-b_S0map.nii.gz", "sub-01_ses-b_S0map.json",
        "sub-01_ses-b_desc-brain_mask.nii.gz", "sub-01_ses-b_desc-brain_mask.json",
        "sub-01_ses-b_desc-noise_sigmamap.nii.gz", "sub-01_ses-b_desc-noise_sigmamap.json",
        "sub-01_ses-b_Chimap.nii.gz", "sub-01_ses-b_Chimap.json",
        "sub-01_ses-b_desc-qsm_mask.nii.gz", "sub-01_ses-b_desc-qsm_mask.json",
        "sub-01_ses-b_desc-regions_stats.tsv", "sub-01_ses-b_desc-regions_stats.json",
        "sub-01_ses-b_desc-lesions_stats.tsv", "sub-01_ses-b_desc-lesions_stats.json",
    ])  # fmt: skip
    assert sorted(p.name for p in (anat.parent / "fmap").iterdir()) == sorted([
        "sub-01_ses-b_desc-local_fieldmap.nii.gz", "sub-01_ses-b_desc-local_fieldmap.json",
        "sub-01_ses-b_desc-total_fieldmap.nii.gz", "sub-01_ses-b_desc-total_fieldmap.json",
        "sub-01_ses-b_magnitude.nii.gz", "sub-01_ses-b_magnitude.json",
    ])  # fmt: skip
    assert not (out / "sub-01" / "ses-a").exists()
    assert not (out / STAGING_FOLDER).exists()
    assert _digest(raw) == before, "the input dataset was modified"

    r2star = nib.load(anat / "sub-01_ses-b_R2starmap.nii.gz")
    source = nib.load(next((raw / "sub-01" / "ses-b" / "anat").glob("*echo-1*mag*.nii*")))
    assert r2star.get_data_dtype() == np.float32
    assert np.allclose(r2star.affine, source.affine)
    sidecar = json.loads((anat / "sub-01_ses-b_R2starmap.json").read_text())
    assert sidecar["Units"] == "1/s"
    assert sidecar["Sources"][0].startswith("bids:raw:sub-01/ses-b/anat/")
    assert len(sidecar["EchoTime"]) == 4
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert "participant" in description["GeneratedBy"][0]["CommandLine"]

    errors = run.run_validator(out)
    if errors is None:
        pytest.skip("bids-validator-deno is not installed")
    assert errors == []


def test_a_failing_step_publishes_nothing(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    broken = next((raw / "sub-01" / "anat").glob("*echo-2_flip-2_part-mag*.nii.gz"))
    image = nib.load(broken)
    nib.save(nib.Nifti1Image(np.full(image.shape, np.nan, np.float32), image.affine), broken)
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "2", "-w", str(tmp_path / "work"), "--skip-bids-validation"]
    )
    assert code == run.EXIT_FAILURE
    assert not out.exists(), "a run that published nothing left files in a new output folder"
    assert "crash" in caplog.text.lower()
    assert list((tmp_path / "work" / "logs").glob("qmri-workflows_*.log")), "the log was not kept"
    # the report goes beside the log, and says what failed
    report = (tmp_path / "work" / "reports" / "sub-01.html").read_text()
    assert "FAILED" in report and "r2star_wf" in report


def test_invalid_bids_is_refused_before_processing(tmp_path, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    (raw / "dataset_description.json").write_text("{}")
    if run.run_validator(raw) is None:
        pytest.skip("bids-validator-deno is not installed")
    code = run.main([str(raw), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w")])
    assert code == run.EXIT_INVALID_BIDS
    assert "--skip-bids-validation" in caplog.text


def test_workflow_from_python_with_relative_paths(tmp_path, monkeypatch):
    """The README's library example: relative paths work although nodes run in other folders."""
    from qmri_workflows.workflows.base import init_single_subject_wf

    make_vfa_dataset(tmp_path / "raw")
    monkeypatch.chdir(tmp_path)
    inputs = collect_inputs(open_layout("raw"), "01")
    workflow, plans = init_single_subject_wf(inputs=inputs, output_dir="out")
    workflow.base_dir = "work"
    workflow.run(plugin="Linear")
    assert (tmp_path / "out" / "sub-01" / "anat" / "sub-01_R2starmap.nii.gz").is_file()
    assert not (tmp_path / "out" / STAGING_FOLDER).exists()


def test_megre_without_flip_angle_records_none(tmp_path):
    raw = make_megre_dataset(tmp_path / "raw", n_echoes=3)
    for sidecar in raw.rglob("*.json"):
        metadata = json.loads(sidecar.read_text())
        if metadata.pop("FlipAngle", None) is not None:
            sidecar.write_text(json.dumps(metadata))
    out = tmp_path / "out"
    code = run.main(
        [str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "work"), "--skip-bids-validation"]
    )
    assert code == 0
    sidecar = json.loads((out / "sub-01" / "anat" / "sub-01_R2starmap.json").read_text())
    assert "FlipAngle" not in sidecar and len(sidecar["EchoTime"]) == 3


def test_each_s0_sidecar_describes_its_own_flip_angle(tmp_path):
    raw = make_vfa_dataset(tmp_path / "raw", flip_angles=(4.0, 20.0), repetition_time=0.025)
    out = tmp_path / "out"
    assert (
        run.main(
            [str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "w"), "--skip-bids-validation"]
        )
        == 0
    )
    anat = out / "sub-01" / "anat"
    for index, flip in ((1, 4.0), (2, 20.0)):
        sidecar = json.loads((anat / f"sub-01_desc-flip{index}_S0map.json").read_text())
        assert sidecar["FlipAngle"] == flip
        assert sidecar["RepetitionTimeExcitation"] == 0.025
        assert sidecar["Sources"] and all(f"_flip-{index}_" in uri for uri in sidecar["Sources"])
        assert "ESTATICS" in sidecar["EstimationAlgorithm"]
    r2star = json.loads((anat / "sub-01_R2starmap.json").read_text())
    assert r2star["FlipAngle"] == [4.0, 20.0] and len(r2star["Sources"]) == 6
