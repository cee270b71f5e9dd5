"""The map registry: a family added in test code only is planned, built, written and published.

Nothing in ``qmri_workflows`` knows the toy family below: it brings its own core function,
interface, factory and registry entry, as a lab pipeline would.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from nipype.interfaces.base import BaseInterfaceInputSpec, File, SimpleInterface, TraitedSpec, traits

from qmri_workflows.cli import run
from qmri_workflows.io.derivatives import write_nifti
from qmri_workflows.io.query import GRE, collect_inputs, open_layout
from qmri_workflows.io.staging import STAGING_FOLDER
from qmri_workflows.workflows import registry
from qmri_workflows.workflows.base import init_qmri_wf
from tests.bids_factory import make_vfa_dataset


# --- the toy family: core function, interface, factory, entry --------------------------------------
def echo_ratio(first_echo, second_echo, mask, *, scale):
    """A trivial 'map': scaled ratio of two echoes inside the mask."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(mask, scale * second_echo / first_echo, 0.0)
    return np.nan_to_num(ratio)


class _EchoRatioInputSpec(BaseInterfaceInputSpec):
    first_echo = File(exists=True, mandatory=True)
    second_echo = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)
    scale = traits.Float(1.0, usedefault=True)


class _EchoRatioOutputSpec(TraitedSpec):
    ratio_file = File(exists=True)
    metadata = traits.Dict()


class EchoRatio(SimpleInterface):
    input_spec = _EchoRatioInputSpec
    output_spec = _EchoRatioOutputSpec

    def _run_interface(self, runtime):
        if self.inputs.scale < 0:
            raise RuntimeError("the toy map failed on purpose")
        first = nib.load(self.inputs.first_echo)
        ratio = echo_ratio(
            first.get_fdata(),
            nib.load(self.inputs.second_echo).get_fdata(),
            nib.load(self.inputs.mask_file).get_fdata() > 0,
            scale=self.inputs.scale,
        )
        self._results["ratio_file"] = str(write_nifti(os.path.join(runtime.cwd, "ratio.nii"), ratio, first.affine))
        self._results["metadata"] = {"EstimationAlgorithm": f"echo ratio x {self.inputs.scale:g}"}
        return runtime


def init_echo_ratio_wf(context):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name="echo_ratio_wf")
    inputnode = pe.Node(IdentityInterface(fields=["mask_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["ratio_file", "metadata"]), name="outputnode")
    series = context.inputs.gre[0]
    ratio = pe.Node(
        EchoRatio(first_echo=series.magnitude[0], second_echo=series.magnitude[1], scale=context.options["toy_scale"]),
        name="echo_ratio",
    )
    workflow.connect([
        (inputnode, ratio, [("mask_file", "mask_file")]),
        (ratio, outputnode, [("ratio_file", "ratio_file"), ("metadata", "metadata")]),
    ])  # fmt: skip
    return workflow


TOY = registry.MapFamily(
    key="echoratio",
    name="echo ratio",
    needs=(GRE,),
    depends=("brainmask",),
    consumes={"mask_file": ("brainmask", "mask_file")},
    describe=lambda inputs: "echoes 1 and 2 of the first flip angle",
    build=init_echo_ratio_wf,
    outputs=lambda inputs: [
        registry.Output(
            field="ratio_file", suffix="S0map", desc="echoratio", source_files=tuple(inputs.gre[0].magnitude[:2])
        )
    ],
    options=(registry.Option(("--toy-scale",), "toy_scale", {"type": float, "default": 1.0}),),
)


@pytest.fixture
def toy_family():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.key)


# --- tests -----------------------------------------------------------------------------------------
def test_toy_family_is_published_with_the_others_in_one_commit(tmp_path, toy_family, caplog):
    raw = make_vfa_dataset(tmp_path / "raw")
    out, work = tmp_path / "out", tmp_path / "work"
    code = run.main(
        [
            str(raw),
            str(out),
            "participant",
            "--nprocs",
            "1",
            "-w",
            str(work),
            "--skip-bids-validation",
            "--toy-scale",
            "2.5",
        ]
    )
    assert code == 0
    anat = out / "sub-01" / "anat"
    ratio = nib.load(anat / "sub-01_desc-echoratio_S0map.nii.gz")
    first, second = (
        nib.load(path).get_fdata() for path in sorted((raw / "sub-01" / "anat").glob("*flip-1_part-mag*.nii.gz"))[:2]
    )
    mask = nib.load(anat / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
    assert mask.any()
    assert np.allclose(ratio.get_fdata()[mask], 2.5 * second[mask] / first[mask], rtol=1e-5)
    sidecar = json.loads((anat / "sub-01_desc-echoratio_S0map.json").read_text())
    assert sidecar["EstimationAlgorithm"] == "echo ratio x 2.5"
    assert len(sidecar["Sources"]) == 2 and sidecar["Sources"][0].startswith("bids:raw:sub-01/anat/")
    assert "echo ratio: yes" in caplog.text

    # One commit node published the toy map together with the R2* maps and the mask.
    from nipype.utils.filemanip import loadpkl

    commits = list(work.rglob("commit/result_commit.pklz"))
    assert len(commits) == 1
    published = {os.path.basename(path) for path in loadpkl(commits[0]).outputs.out_files}
    assert {
        "sub-01_desc-echoratio_S0map.nii.gz",
        "sub-01_R2starmap.nii.gz",
        "sub-01_desc-brain_mask.nii.gz",
    } <= published
    assert not (out / STAGING_FOLDER).exists()


def test_a_failing_family_publishes_nothing_of_the_subject(tmp_path, toy_family):
    raw = make_vfa_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    code = run.main(
        [
            str(raw),
            str(out),
            "participant",
            "--nprocs",
            "1",
            "-w",
            str(tmp_path / "work"),
            "--skip-bids-validation",
            "--toy-scale",
            "-1",
        ]
    )
    assert code == run.EXIT_FAILURE
    assert not (out / "sub-01").exists(), "R2* maps were published although the subject failed"


def test_plan_says_why_a_family_does_not_run(tmp_path, toy_family):
    raw = make_vfa_dataset(tmp_path / "raw", n_echoes=1)
    inputs = collect_inputs(open_layout(raw), "01")
    plans = {plan.key: plan for plan in registry.plan_families(inputs)}
    assert plans["brainmask"].run
    assert not plans["r2star"].run and "needs at least 2" in plans["r2star"].reason
    assert plans["echoratio"].run
    assert str(plans["r2star"]).startswith("R2*: no, 1 echo(es)")


def test_dependents_of_a_skipped_family_are_skipped(tmp_path):
    dependent = registry.MapFamily(
        key="afterr2star",
        name="after R2*",
        needs=(GRE,),
        depends=("r2star",),
        describe=lambda inputs: "",
        build=init_echo_ratio_wf,
        outputs=lambda inputs: [],
    )
    registry.register(dependent)
    try:
        raw = make_vfa_dataset(tmp_path / "raw", n_echoes=1)
        plans = {plan.key: plan for plan in registry.plan_families(collect_inputs(open_layout(raw), "01"))}
        assert not plans["afterr2star"].run and "R2*" in plans["afterr2star"].reason
    finally:
        registry.unregister(dependent.key)


def test_registry_orders_dependencies_and_refuses_cycles():
    keys = [family.key for family in registry.registered_families()]
    assert keys.index("brainmask") < keys.index("r2star")
    first = registry.MapFamily(key="cyclea", name="a", depends=("cycleb",), describe=str, build=str, outputs=list)
    second = registry.MapFamily(key="cycleb", name="b", depends=("cyclea",), describe=str, build=str, outputs=list)
    registry.register(first)
    registry.register(second)
    try:
        with pytest.raises(ValueError, match="cycle"):
            registry.registered_families()
    finally:
        registry.unregister("cyclea")
        registry.unregister("cycleb")
    registry.register(
        registry.MapFamily(key="orphan", name="o", depends=("nothere",), describe=str, build=str, outputs=list)
    )
    try:
        with pytest.raises(ValueError, match="unknown family 'nothere'"):
            registry.registered_families()
    finally:
        registry.unregister("orphan")


def test_graph_gets_one_sink_per_output_and_one_commit(tmp_path, toy_family):
    raw = make_vfa_dataset(tmp_path / "raw", flip_angles=(4.0, 12.0, 20.0))
    inputs = collect_inputs(open_layout(raw), "01")
    workflow, _ = init_qmri_wf(subjects=[inputs], output_dir=str(tmp_path / "out"))
    names = workflow.list_node_names()
    sinks = sorted(name.rsplit(".", 1)[1] for name in names if ".ds_wf.ds_" in name)
    assert sinks == sorted(
        [
            "ds_brainmask_mask_brain",
            "ds_r2star_R2starmap",
            "ds_r2star_R2starmap_stderr",
            "ds_r2star_T2starmap",
            "ds_r2star_sigmamap_noise",
            "ds_r2star_S0map_flip1_0",
            "ds_r2star_S0map_flip2_1",
            "ds_r2star_S0map_flip3_2",
            "ds_echoratio_S0map_echoratio",
            # the analysis family reads every quantitative map (R2* here)
            "ds_analysis_stats_regions",
            "ds_analysis_stats_lesions",
            "ds_qsm_Chimap",
            "ds_qsm_fieldmap_local",
            "ds_qsm_fieldmap_total",
            "ds_qsm_magnitude",
            "ds_qsm_mask_qsm",
            "ds_r1_R1map",
            "ds_r1_R1map_stderr",
            "ds_r1_T1map",
            "ds_r1_M0map",
            "ds_pd_PDmap",
        ]
    )
    assert [name for name in names if name.endswith(".commit")] == ["sub_01_wf.ds_wf.commit"]


# --- a family that reads a file given with --derivatives --------------------------------------------
class _MaskedCopyInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True)
    mask_file = File(exists=True, mandatory=True)


class _MaskedCopyOutputSpec(TraitedSpec):
    out_file = File(exists=True)


class MaskedCopy(SimpleInterface):
    """The toy 'map' is the given B1+ field inside the brain mask (tells where the field arrived)."""

    input_spec = _MaskedCopyInputSpec
    output_spec = _MaskedCopyOutputSpec

    def _run_interface(self, runtime):
        field = nib.load(self.inputs.in_file)
        mask = nib.load(self.inputs.mask_file).get_fdata() > 0
        self._results["out_file"] = str(
            write_nifti(os.path.join(runtime.cwd, "b1.nii"), np.where(mask, field.get_fdata(), 0.0), field.affine)
        )
        return runtime


def init_b1_copy_wf(context):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name="b1_copy_wf")
    inputnode = pe.Node(IdentityInterface(fields=["b1_file", "mask_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["b1_file"]), name="outputnode")
    copy = pe.Node(MaskedCopy(), name="masked_copy")
    workflow.connect([
        (inputnode, copy, [("b1_file", "in_file"), ("mask_file", "mask_file")]),
        (copy, outputnode, [("out_file", "b1_file")]),
    ])  # fmt: skip
    return workflow


def _smooth_b1(points_mm):
    """A B1+ ratio varying smoothly with position (what a transmit field looks like)."""
    x, y, z = points_mm
    return 1.0 + 0.15 * np.exp(-((x - 2.0) ** 2 + (y + 3.0) ** 2 + (z - 1.0) ** 2) / (2 * 12.0**2))


def test_a_family_gets_a_derivative_input_on_the_map_grid(tmp_path):
    from qmri_workflows.io.derivatives import write_dataset_description, write_map
    from qmri_workflows.io.query import TB1MAP

    family = registry.MapFamily(
        key="b1copy",
        name="B1 copy",
        needs=(GRE,),
        depends=("brainmask",),
        consumes={"mask_file": ("brainmask", "mask_file")},
        derived_inputs={"b1_file": (TB1MAP, "linear")},
        check=lambda inputs: None if TB1MAP in inputs.derivatives else "no TB1map given",
        describe=lambda inputs: "the given TB1map",
        build=init_b1_copy_wf,
        outputs=lambda inputs: [
            registry.Output(field="b1_file", suffix="TB1map", desc="copy", source_files=(inputs.gre[0].magnitude[0],))
        ],
        runtime_metadata=False,
    )
    registry.register(family)
    try:
        raw = make_vfa_dataset(tmp_path / "raw", shape=(16, 16, 12))
        # A coarser, shifted and rotated grid around the same head.
        angle = np.deg2rad(12.0)
        rotation = np.array(
            [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
        )
        affine = np.eye(4)
        affine[:3, :3] = rotation @ np.diag([3.0, 3.0, 3.0])
        affine[:3, 3] = [-18.0, -22.0, -14.0]  # covers the map grid with a margin of 2 coarse voxels
        ijk = np.stack(np.meshgrid(*(np.arange(n) for n in (17, 15, 14)), indexing="ij"), axis=0)
        world = np.tensordot(affine[:3, :3], ijk, axes=1) + affine[:3, 3, None, None, None]
        derivatives = tmp_path / "b1maps"
        write_dataset_description(derivatives, name="external B1 maps")
        write_map(
            derivatives, 100.0 * _smooth_b1(world), affine, subject="01", suffix="TB1map", metadata={"Units": "percent"}
        )

        out = tmp_path / "out"
        code = run.main(
            [
                str(raw),
                str(out),
                "participant",
                "--nprocs",
                "1",
                "-w",
                str(tmp_path / "work"),
                "--skip-bids-validation",
                "--derivatives",
                str(derivatives),
            ]
        )
        assert code == 0
        copied = nib.load(out / "sub-01" / "fmap" / "sub-01_desc-copy_TB1map.nii.gz")
        reference = nib.load(next((raw / "sub-01" / "anat").glob("*echo-1_flip-1_part-mag*.nii.gz")))
        assert copied.shape == reference.shape and np.allclose(copied.affine, reference.affine)
        ijk = np.stack(np.meshgrid(*(np.arange(n) for n in reference.shape), indexing="ij"), axis=0)
        world = np.tensordot(reference.affine[:3, :3], ijk, axes=1) + reference.affine[:3, 3, None, None, None]
        mask = nib.load(out / "sub-01" / "anat" / "sub-01_desc-brain_mask.nii.gz").get_fdata() > 0
        values = copied.get_fdata()
        inside = mask & np.isfinite(values)
        assert inside.sum() == mask.sum() > 0
        assert np.allclose(values[inside], 100.0 * _smooth_b1(world)[inside], rtol=0.01)
    finally:
        registry.unregister(family.key)
