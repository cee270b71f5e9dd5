"""Entities come from the path inside the dataset: folders above it may be named like BIDS ones."""

import pytest

from qmri_workflows.io.query import (
    AFI,
    BRAIN_MASK,
    DSEG,
    GRE,
    LESION_MASK,
    RECEIVE,
    TB1MAP,
    collect_inputs,
    open_derivatives,
    open_layout,
    select_participants,
)
from tests.bids_factory import make_dataset, make_derivatives

# Folders that contain the dataset; pybids 0.22 read each of them as an entity of every file.
PARENTS = [
    "perf",
    "anat",
    "fmap",
    "sub-x",
    "ses-y",
    "perf/anat",
    "sub-x/ses-y",
    "anat/sub-x/ses-y/fmap",
    "acq-old/run-2/echo-9",
]


@pytest.mark.parametrize("parents", PARENTS)
def test_raw_dataset_below_entity_named_folders(tmp_path, parents):
    # Two subjects with sessions and inherited sidecars: a parent named sub-x / ses-y would merge
    # them, and sidecar inheritance (keyed on entities) would mix their metadata.
    raw = make_dataset(
        tmp_path / parents / "raw",
        subjects=("01", "02"),
        sessions=("1",),
        afi=True,
        receive=True,
        inherit=True,
        repetition_time=0.03,
    )
    layout = open_layout(raw.root)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    assert select_participants(layout) == [("01", "1"), ("02", "1")]
    for subject in ("01", "02"):
        inputs = collect_inputs(layout, subject, "1")
        assert inputs.problems == (), inputs.describe()
        assert inputs.has(GRE) and inputs.has(AFI) and inputs.has(RECEIVE)
        assert inputs.gre_suffix == "VFA" and [s.flip_angle for s in inputs.gre] == [4.0, 20.0]
        assert all(s.repetition_time == 0.03 and len(s.echo_times) == 3 for s in inputs.gre)
        every_file = [*inputs.gre[0].magnitude, *inputs.gre[1].phase, inputs.afi.tr1_file, inputs.receive.body_file]
        assert all(f"/sub-{subject}/ses-1/" in path for path in every_file)
        images = layout.get(subject=subject, extension=".nii.gz")
        datatypes = sorted(f.entities.get("datatype") for f in images)
        assert datatypes == ["anat"] * 12 + ["fmap"] * 4  # 2 flip angles x 3 echoes x 2 parts; 2 pairs


@pytest.mark.parametrize("parents", PARENTS)
def test_derivatives_dataset_below_entity_named_folders(tmp_path, parents):
    raw = make_dataset(tmp_path / "raw", sessions=("1",), phase=False)
    derivatives = make_derivatives(tmp_path / parents / "deriv", sessions=("1",))
    inputs = collect_inputs(open_layout(raw.root), "01", "1", derivatives=open_derivatives([derivatives.root]))
    assert inputs.problems == (), inputs.describe()
    assert set(inputs.derivatives) == {TB1MAP, DSEG, LESION_MASK, BRAIN_MASK}
    assert inputs.derivatives[TB1MAP].path.endswith("/deriv/sub-01/ses-1/fmap/sub-01_ses-1_TB1map.nii.gz")
    assert inputs.derivatives[TB1MAP].metadata["Units"] == "p.u."
