"""Derivative inputs (``--derivatives``): TB1map, dseg + tsv, lesion mask and brain mask."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.io.query import (
    BRAIN_MASK,
    DSEG,
    GRE,
    LESION_MASK,
    TB1MAP,
    BIDSInputError,
    DerivativeFile,
    collect_inputs,
    open_derivatives,
    open_layout,
)
from tests.bids_factory import (
    DEFAULT_AFFINE,
    make_dataset,
    make_derivatives,
    write_image,
)


def _collect(raw, derivatives, subject="01", session=None):
    return collect_inputs(
        open_layout(raw.root), subject, session, derivatives=open_derivatives([d.root for d in derivatives])
    )


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_derivative_inputs_found_with_sessions_on_another_grid(tmp_path):
    raw = make_dataset(tmp_path / "raw", sessions=("pre", "post"))
    derivatives = make_derivatives(tmp_path / "deriv", sessions=("pre", "post"))
    before = _snapshot(derivatives.root)
    inputs = _collect(raw, [derivatives], session="pre")
    assert inputs.problems == ()
    assert set(inputs.derivatives) == {TB1MAP, DSEG, LESION_MASK, BRAIN_MASK}
    for collection in (TB1MAP, DSEG, LESION_MASK, BRAIN_MASK):
        assert inputs.has(collection)
        found = inputs.derivatives[collection]
        assert isinstance(found, DerivativeFile)
        assert "ses-pre" in found.path and "ses-post" not in found.path
        # kept on their own grid: resampling onto the GRE grid is done later
        assert not np.allclose(nib.load(found.path).affine, DEFAULT_AFFINE)
    tb1map = inputs.derivatives[TB1MAP]
    assert tb1map.path.endswith("fmap/sub-01_ses-pre_TB1map.nii.gz")
    assert tb1map.metadata["Units"] == "p.u." and tb1map.tsv is None
    dseg = inputs.derivatives[DSEG]
    assert dseg.tsv.endswith("sub-01_ses-pre_desc-tissue_dseg.tsv")
    assert inputs.derivatives[LESION_MASK].path.endswith("_label-lesion_mask.nii.gz")
    assert inputs.derivatives[BRAIN_MASK].path.endswith("_desc-brain_mask.nii.gz")
    assert len(inputs.gre) == 2  # raw collections unaffected
    assert "TB1map (derivative)" in inputs.describe()
    assert _snapshot(derivatives.root) == before  # nothing written into the derivatives dataset


def test_session_must_match(tmp_path):
    raw = make_dataset(tmp_path / "raw", sessions=("pre", "post"))
    derivatives = make_derivatives(tmp_path / "deriv", sessions=("post",))
    inputs = _collect(raw, [derivatives], session="pre")
    assert inputs.derivatives == {} and inputs.problems == ()


def test_tb1map_without_units_is_noted(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(
        tmp_path / "deriv", tb1map_units=None, dseg=False, lesion_mask=False, brain_mask=False
    )
    inputs = _collect(raw, [derivatives])
    assert "Units" not in inputs.derivatives[TB1MAP].metadata
    assert any("TB1map" in note and 'no "Units"' in note for note in inputs.notes)


def test_dseg_without_tsv(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(tmp_path / "deriv", dseg_tsv=False)
    inputs = _collect(raw, [derivatives])
    assert [p.collection for p in inputs.problems] == [DSEG]
    message = inputs.problem(DSEG).message
    assert "sub-01_desc-tissue_dseg.nii.gz has no label table" in message
    assert "sub-01_desc-tissue_dseg.tsv" in message and "'index' and 'name'" in message
    assert not inputs.has(DSEG) and inputs.has(TB1MAP) and inputs.has(BRAIN_MASK)


def test_dseg_tsv_inherited_from_the_dataset_root(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(tmp_path / "deriv")
    (tsv,) = derivatives.files["dseg_tsv"]
    inherited = derivatives.root / "desc-tissue_dseg.tsv"
    tsv.rename(inherited)
    inputs = _collect(raw, [derivatives])
    assert inputs.derivatives[DSEG].tsv == str(inherited)


def test_dseg_labels_missing_from_tsv(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(tmp_path / "deriv")
    (tsv,) = derivatives.files["dseg_tsv"]
    tsv.write_text("index\tname\n1\tCSF\n")
    message = _collect(raw, [derivatives]).problem(DSEG).message
    assert re.search(r"holds labels missing from its table .*dseg.tsv: 2, 3", message)
    tsv.write_text("label\tname\n1\tCSF\n")
    message = _collect(raw, [derivatives]).problem(DSEG).message
    assert "needs columns 'index' and 'name'" in message


def test_two_dseg_candidates(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(tmp_path / "deriv")
    (dseg,) = derivatives.files["dseg"]
    other = dseg.with_name("sub-01_desc-aseg_dseg.nii.gz")
    other.write_bytes(dseg.read_bytes())
    inputs = _collect(raw, [derivatives])
    message = inputs.problem(DSEG).message
    assert "several anat/*_dseg candidates for sub-01" in message
    assert dseg.name in message and other.name in message and "keep one" in message
    assert DSEG not in inputs.derivatives and inputs.has(LESION_MASK)


def test_candidates_in_two_datasets_and_template_space_ignored(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    first = make_derivatives(tmp_path / "first", dseg=False, lesion_mask=False, brain_mask=False)
    second = make_derivatives(tmp_path / "second", tb1map=False, dseg=False, lesion_mask=False)
    (mask,) = second.files["brain_mask"]
    mask.with_name("sub-01_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz").write_bytes(mask.read_bytes())
    inputs = _collect(raw, [first, second, first])  # a dataset given twice is read once
    assert inputs.problems == ()
    assert inputs.derivatives[BRAIN_MASK].path == str(mask)  # the template-space copy is not a candidate
    assert inputs.derivatives[TB1MAP].path == str(first.files["tb1map"][0])
    third = make_derivatives(tmp_path / "third", dseg=False, lesion_mask=False, brain_mask=False)
    inputs = _collect(raw, [first, third])
    message = inputs.problem(TB1MAP).message
    assert str(first.root) in message and str(third.root) in message


@pytest.mark.parametrize(
    "collection, data, match",
    [
        (LESION_MASK, np.full((10, 10, 8), 0.4), "non-integer values .* threshold or round it"),
        (BRAIN_MASK, np.zeros((10, 10, 8)), "brain mask .* is empty"),
        (TB1MAP, np.full((10, 10, 8, 2), 100.0), r"shape \(10, 10, 8, 2\); one 3D volume per file"),
        (TB1MAP, np.full((10, 10, 8), np.inf), "infinite values"),
        (DSEG, np.full((10, 10, 8), -1.0), "negative labels"),
    ],
)
def test_broken_derivative_is_a_problem_of_its_collection_only(tmp_path, collection, data, match):
    raw = make_dataset(tmp_path / "raw")
    derivatives = make_derivatives(tmp_path / "deriv")
    key = {LESION_MASK: "lesion_mask", BRAIN_MASK: "brain_mask", TB1MAP: "tb1map", DSEG: "dseg"}[collection]
    (path,) = derivatives.files[key]
    write_image(path, data, affine=np.eye(4))
    inputs = _collect(raw, [derivatives])
    assert [p.collection for p in inputs.problems] == [collection]
    assert re.search(match, inputs.problem(collection).message)
    assert path.name in inputs.problem(collection).message
    assert set(inputs.derivatives) == {TB1MAP, DSEG, LESION_MASK, BRAIN_MASK} - {collection}
    assert inputs.has(GRE)


def test_open_derivatives_refuses_raw_dataset_and_non_dataset(tmp_path):
    raw = make_dataset(tmp_path / "raw")
    with pytest.raises(
        BIDSInputError,
        match=r"raw.* is not a BIDS derivatives dataset .*DatasetType 'raw'.*"
        r"\"DatasetType\": \"derivative\"",
    ):
        open_derivatives([raw.root])
    (tmp_path / "plain").mkdir()
    with pytest.raises(BIDSInputError, match=r"plain is not a BIDS dataset root.*dataset_description.json"):
        open_derivatives([tmp_path / "plain"])
    with pytest.raises(BIDSInputError, match="derivatives dataset .*nowhere does not exist"):
        open_derivatives([tmp_path / "nowhere"])
    unlabelled = make_derivatives(tmp_path / "old_tool", dataset_type=None)
    assert len(open_derivatives([unlabelled.root])) == 1  # GeneratedBy, no DatasetType: accepted
    (unlabelled.root / "dataset_description.json").write_text(json.dumps({"Name": "x"}))
    with pytest.raises(BIDSInputError, match="not a BIDS derivatives dataset"):
        open_derivatives([unlabelled.root])
