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
        ratio = echo_ratio(first.get_fdata(), nib.load(self.inputs.second_echo).get_fdata(),
                           nib.load(self.inputs.mask_file).get_fdata() > 0, scale=self.inputs.scale)
        self._results["ratio_file"] = str(write_nifti(os.path.join(runtime.cwd, "ratio.nii"), ratio,
                                                      first.affine))
        self._results["metadata"] = {"EstimationAlgorithm": f"echo ratio x {self.inputs.scale:g}"}
        return runtime


def init_echo_ratio_wf(context):
    from nipype.interfaces.utility import IdentityInterface
    from nipype.pipeline import engine as pe

    workflow = pe.Workflow(name="echo_ratio_wf")
    inputnode = pe.Node(IdentityInterface(fields=["mask_file"]), name="inputnode")
    outputnode = pe.Node(IdentityInterface(fields=["ratio_file", "metadata"]), name="outputnode")
    series = context.inputs.gre[0]
    ratio = pe.Node(EchoRatio(first_echo=series.magnitude[0], second_echo=series.magnitude[1],
                              scale=context.options["toy_scale"]), name="echo_ratio")
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
    outputs=lambda inputs: [registry.Output(field="ratio_file", suffix="S0map", desc="echoratio",
                                            source_files=tuple(inputs.gre[0].magnitude[:2]))],
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
    code = run.main([str(raw), str(out), "participant", "--nprocs", "1", "-w", str(work),
                     "--skip-bids-validation", "--toy-scale", "2.5"])
    assert code == 0
    anat = out / "sub-01" / "anat"
    ratio = nib.load(anat / "sub-01_desc-echoratio_S0map.nii.gz")
    first, second = (nib.load(path).get_fdata() for path in
                     sorted((raw / "sub-01" / "anat").glob("*flip-1_part-mag*.nii.gz"))[:2])
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
    assert {"sub-01_desc-echoratio_S0map.nii.gz", "sub-01_R2starmap.nii.gz",
            "sub-01_desc-brain_mask.nii.gz"} <= published
    assert not (out / STAGING_FOLDER).exists()


def test_a_failing_family_publishes_nothing_of_the_subject(tmp_path, toy_family):
    raw = make_vfa_dataset(tmp_path / "raw")
    out = tmp_path / "out"
    code = run.main([str(raw), str(out), "participant", "--nprocs", "1", "-w", str(tmp_path / "work"),
                     "--skip-bids-validation", "--toy-scale", "-1"])
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
        key="afterr2star", name="after R2*", needs=(GRE,), depends=("r2star",),
        describe=lambda inputs: "", build=init_echo_ratio_wf, outputs=lambda inputs: [])
    registry.register(dependent)
    try:
        raw = make_vfa_dataset(tmp_path / "raw", n_echoes=1)
        plans = {plan.key: plan for plan in
                 registry.plan_families(collect_inputs(open_layout(raw), "01"))}
        assert not plans["afterr2star"].run and "R2*" in plans["afterr2star"].reason
    finally:
        registry.unregister(dependent.key)


def test_registry_orders_dependencies_and_refuses_cycles():
    keys = [family.key for family in registry.registered_families()]
    assert keys.index("brainmask") < keys.index("r2star")
    first = registry.MapFamily(key="cyclea", name="a", depends=("cycleb",), describe=str, build=str,
                               outputs=list)
    second = registry.MapFamily(key="cycleb", name="b", depends=("cyclea",), describe=str, build=str,
                                outputs=list)
    registry.register(first)
    registry.register(second)
    try:
        with pytest.raises(ValueError, match="cycle"):
            registry.registered_families()
    finally:
        registry.unregister("cyclea")
        registry.unregister("cycleb")
    registry.register(registry.MapFamily(key="orphan", name="o", depends=("nothere",), describe=str,
                                         build=str, outputs=list))
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
    assert sinks == sorted(["ds_brainmask_mask_brain", "ds_r2star_R2starmap", "ds_r2star_R2starmap_stderr",
                            "ds_r2star_T2starmap",
                            "ds_r2star_S0map_flip1_0", "ds_r2star_S0map_flip2_1", "ds_r2star_S0map_flip3_2",
                            "ds_echoratio_S0map_echoratio"])
    assert [name for name in names if name.endswith(".commit")] == ["sub_01_wf.ds_wf.commit"]
