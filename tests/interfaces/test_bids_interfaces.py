"""DerivativesDataSink run as real Nipype nodes."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.interfaces.bids import DerivativesDataSink, find_dataset_root
from tests.bids_factory import make_dataset

os.environ.setdefault("NIPYPE_NO_ET", "1")

OBLIQUE = np.array(
    [
        [0.98, -0.17, 0.02, -40.5],
        [0.17, 0.97, -0.12, 12.25],
        [0.0, 0.12, 1.49, -7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


def _image(path, data, affine=OBLIQUE, dtype=np.float64):
    image = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    image.set_data_dtype(dtype)
    nib.save(image, path)
    return str(path)


def _run(tmp_path, name, **inputs):
    from nipype.pipeline import engine as pe

    node = pe.Node(DerivativesDataSink(**inputs), name=name, base_dir=str(tmp_path / "work"))
    return node.run().outputs


@pytest.fixture
def raw(tmp_path):
    return make_dataset(tmp_path / "raw", flip_angles=(4.0, 20.0), n_echoes=2)


def test_sink_writes_map_with_sidecar(tmp_path, raw):
    rng = np.random.default_rng(0)
    r1 = rng.uniform(0.3, 2.0, size=(8, 8, 6))
    in_file = _image(tmp_path / "r1.nii.gz", r1)
    sources = [str(p) for p in raw.files["gre"]]
    out = _run(
        tmp_path,
        "ds_r1",
        in_file=in_file,
        base_directory=str(tmp_path / "out"),
        subject="sub-01",
        suffix="R1map",
        desc="fit",
        raw_root=str(raw.root),
        source_files=sources,
        metadata={
            "EstimationAlgorithm": "DESPOT1",
            "MagneticFieldStrength": 3.0,
            "Sources": [f"bids:raw:{os.path.relpath(sources[0], raw.root)}"],
        },
    )
    assert out.out_file == str(tmp_path / "out" / "sub-01" / "anat" / "sub-01_desc-fit_R1map.nii.gz")
    written = nib.load(out.out_file)
    assert written.header.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.header.get_sform(), nib.load(in_file).header.get_sform())
    np.testing.assert_array_equal(written.affine, nib.load(in_file).affine)
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), r1.astype(np.float32))
    sidecar = json.loads(open(out.out_meta).read())
    assert sidecar["Units"] == "1/s"
    assert sidecar["EstimationAlgorithm"] == "DESPOT1"
    assert sidecar["MagneticFieldStrength"] == 3.0
    expected = [f"bids:raw:{os.path.relpath(s, raw.root)}" for s in sources]
    assert sidecar["Sources"] == expected  # merged without duplicates
    assert all(uri.startswith("bids:raw:sub-01/anat/sub-01_echo-") for uri in sidecar["Sources"])


@pytest.mark.parametrize(
    "suffix, extra, values, dtype, folder",
    [
        ("mask", {"desc": "brain"}, np.array([0.0, 1.0]), np.uint8, "anat"),
        ("dseg", {}, np.array([0.0, 1.0, 2.0, 7.0]), np.int16, "anat"),
        ("TB1map", {}, np.array([80.5, 101.25]), np.float32, "fmap"),
        ("S0map", {"flip": 2}, np.array([1000.5, 2e4]), np.float32, "anat"),
    ],
)
def test_sink_dtype_and_folder_per_kind(tmp_path, suffix, extra, values, dtype, folder):
    data = np.resize(values, (4, 4, 3))
    in_file = _image(tmp_path / "in.nii.gz", data)
    out = _run(
        tmp_path,
        f"ds_{suffix}",
        in_file=in_file,
        base_directory=str(tmp_path / "out"),
        subject="01",
        session="ses-1",
        suffix=suffix,
        **extra,
    )
    assert os.path.basename(os.path.dirname(out.out_file)) == folder
    assert "ses-1" in out.out_file
    written = nib.load(out.out_file)
    assert written.header.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(written.dataobj), data.astype(dtype))
    if "flip" in extra:
        assert "_flip-2_" in out.out_file


def test_sources_of_a_dataset_whose_files_link_into_an_object_store(tmp_path, raw):
    """Files that are symbolic links to a store outside the dataset (a shared archive, an ephemeral
    DataLad clone whose .git/annex/objects links to the origin's): the Sources are the files' paths
    in the dataset. The sink used to follow the link, found no dataset_description.json above the
    object and failed, so nothing was published."""
    objects = tmp_path / "store" / ".git" / "annex" / "objects"
    objects.mkdir(parents=True)
    source = raw.files["gre"][0]
    stored = objects / "MD5E-s1--0123.nii.gz"
    os.replace(source, stored)
    os.symlink(os.path.relpath(stored, source.parent), source)
    assert _published_sidecar(tmp_path, source)["Sources"] == [f"bids:raw:sub-01/anat/{source.name}"]


def _published_sidecar(tmp_path, source):
    """The sidecar of an R2* map the sink publishes for sub-01 from the raw file ``source``."""
    in_file = _image(tmp_path / "in.nii.gz", np.ones((4, 4, 3)))
    out = _run(
        tmp_path,
        "ds_auto",
        in_file=in_file,
        base_directory=str(tmp_path / "out"),
        subject="01",
        suffix="R2starmap",
        source_files=[str(source)],
    )
    return json.loads(open(out.out_meta).read())


def test_sink_finds_raw_root_from_sources(tmp_path, raw):
    source = raw.files["gre"][0]
    assert find_dataset_root(source) == Path(os.path.abspath(raw.root))
    sidecar = _published_sidecar(tmp_path, source)
    assert sidecar["Sources"] == [f"bids:raw:sub-01/anat/{source.name}"]
    assert sidecar["Units"] == "1/s"


def test_sink_refuses_raw_dataset(tmp_path, raw):
    in_file = _image(tmp_path / "in.nii.gz", np.ones((4, 4, 3)))
    before = sorted(p for p in raw.root.rglob("*"))
    with pytest.raises(Exception, match="raw BIDS dataset"):
        _run(tmp_path, "ds_bad", in_file=in_file, base_directory=str(raw.root), subject="01", suffix="R1map")
    assert sorted(p for p in raw.root.rglob("*")) == before


def test_sink_rejects_bad_entity_label(tmp_path):
    in_file = _image(tmp_path / "in.nii.gz", np.ones((4, 4, 3)))
    with pytest.raises(Exception, match="alphanumeric"):
        _run(
            tmp_path,
            "ds_label",
            in_file=in_file,
            base_directory=str(tmp_path / "out"),
            subject="01",
            suffix="R1map",
            desc="my_fit",
        )


def test_sink_as_mapnode_over_flip_labels(tmp_path):
    """One S0 map per flip angle, as the output workflows use it (iterating over in_file and flip)."""
    from nipype.pipeline import engine as pe

    in_files = [_image(tmp_path / f"s0_{i}.nii.gz", np.full((4, 4, 3), 100.0 * i)) for i in (1, 2)]
    sink = pe.MapNode(
        DerivativesDataSink(
            base_directory=str(tmp_path / "out"),
            subject="01",
            suffix="S0map",
            metadata={"EstimationAlgorithm": "ESTATICS"},
        ),
        name="ds_s0",
        iterfield=["in_file", "flip"],
        base_dir=str(tmp_path / "work"),
    )
    sink.inputs.in_file = in_files
    sink.inputs.flip = ["1", "2"]
    outputs = sink.run().outputs
    assert [os.path.basename(f) for f in outputs.out_file] == [
        "sub-01_flip-1_S0map.nii.gz",
        "sub-01_flip-2_S0map.nii.gz",
    ]
    assert [float(nib.load(f).dataobj[0, 0, 0]) for f in outputs.out_file] == [100.0, 200.0]
    assert all(json.loads(open(m).read())["Units"] == "arbitrary" for m in outputs.out_meta)


def test_subject_and_session_come_from_the_file_name_only():
    from qmri_workflows.interfaces.bids import subject_session_of

    assert subject_session_of("/data/sub-x/ses-y/raw/sub-01/ses-a/anat/sub-01_ses-a_echo-1_MEGRE.nii.gz") == ("01", "a")
    assert subject_session_of("/studies/ses-old/sub-02_flip-1_VFA.nii") == ("02", None)
    with pytest.raises(ValueError, match="no sub-"):
        subject_session_of("/data/sub-01/anat/echo1.nii.gz")
