"""The PD workflow as a Nipype graph on phantom files, and its registry entry beside a stand-in r1 family."""

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.workflows import registry
from qmri_workflows.workflows.pd import PD_FAMILY, init_pd_wf
from tests.core.relaxometry.phantom_2mm import Subject2mm, format_errors, write_subject_files


@pytest.fixture(scope="module")
def subject_files(tmp_path_factory):
    subject = Subject2mm("patient", rb1cor_factor=2)
    return subject, write_subject_files(subject, tmp_path_factory.mktemp("pdwf"))


def _run(workflow, files, tmp_path, *, pair):
    for field in ("m0_file", "r1_file", "mask_file") + (("head_file", "body_file") if pair else ()):
        setattr(workflow.inputs.inputnode, field, files[field])
    workflow.base_dir = str(tmp_path)
    graph = workflow.run()
    calibrate = next(node for node in graph.nodes() if node.name == "calibrate_pd")
    return calibrate.result.outputs


def test_pd_workflow_with_the_receive_pair(subject_files, tmp_path):
    subject, files = subject_files
    outputs = _run(init_pd_wf(reference="csf", receive_pair=True), files, tmp_path, pair=True)
    pd = np.asarray(nib.load(outputs.pd_file).dataobj)
    errors = subject.median_errors(pd, subject.truth.pd)
    print(f"\nPD workflow, RB1COR pair: {format_errors(errors)}")
    assert max(abs(e) for e in errors.values()) < 2.0
    assert outputs.metadata["ReceiveCorrection"] == "rb1cor" and outputs.metadata["Units"] == "percent"


def test_pd_workflow_without_receive_correction_says_so(subject_files, tmp_path):
    subject, files = subject_files
    outputs = _run(init_pd_wf(reference="wm", receive_correction=False), files, tmp_path, pair=False)
    assert outputs.metadata["ReceiveCorrection"] == "none"
    assert outputs.metadata["CalibrationReference"] == "WM"
    pd = np.asarray(nib.load(outputs.pd_file).dataobj)
    # without the correction the receive field (+-30 %) stays in the map
    errors = subject.median_errors(pd, subject.truth.pd)
    assert max(abs(e) for e in errors.values()) > 5.0


def test_unknown_reference_is_refused():
    with pytest.raises(ValueError, match="reference must be one of"):
        init_pd_wf(reference="gm")


@pytest.fixture
def pd_beside_a_stand_in_r1():
    """The pd entry registered beside a stand-in for the r1 family (written in parallel)."""
    from qmri_workflows.io.query import GRE

    stand_in = registry.MapFamily(
        key="r1",
        name="R1 (stand-in)",
        needs=(GRE,),
        depends=("brainmask",),
        describe=lambda inputs: "stand-in",
        build=lambda context: None,
        outputs=lambda inputs: [],
    )
    registry.register(stand_in)
    registry.register(PD_FAMILY)
    yield PD_FAMILY
    registry.unregister("pd")
    registry.unregister("r1")


def test_the_pd_entry_consumes_the_r1_outputs_and_plans_after_a_stand_in_r1(tmp_path, pd_beside_a_stand_in_r1):
    from qmri_workflows.io.query import collect_inputs, open_layout
    from tests.bids_factory import make_vfa_dataset

    families = {family.key: family for family in registry.registered_families()}
    keys = [family.key for family in registry.registered_families()]
    assert keys.index("r1") < keys.index("pd") and keys.index("brainmask") < keys.index("pd")
    assert families["pd"].consumes == {
        "m0_file": ("r1", "m0_file"),
        "r1_file": ("r1", "r1_file"),
        "mask_file": ("brainmask", "mask_file"),
    }
    raw = make_vfa_dataset(tmp_path / "raw", receive=True)
    inputs = collect_inputs(open_layout(raw), "01")
    plans = {plan.key: plan for plan in registry.plan_families(inputs)}
    assert plans["pd"].run and "RB1COR head/body pair" in plans["pd"].reason
    options = {"pd_calibration": "wm", "pd_no_receive_correction": False}
    workflow = PD_FAMILY.build(registry.BuildContext(inputs=inputs, options=options))
    assert workflow.get_node("receive_sensitivity") is not None
    assert workflow.inputs.inputnode.head_file == inputs.receive.head_file
    assert [output.suffix for output in PD_FAMILY.outputs(inputs)] == ["PDmap"]
    (output,) = PD_FAMILY.outputs(inputs, options)
    assert inputs.receive.head_file in output.source_files and inputs.receive.body_file in output.source_files
    options["pd_no_receive_correction"] = True
    assert (
        PD_FAMILY.build(registry.BuildContext(inputs=inputs, options=options)).get_node("receive_sensitivity") is None
    )
    # the unused RB1COR pair is no source of the map, and the plan says it is not used
    (output,) = PD_FAMILY.outputs(inputs, options)
    assert not {inputs.receive.head_file, inputs.receive.body_file} & set(output.source_files)
    plans = {plan.key: plan for plan in registry.plan_families(inputs, options=options)}
    assert "no receive-field correction" in plans["pd"].reason and "RB1COR" not in plans["pd"].reason


def test_the_pd_options_reach_the_command_line(pd_beside_a_stand_in_r1):
    from qmri_workflows.cli.run import build_parser

    parser = build_parser()
    help_text = parser.format_help()
    assert "--pd-calibration" in help_text and "--no-receive-correction" in help_text
    args = parser.parse_args(["in", "out", "participant", "--pd-calibration", "wm", "--no-receive-correction"])
    assert args.pd_calibration == "wm" and args.pd_no_receive_correction is True
    defaults = parser.parse_args(["in", "out", "participant"])
    assert defaults.pd_calibration == "csf" and defaults.pd_no_receive_correction is False
