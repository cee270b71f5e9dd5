"""Which T1 a double-angle pair is read at, as the plan and the B1+ node's sidecar say it.

Found on the 3 mm phantom (SNR 50, DAM 60/120 deg at TR 2 s): with the first echoes of the two VFA
flip angles 0.5 ms apart the T1 correction was dropped silently (plan unchanged, sidecar "no VFA
images for T1" although there were two), and B1+ read +5.6 % in white matter and +11 % in CSF
(R1 +14 % and +26 %); a MEGRE-only dataset said nothing in the plan either.
"""

import pytest

from qmri_workflows.io.query import collect_inputs, open_layout
from qmri_workflows.workflows import registry
from qmri_workflows.workflows.relaxometry import _build_b1, _describe_b1
from tests.bids_factory import edit_sidecar, make_dataset, write_image, write_sidecar


def _with_dam(root, **options):
    dataset = make_dataset(root, **options)
    for index, angle in ((1, 60.0), (2, 120.0)):
        path = write_image(dataset.root / "sub-01" / "fmap" / f"sub-01_flip-{index}_TB1DAM.nii.gz", seed=index)
        write_sidecar(path, {"FlipAngle": angle, "RepetitionTimeExcitation": 2.0, "MagneticFieldStrength": 3.0})
    return dataset


def _plan_and_node(dataset):
    inputs = collect_inputs(open_layout(dataset.root), "01", None)
    workflow = _build_b1(registry.BuildContext(inputs=inputs, options={"n_coils": 1}))
    return _describe_b1(inputs), workflow.inputs.inputnode


def test_vfa_first_echoes_give_the_t1(tmp_path):
    plan, node = _plan_and_node(_with_dam(tmp_path / "raw"))
    assert "read at each voxel's T1 (DESPOT1 of the first echoes at flip 4, 20 deg)" in plan
    assert len(node.vfa_files) == 2


@pytest.mark.parametrize(
    ("gre", "edit", "reason"),
    [
        ("MEGRE", False, "no T1 from the MEGRE data (fewer than two flip angles)"),
        ("VFA", True, "first echoes are at different TEs: 3, 3.5 ms"),
    ],
)
def test_long_tr_model_is_named_with_its_reason(tmp_path, gre, edit, reason):
    dataset = _with_dam(tmp_path / "raw", gre=gre)
    if edit:
        for path in dataset.files["gre"] + dataset.files["gre_phase"]:
            if "flip-2" in path.name:
                echo = int(path.name.split("echo-")[1].split("_")[0])
                edit_sidecar(path, EchoTime=round(0.0035 + 0.004 * (echo - 1), 6))
    plan, node = _plan_and_node(dataset)
    assert "long-TR model" in plan and reason in plan
    assert reason in node.t1_note
