"""Tests of the BIDS-derivatives writer (qmri_workflows.io.derivatives)."""

import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.io import derivatives as deriv
from qmri_workflows.io.derivatives import (
    DEFAULT_UNITS,
    bids_path,
    bids_uri,
    check_output_root,
    sidecar_path,
    write_dataset_description,
    write_dseg_tsv,
    write_json,
    write_map,
    write_nifti,
)

OBLIQUE_AFFINE = np.array(
    [
        [0.98, -0.17, 0.02, -40.5],
        [0.17, 0.97, -0.12, 12.25],
        [0.0, 0.12, 1.49, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _rigid_affine(zooms=(1.1, 1.2, 1.5), angle=0.3):
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(zooms)
    affine[:3, 3] = [-10.25, 20.5, -3.125]
    return affine


def _raw_dataset(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "raw", "BIDSVersion": "1.10.0", "DatasetType": "raw"})
    )
    return root


# ---------------------------------------------------------------------------------------------- names
def test_bids_path_entity_order_and_prefixes():
    path = bids_path(
        subject="sub-01",
        session="ses-base",
        suffix="VFA",
        part="mag",
        flip=2,
        echo=3,
        acq="bssfp090",
        desc="fit",
        run=1,
    )
    assert path == (
        "sub-01/ses-base/anat/sub-01_ses-base_acq-bssfp090_run-1_echo-3_flip-2_part-mag_desc-fit_VFA.nii.gz"
    )


def test_bids_path_all_entities_in_bids_order():
    values = {key: f"x{index}" for index, key in enumerate(deriv.ENTITY_ORDER)}
    name = bids_path(subject="01", suffix="R1map", **dict(reversed(list(values.items())))).split("/")[-1]
    keys = [part.split("-")[0] for part in name.split("_")[1:-1]]
    assert keys == list(deriv.ENTITY_ORDER)


def test_bids_path_fmap_and_extension():
    assert (
        bids_path(subject="01", suffix="TB1map", datatype="fmap", extension=".json") == "sub-01/fmap/sub-01_TB1map.json"
    )
    assert bids_path(subject="01", suffix="mask", desc="brain") == "sub-01/anat/sub-01_desc-brain_mask.nii.gz"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"acquisition": "x"}, "unknown BIDS entities"),
        ({"acq": "a_b"}, "alphanumeric"),
        ({"acq": "a-b"}, "alphanumeric"),
        ({"desc": ""}, "alphanumeric"),
        ({"echo": -1}, "non-negative"),
        ({"flip": 1.5}, "string label"),
    ],
)
def test_bids_path_rejects_bad_entities(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bids_path(subject="01", suffix="R1map", **kwargs)


def test_bids_path_rejects_bad_subject_suffix_datatype_extension():
    with pytest.raises(ValueError, match="sub"):
        bids_path(subject="0_1", suffix="R1map")
    with pytest.raises(ValueError, match="suffix"):
        bids_path(subject="01", suffix="R1 map")
    with pytest.raises(ValueError, match="datatype"):
        bids_path(subject="01", suffix="R1map", datatype="anatomy")
    with pytest.raises(ValueError, match="extension"):
        bids_path(subject="01", suffix="R1map", extension="nii.gz")


def test_sidecar_path_and_bids_uri(tmp_path):
    assert sidecar_path("a/sub-01_R1map.nii.gz").name == "sub-01_R1map.json"
    assert sidecar_path("a/sub-01_R1map.nii").name == "sub-01_R1map.json"
    raw = tmp_path / "raw"
    source = raw / "sub-01" / "anat" / "sub-01_flip-1_VFA.nii.gz"
    assert bids_uri(source, raw) == "bids:raw:sub-01/anat/sub-01_flip-1_VFA.nii.gz"
    with pytest.raises(ValueError, match="not inside"):
        bids_uri(tmp_path / "elsewhere.nii.gz", raw)


# ---------------------------------------------------------------------------------------------- NIfTI
@pytest.mark.parametrize("affine", [_rigid_affine(), OBLIQUE_AFFINE], ids=["rigid", "sheared"])
def test_write_nifti_round_trip_header_hygiene(tmp_path, affine):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(8, 8, 6))
    data[0, 0, 0] = np.nan
    path = write_nifti(tmp_path / "deep" / "map.nii.gz", data, affine)
    image = nib.load(path)
    header = image.header
    assert header.get_data_dtype() == np.float32
    assert header["sform_code"] == 1
    np.testing.assert_array_equal(header.get_sform(), affine.astype(np.float32))
    np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    assert header.get_xyzt_units() == ("mm", "sec")
    loaded = np.asarray(image.dataobj)
    assert loaded.dtype == np.float32
    assert np.isnan(loaded[0, 0, 0])  # NaN kept in float maps
    np.testing.assert_array_equal(loaded[1:], data[1:].astype(np.float32))
    if np.allclose(affine, _rigid_affine()):
        assert header["qform_code"] == 1
        np.testing.assert_allclose(header.get_qform(), affine, atol=1e-5)
    else:
        # a shear cannot be stored in a quaternion: readers must use the sform
        assert header["qform_code"] == 0


@pytest.mark.parametrize(
    "data, expected",
    [
        (np.array([[[True, False]]]), np.uint8),
        (np.array([[[0, 1, 7]]], dtype=np.int64), np.int16),
        (np.array([[[0.5, 1.5]]], dtype=np.float64), np.float32),
    ],
)
def test_write_nifti_dtype_by_kind(tmp_path, data, expected):
    path = write_nifti(tmp_path / "x.nii", data, np.eye(4))
    image = nib.load(path)
    assert image.header.get_data_dtype() == expected
    assert np.asarray(image.dataobj).dtype == expected
    np.testing.assert_array_equal(np.asarray(image.dataobj), data.astype(expected))
    assert image.header.get_slope_inter() in ((None, None), (1.0, 0.0))


def test_write_nifti_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_nifti(tmp_path / "x.nii.gz", np.array([[[np.nan, 1.0]]]), np.eye(4), dtype=np.int16)
    with pytest.raises(ValueError, match="outside the range"):
        write_nifti(tmp_path / "x.nii.gz", np.array([[[0, 40000]]]), np.eye(4))
    with pytest.raises(ValueError, match="non-integer"):
        write_nifti(tmp_path / "x.nii.gz", np.array([[[0.5]]]), np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="complex"):
        write_nifti(tmp_path / "x.nii.gz", np.ones((2, 2, 2), complex), np.eye(4))
    # float64 beyond float32's range would silently become inf; NaN and inf themselves are kept
    with pytest.raises(ValueError, match=r"x\.nii\.gz: cannot cast 1 finite values up to 1e\+39 .* stored as inf"):
        write_nifti(tmp_path / "x.nii.gz", np.array([[[1e39, np.inf, np.nan, -3.0e38]]]), np.eye(4))
    with pytest.raises(ValueError, match="4x4"):
        write_nifti(tmp_path / "x.nii.gz", np.ones((2, 2, 2)), np.eye(3))
    with pytest.raises(ValueError, match="singular"):
        write_nifti(tmp_path / "x.nii.gz", np.ones((2, 2, 2)), np.diag([1, 0, 1, 1]))
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(tmp_path / "x.img", np.ones((2, 2, 2)), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_write_nifti_header_template_keeps_tr_but_resets_scaling(tmp_path):
    template = nib.Nifti1Header()
    template.set_data_dtype(np.int16)
    template.set_data_shape((2, 2, 2, 3))
    template.set_zooms((1, 1, 1, 2.5))
    template.set_slope_inter(2.0, 10.0)
    template["descrip"] = b"source image"
    data = np.arange(2 * 2 * 2 * 3, dtype=np.float64).reshape(2, 2, 2, 3) / 7
    path = write_nifti(tmp_path / "x.nii.gz", data, np.eye(4) * [2, 2, 2, 1], header=template)
    image = nib.load(path)
    assert image.header.get_zooms() == (2.0, 2.0, 2.0, 2.5)
    assert image.header.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(image.dataobj), data.astype(np.float32))


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "sub-01_R1map.nii.gz"
    write_nifti(target, np.ones((4, 4, 4)), np.eye(4))
    before = target.read_bytes()

    def failing_save(image, filename):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(deriv, "save_image", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(target, np.zeros((4, 4, 4)), np.eye(4))
    assert target.read_bytes() == before  # previous version intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary left

    fresh = tmp_path / "new.nii.gz"
    with pytest.raises(OSError):
        write_nifti(fresh, np.zeros((4, 4, 4)), np.eye(4))
    assert not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_written_file_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------- JSON
def test_write_json_converts_numpy_and_sorts(tmp_path):
    obj = {"b": np.float32(0.5), "a": np.arange(3), "c": (np.int64(2), np.bool_(True)), "d": {"z": None, "y": tmp_path}}
    path = write_json(tmp_path / "x.json", obj)
    text = path.read_text()
    assert text.endswith("\n")
    assert text.index('"a"') < text.index('"b"') < text.index('"c"')
    assert json.loads(text) == {"a": [0, 1, 2], "b": 0.5, "c": [2, True], "d": {"y": str(tmp_path), "z": None}}
    assert '  "a"' in text  # indent 2


def test_write_json_refuses_nan_and_names_key(tmp_path):
    with pytest.raises(ValueError, match=r"EchoTime\[1\]"):
        write_json(tmp_path / "x.json", {"EchoTime": [0.01, float("nan")]})
    with pytest.raises(ValueError, match="object"):
        write_json(tmp_path / "x.json", {"a": object()})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- maps
def test_write_map_round_trip_with_pybids(tmp_path):
    from bids import BIDSLayout

    out = tmp_path / "derivatives" / "qmri"
    write_dataset_description(out, name="qmri-workflows", dataset_links={"raw": "/data/raw"})
    affine = _rigid_affine()
    rng = np.random.default_rng(1)
    r1 = rng.uniform(0.5, 2.0, size=(8, 8, 6))
    paths = {
        "R1map": write_map(
            out,
            r1,
            affine,
            subject="sub-01",
            session="1",
            suffix="R1map",
            metadata={"EstimationAlgorithm": "VFA", "Sources": ["bids:raw:x"]},
        ),
        "S0map": write_map(out, r1 * 1000, affine, subject="01", session="1", suffix="S0map", metadata=None, flip=2),
        "TB1map": write_map(out, r1 * 100, affine, subject="01", session="1", suffix="TB1map", metadata={}),
        "mask": write_map(
            out, r1 > 1, affine, subject="01", session="1", suffix="mask", metadata={"Type": "Brain"}, desc="brain"
        ),
        "dseg": write_map(out, (r1 * 2).astype(int), affine, subject="01", session="1", suffix="dseg", metadata={}),
    }
    assert paths["TB1map"].parent.name == "fmap"
    layout = BIDSLayout(out, validate=False)
    found = layout.get(subject="01", session="1", suffix="R1map", extension=".nii.gz")
    assert [f.path for f in found] == [str(paths["R1map"])]
    found = layout.get(subject="01", flip=2, suffix="S0map", extension=".nii.gz", return_type="file")
    assert found == [str(paths["S0map"])]
    metadata = layout.get_metadata(str(paths["R1map"]))
    assert metadata["Units"] == "1/s"
    assert metadata["EstimationAlgorithm"] == "VFA"
    assert layout.get_metadata(str(paths["TB1map"]))["Units"] == "percent"
    assert layout.get_metadata(str(paths["S0map"]))["Units"] == DEFAULT_UNITS["S0map"]
    assert "Units" not in layout.get_metadata(str(paths["mask"]))

    expected_dtypes = {
        "R1map": np.float32,
        "S0map": np.float32,
        "TB1map": np.float32,
        "mask": np.uint8,
        "dseg": np.int16,
    }
    for suffix, path in paths.items():
        image = nib.load(path)
        assert image.header.get_data_dtype() == expected_dtypes[suffix], suffix
        np.testing.assert_allclose(image.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(nib.load(paths["R1map"]).get_fdata(), r1.astype(np.float32))


def test_write_map_keeps_explicit_units(tmp_path):
    path = write_map(
        tmp_path, np.ones((2, 2, 2)), np.eye(4), subject="01", suffix="R2starmap", metadata={"Units": "Hz"}
    )
    assert json.loads(sidecar_path(path).read_text())["Units"] == "Hz"


def test_write_map_rejects_bad_mask_and_b1_in_anat(tmp_path):
    with pytest.raises(ValueError, match="0 and 1"):
        write_map(tmp_path, np.array([[[0, 2]]]), np.eye(4), subject="01", suffix="mask", metadata={}, desc="brain")
    with pytest.raises(ValueError, match="fmap"):
        write_map(tmp_path, np.ones((2, 2, 2)), np.eye(4), subject="01", suffix="TB1map", metadata={}, datatype="anat")


def test_write_map_refuses_raw_dataset(tmp_path):
    raw = _raw_dataset(tmp_path / "raw")
    for bad in (raw, raw / "sub-01", raw / "derivatives", raw / "code" / "out"):
        with pytest.raises(ValueError, match="raw BIDS dataset"):
            write_map(bad, np.ones((2, 2, 2)), np.eye(4), subject="01", suffix="R1map", metadata={})
    assert sorted(p.name for p in raw.iterdir()) == ["dataset_description.json"]
    with pytest.raises(ValueError, match="raw BIDS dataset"):
        write_dataset_description(raw, name="oops")
    # under derivatives/<pipeline> is allowed, as is a sibling folder
    for good in (raw / "derivatives" / "qmri", tmp_path / "out"):
        path = write_map(good, np.ones((2, 2, 2)), np.eye(4), subject="01", suffix="R1map", metadata={})
        assert path.is_file()


def test_check_output_root_description_without_dataset_type(tmp_path):
    legacy_raw = tmp_path / "legacy"
    legacy_raw.mkdir()
    (legacy_raw / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.4.0"}')
    with pytest.raises(ValueError, match="legacy"):
        check_output_root(legacy_raw / "out")
    old_derivative = tmp_path / "olderiv"
    old_derivative.mkdir()
    (old_derivative / "dataset_description.json").write_text(
        '{"Name": "x", "BIDSVersion": "1.4.0", "PipelineDescription": {"Name": "p"}}'
    )
    assert check_output_root(old_derivative) == old_derivative


def test_check_output_root_follows_symlinks(tmp_path):
    raw = _raw_dataset(tmp_path / "raw")
    link = tmp_path / "link"
    link.symlink_to(raw)
    with pytest.raises(ValueError, match="raw BIDS dataset"):
        check_output_root(link / "out")


def test_check_output_root_with_the_input_dataset(tmp_path):
    """The App's rule: the input is checked whatever its description says, and an output may not hold it."""
    bids = tmp_path / "study" / "input"
    bids.mkdir(parents=True)
    (bids / "dataset_description.json").write_text('{"Name": "x", "DatasetType": "derivative", "GeneratedBy": []}')
    assert check_output_root(bids / "derivatives" / "qmri", bids_dir=bids) == bids / "derivatives" / "qmri"
    assert check_output_root(tmp_path / "out", bids_dir=bids) == tmp_path / "out"
    for bad in (bids, bids / "derivatives", bids / "anat"):
        with pytest.raises(
            ValueError, match=f"the output directory {bad} is .* BIDS dataset {bids}, whose raw data are never"
        ):
            check_output_root(bad, bids_dir=bids)
    with pytest.raises(ValueError, match="holds the input dataset"):
        check_output_root(tmp_path / "study", bids_dir=bids)
    # a work directory may hold the input (nothing there is read as BIDS), not lie in its raw part
    assert check_output_root(tmp_path / "study", bids_dir=bids, work=True) == tmp_path / "study"
    assert check_output_root(bids / "derivatives" / "work", bids_dir=bids, work=True)
    with pytest.raises(ValueError, match="the work directory .* is inside"):
        check_output_root(bids / "work", bids_dir=bids, work=True)


# ---------------------------------------------------------------------------------------------- dataset
def test_write_dataset_description(tmp_path):
    path = write_dataset_description(
        tmp_path / "out",
        name="qMRI maps",
        source_datasets=["file:///data/raw"],
        dataset_links={"raw": "/data/raw"},
        extra={"License": "CC0"},
    )
    description = json.loads(path.read_text())
    assert description["DatasetType"] == "derivative"
    assert description["BIDSVersion"] == deriv.BIDS_VERSION
    assert description["GeneratedBy"][0]["Name"] == "qmri-workflows"
    assert "Version" in description["GeneratedBy"][0]
    assert description["SourceDatasets"] == [{"URL": "file:///data/raw"}]
    assert description["DatasetLinks"] == {"raw": "/data/raw"}
    assert description["License"] == "CC0"
    custom = write_dataset_description(
        tmp_path / "other", name="x", generated_by={"Name": "tool", "Version": "1", "CodeURL": "u"}
    )
    assert json.loads(custom.read_text())["GeneratedBy"] == [{"CodeURL": "u", "Name": "tool", "Version": "1"}]
    with pytest.raises(ValueError, match="Name"):
        write_dataset_description(tmp_path / "bad", name="x", generated_by=[{"Version": "1"}])


def test_write_dseg_tsv(tmp_path):
    path = write_dseg_tsv(
        tmp_path / "sub-01_dseg.tsv", [(1, "white matter", "WM"), {"index": 2, "name": "lesion", "abbreviation": "L"}]
    )
    assert path.read_text() == "index\tname\tabbreviation\n1\twhite matter\tWM\n2\tlesion\tL\n"
    with pytest.raises(ValueError, match="duplicate"):
        write_dseg_tsv(tmp_path / "b.tsv", [(1, "a", "A"), (1, "b", "B")])
    with pytest.raises(ValueError, match="tabs"):
        write_dseg_tsv(tmp_path / "b.tsv", [(1, "a\tb", "A")])
    assert not (tmp_path / "b.tsv").exists()


def test_derivatives_pass_bids_validator(tmp_path):
    """The written dataset is valid BIDS according to the official (offline) validator."""
    import shutil
    import subprocess

    validator = shutil.which("bids-validator-deno") or os.path.join(
        os.path.dirname(sys.executable), "bids-validator-deno"
    )
    if not os.path.exists(validator):
        pytest.skip("bids-validator-deno not installed")
    out = tmp_path / "qmri"
    write_dataset_description(out, name="qmri-workflows test", dataset_links={"raw": "../raw"})
    affine = _rigid_affine()
    data = np.random.default_rng(2).uniform(0.5, 2.0, size=(8, 8, 6))
    for suffix in ("R1map", "R2starmap", "PDmap", "Chimap"):
        write_map(
            out,
            data,
            affine,
            subject="01",
            suffix=suffix,
            metadata={"Sources": ["bids:raw:sub-01/anat/sub-01_flip-1_VFA.nii.gz"]},
        )
    # BIDS allows no `flip` entity on derivative maps: one S0 map per flip angle uses desc.
    write_map(out, data, affine, subject="01", suffix="S0map", metadata={}, desc="flip1")
    write_map(out, data, affine, subject="01", suffix="TB1map", metadata={})
    write_map(out, data > 1, affine, subject="01", suffix="mask", metadata={}, desc="brain")
    write_map(out, (data > 1).astype(int) + 1, affine, subject="01", suffix="dseg", metadata={})
    write_dseg_tsv(out / "sub-01" / "anat" / "sub-01_dseg.tsv", [(1, "a", "A"), (2, "b", "B")])
    result = subprocess.run([validator, "--json", str(out)], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    errors = [issue for issue in report["issues"]["issues"] if issue.get("severity") == "error"]
    assert errors == [], errors


# --------------------------------------------------------------------------------------------------
# publishing a file an interface wrote
# --------------------------------------------------------------------------------------------------
def test_publish_map_copies_a_clean_file_without_reencoding(tmp_path):
    import gzip

    from qmri_workflows.io.derivatives import publish_map

    data = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    written = write_nifti(tmp_path / "work" / "R2starmap.nii", data, affine)
    target = publish_map(
        tmp_path / "out", written, subject="01", suffix="R2starmap", metadata={"EstimationAlgorithm": "x"}
    )
    assert target.name == "sub-01_R2starmap.nii.gz"
    with gzip.open(target, "rb") as published:
        assert published.read() == written.read_bytes(), "the voxels were re-encoded"
    assert json.loads(sidecar_path(target).read_text())["Units"] == "1/s"


def test_publish_map_rewrites_a_file_with_a_foreign_header(tmp_path):
    from qmri_workflows.io.derivatives import has_clean_header, publish_map

    data = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    image = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_slope_inter(0.5, 1.0)
    path = tmp_path / "scaled.nii.gz"
    nib.save(image, path)
    assert not has_clean_header(nib.load(path), np.float32)
    target = publish_map(tmp_path / "out", path, subject="01", session="a", suffix="R1map", metadata={})
    published = nib.load(target)
    assert has_clean_header(published, np.float32)
    assert np.allclose(published.get_fdata(), 0.5 * data + 1.0)


def test_publish_map_refuses_a_mask_with_other_values(tmp_path):
    from qmri_workflows.io.derivatives import publish_map

    path = write_nifti(tmp_path / "mask.nii", np.full((3, 3, 3), 2, np.uint8), np.eye(4), dtype=np.uint8)
    with pytest.raises(ValueError, match="only 0 and 1"):
        publish_map(tmp_path / "out", path, subject="01", suffix="mask", desc="brain", metadata={})
