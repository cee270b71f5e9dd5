"""The phantom writes a valid raw BIDS dataset whose images reproduce the ground truth."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.core.signal import spgr_signal
from qmri_workflows.phantom import dataset as dataset_module
from qmri_workflows.phantom.cli import main
from qmri_workflows.phantom.dataset import ICBM_NOTICE, write_phantom_dataset

VALIDATOR = shutil.which("bids-validator-deno") or (
    "/work/venv/bin/bids-validator-deno" if Path("/work/venv/bin/bids-validator-deno").exists() else None
)
RESOLUTION = 8.0  # mm: small grid, full protocol, a few seconds per subject


def _load(path):
    return np.asanyarray(nib.load(path).dataobj, dtype=float)


@pytest.fixture(scope="module")
def noisy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "noisy"
    write_phantom_dataset(root, resolution=RESOLUTION, snr=40.0, subjects=2, seed=3, oversample=1)
    return root


@pytest.fixture(scope="module")
def noiseless_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "noiseless"
    status = main(
        [
            str(root),
            "--resolution",
            str(RESOLUTION),
            "--snr",
            "inf",
            "--n-coils",
            "4",
            "--seed",
            "5",
            "--oversample",
            "1",
        ]
    )
    assert status == 0
    return root


def test_bids_validator_reports_no_errors(noisy_dataset):
    if VALIDATOR is None:
        pytest.skip("bids-validator-deno executable not found (pip install bids-validator-deno)")
    result = subprocess.run([VALIDATOR, str(noisy_dataset), "--json"], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    errors = [issue for issue in report["issues"]["issues"] if issue["severity"] == "error"]
    assert errors == [], json.dumps(errors[:5], indent=1)
    assert not (noisy_dataset / ".bidsignore").exists()


def test_layout_files_and_metadata(noisy_dataset):
    bids = pytest.importorskip("bids")
    layout = bids.BIDSLayout(noisy_dataset, validate=True)
    assert sorted(layout.get_subjects()) == ["01", "02"]
    spgr = layout.get(subject="01", suffix="VFA", part="mag", echo=1, flip=1, extension=".nii.gz")
    assert len(spgr) == 1
    metadata = spgr[0].get_metadata()
    assert metadata["FlipAngle"] == 6.0 and metadata["EchoTime"] == pytest.approx(0.0023)
    assert metadata["RepetitionTimeExcitation"] == 0.025 and metadata["PulseSequenceType"] == "SPGR"
    assert metadata["SpoilingRFPhaseIncrement"] == 50.0 and metadata["SpoilingState"] is True
    assert metadata["SpoilingType"] == "COMBINED" and metadata["SpoilingGradientMoment"] == 0.09
    assert metadata["SpoilingGradientDuration"] == 0.003 and "extended phase graphs" in metadata["PulseSequenceDetails"]
    assert metadata["MagneticFieldStrength"] == 3.0 and metadata["Manufacturer"] == "qmri-workflows phantom"
    phase = layout.get(subject="01", suffix="VFA", part="phase", echo=3, flip=2, extension=".nii.gz")[0]
    assert phase.get_metadata()["Units"] == "rad"
    assert len(layout.get(subject="02", suffix="VFA", part="mag", extension=".nii.gz")) == 16 + 8
    bssfp = layout.get(subject="01", suffix="VFA", acquisition="bssfp090", flip=2, part="mag", extension=".nii.gz")[
        0
    ].get_metadata()
    assert bssfp["PulseSequenceType"] == "bSSFP" and bssfp["PhaseCyclingIncrement"] == 90.0
    assert bssfp["EchoTime"] == pytest.approx(bssfp["RepetitionTimeExcitation"] / 2)
    afi = layout.get(subject="01", suffix="TB1AFI", acquisition="tr2", extension=".nii.gz")[0].get_metadata()
    assert afi["RepetitionTimeExcitation"] == 0.1 and afi["FlipAngle"] == 60.0
    assert afi["SpoilingRFPhaseIncrement"] == 39.0 and afi["SpoilingGradientMoment"] == 0.45
    assert len(layout.get(subject="01", suffix="RB1COR", extension=".nii.gz")) == 2
    with_truth = bids.BIDSLayout(noisy_dataset, derivatives=True)
    assert len(with_truth.get(scope="derivatives", suffix="R2starmap", extension=".nii.gz")) == 2
    assert (
        len(with_truth.get(scope="derivatives", subject="01", suffix="S0map", desc="flip2", extension=".nii.gz")) == 1
    )

    participants = (noisy_dataset / "participants.tsv").read_text().splitlines()
    assert participants[0].split("\t") == ["participant_id", "group", "age", "sex"]
    assert [row.split("\t")[1] for row in participants[1:]] == ["patient", "control"]
    description = json.loads((noisy_dataset / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.10.0" and description["DatasetType"] == "raw"
    assert "Copyright (C) 1993-2009 Louis Collins" in (noisy_dataset / "README").read_text()
    assert " ".join(ICBM_NOTICE.split()) in " ".join((noisy_dataset / "README").read_text().split())


def test_truth_derivatives(noisy_dataset):
    truth_root = noisy_dataset / "derivatives" / "phantom"
    description = json.loads((truth_root / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "qmri-phantom"
    anat, fmap = truth_root / "sub-01" / "anat", truth_root / "sub-01" / "fmap"
    for name in (
        "R1map",
        "T1map",
        "R2map",
        "T2map",
        "R2starmap",
        "T2starmap",
        "PDmap",
        "Chimap",
        "M0map",
        "desc-flip1_S0map",
        "desc-flip2_S0map",
        "dseg",
        "desc-brain_mask",
        "desc-head_mask",
    ):
        assert (anat / f"sub-01_{name}.nii.gz").is_file(), name
        assert "Units" in json.loads((anat / f"sub-01_{name}.json").read_text()) or name.endswith(("mask", "dseg")), (
            name
        )
    assert (anat / "sub-01_dseg.tsv").read_text().startswith("index\tname\tabbreviation\n")
    r1, t1 = _load(anat / "sub-01_R1map.nii.gz"), _load(anat / "sub-01_T1map.nii.gz")
    brain = _load(anat / "sub-01_desc-brain_mask.nii.gz") > 0
    np.testing.assert_allclose(t1[brain], 1 / r1[brain], rtol=1e-6)
    tb1 = _load(fmap / "sub-01_TB1map.nii.gz")
    assert 80 < np.median(tb1[brain]) < 120  # percent of nominal
    assert json.loads((fmap / "sub-01_desc-total_fieldmap.json").read_text())["Units"] == "ppm"
    # lesion truth: numbered lesions with their stage, and the lesion mask the analysis reads
    lesions = _load(anat / "sub-01_label-lesion_dseg.nii.gz")
    mask = _load(anat / "sub-01_label-lesion_mask.nii.gz")
    assert np.array_equal(lesions > 0, mask > 0) and mask.any()
    rows = [line.split("\t") for line in (anat / "sub-01_label-lesion_dseg.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[:3] == ["index", "name", "stage"]
    stages = {int(row[0]): row[2] for row in rows}
    assert set(stages.values()) == {"early active", "late active", "chronic active", "chronic inactive", "cortical"}
    voxels = {int(row[0]): int(row[header.index("voxels")]) for row in rows}
    for number, count in voxels.items():
        assert count == np.count_nonzero(lesions == number)
    sidecar = json.loads((anat / "sub-01_label-lesion_dseg.json").read_text())
    assert set(sidecar["LesionColumns"]) == set(header) and "chronic active" in sidecar["StageLevels"]
    assert not (truth_root / "sub-02" / "anat" / "sub-02_label-lesion_mask.nii.gz").exists()  # control
    record = json.loads((truth_root / "sub-02" / "sub-02_desc-simulation.json").read_text())
    assert record["Group"] == "control" and record["PhantomSeed"] == 4 and record["SNR"] == 40.0
    assert record["NumberOfReceiveChannels"] == 1 and record["Protocol"]["vfa"]["flip_angles"] == [6.0, 21.0]


def test_noise_sigma_in_air_and_snr(noisy_dataset):
    record = json.loads((noisy_dataset / "derivatives/phantom/sub-01/sub-01_desc-simulation.json").read_text())
    sigma = record["NoiseSigma"]
    truth = noisy_dataset / "derivatives" / "phantom" / "sub-02" / "anat"
    head = _load(truth / "sub-02_desc-head_mask.nii.gz") > 0
    magnitude = _load(noisy_dataset / "sub-02/anat/sub-02_echo-5_flip-2_part-mag_VFA.nii.gz")
    # air far from the head: Rayleigh noise, E[M^2] = 2 sigma^2 (same receiver for both subjects)
    from scipy import ndimage

    air = ~ndimage.binary_dilation(head, iterations=2)
    estimate = math.sqrt(np.mean(magnitude[air] ** 2) / 2)
    assert estimate == pytest.approx(sigma, rel=5 / math.sqrt(air.sum()))
    # SNR definition: median white-matter magnitude of echo 1, flip 1 (sub-01) over sigma
    dseg = _load(noisy_dataset / "derivatives/phantom/sub-01/anat/sub-01_dseg.nii.gz")
    s0 = _load(noisy_dataset / "derivatives/phantom/sub-01/anat/sub-01_desc-flip1_S0map.nii.gz")
    r2star = _load(noisy_dataset / "derivatives/phantom/sub-01/anat/sub-01_R2starmap.nii.gz")
    wm = dseg == 3
    assert np.median(s0[wm] * np.exp(-0.0023 * r2star[wm])) / sigma == pytest.approx(40.0, rel=1e-4)


def test_seed_determinism_and_int16_storage(noisy_dataset, tmp_path):
    # same seed, one subject, int16: sub-01 is the same simulation (noise streams are per subject and volume)
    root = write_phantom_dataset(
        tmp_path / "again", resolution=RESOLUTION, snr=40.0, subjects=1, seed=3, dtype="int16", oversample=1
    )
    record = json.loads((root / "derivatives/phantom/sub-01/sub-01_desc-simulation.json").read_text())
    sigma = record["NoiseSigma"]
    for name, step in (
        ("echo-2_flip-1_part-mag", sigma / 4),
        ("echo-2_flip-1_part-phase", math.pi / 1024),
        ("acq-bssfp180_flip-2_part-mag", sigma / 4),
    ):
        stored = nib.load(root / f"sub-01/anat/sub-01_{name}_VFA.nii.gz")
        assert stored.get_data_dtype() == np.int16
        reference = _load(noisy_dataset / f"sub-01/anat/sub-01_{name}_VFA.nii.gz")
        np.testing.assert_allclose(stored.get_fdata(), reference, atol=step / 2 * 1.001 + 1e-5)
    np.testing.assert_array_equal(
        _load(root / "derivatives/phantom/sub-01/anat/sub-01_R2starmap.nii.gz"),
        _load(noisy_dataset / "derivatives/phantom/sub-01/anat/sub-01_R2starmap.nii.gz"),
    )
    assert not list(tmp_path.glob(".again.partial-*"))


def test_noiseless_images_give_truth_exactly(noiseless_dataset):
    anat = noiseless_dataset / "sub-01" / "anat"
    truth = noiseless_dataset / "derivatives" / "phantom" / "sub-01"
    brain = _load(truth / "anat/sub-01_desc-brain_mask.nii.gz") > 0
    echo1 = _load(anat / "sub-01_echo-1_flip-2_part-mag_VFA.nii.gz")
    echo6 = _load(anat / "sub-01_echo-6_flip-2_part-mag_VFA.nii.gz")
    r2star = np.log(echo1[brain] / echo6[brain]) / (6 * 0.0023 - 0.0023)
    # float32 storage: relative error ~1e-7 per image -> ~1e-5 1/s on the log ratio over 11.5 ms
    np.testing.assert_allclose(r2star, _load(truth / "anat/sub-01_R2starmap.nii.gz")[brain], atol=1e-3)
    s0 = _load(truth / "anat/sub-01_desc-flip2_S0map.nii.gz")[brain]
    np.testing.assert_allclose(echo1[brain], s0 * np.exp(-0.0023 * r2star), rtol=1e-5)
    # AFI ratio gives the transmit field (first-order formula: < 1 % bias in brain tissue)
    s1 = _load(noiseless_dataset / "sub-01/fmap/sub-01_acq-tr1_TB1AFI.nii.gz")[brain]
    s2 = _load(noiseless_dataset / "sub-01/fmap/sub-01_acq-tr2_TB1AFI.nii.gz")[brain]
    ratio = s2 / s1
    b1 = np.degrees(np.arccos((ratio * 5 - 1) / (5 - ratio))) / 60.0
    np.testing.assert_allclose(100 * b1, _load(truth / "fmap/sub-01_TB1map.nii.gz")[brain], rtol=0.01)
    # field from the phase difference of echoes 1 and 2, up to whole cycles (next to the air
    # cavities |field| * 2.3 ms exceeds half a cycle)
    phase1 = _load(anat / "sub-01_echo-1_flip-1_part-phase_VFA.nii.gz")[brain]
    phase2 = _load(anat / "sub-01_echo-2_flip-1_part-phase_VFA.nii.gz")[brain]
    field_ppm = _load(truth / "fmap/sub-01_desc-total_fieldmap.nii.gz")[brain]
    expected = 2 * np.pi * 0.0023 * field_ppm * 42.577478 * 3.0
    mismatch_hz = np.angle(np.exp(1j * (phase2 - phase1 - expected))) / (2 * np.pi * 0.0023)
    np.testing.assert_allclose(mismatch_hz, 0.0, atol=1e-3)
    record = json.loads((truth / "sub-01_desc-simulation.json").read_text())
    assert record["NoiseSigma"] == 0.0 and record["SNR"] is None and record["NumberOfReceiveChannels"] == 4
    assert "qmri-phantom" in (noiseless_dataset / "README").read_text()


def test_cli_ideal_spoiling_gives_the_ernst_equation(tmp_path):
    root = tmp_path / "ideal"
    arguments = ["--resolution", str(RESOLUTION), "--snr", "inf", "--oversample", "1", "--spoiling", "ideal"]
    assert main([str(root), *arguments]) == 0
    assert "--spoiling ideal" in (root / "README").read_text()
    truth = root / "derivatives/phantom/sub-01"
    record = json.loads((truth / "sub-01_desc-simulation.json").read_text())
    assert record["Protocol"]["spoiling"] == "ideal" and record["SpoilingSimulation"].startswith("ideal")
    for sidecar in [*root.glob("sub-01/anat/*echo-1_flip-*_part-mag_VFA.json"), *root.glob("sub-01/fmap/*.json")]:
        metadata = json.loads(sidecar.read_text())
        assert metadata["SpoilingState"] is True, sidecar.name
        assert "SpoilingRFPhaseIncrement" not in metadata and "SpoilingGradientMoment" not in metadata
        assert metadata["PulseSequenceDetails"].endswith("ideal RF and gradient spoiling")
    head = _load(truth / "anat/sub-01_desc-head_mask.nii.gz") > 0
    tissue = head & (_load(truth / "anat/sub-01_PDmap.nii.gz") > 0)
    image = _load(root / "sub-01/anat/sub-01_echo-2_flip-2_part-mag_VFA.nii.gz")[tissue]
    m0 = _load(truth / "anat/sub-01_M0map.nii.gz")[tissue]
    r1 = _load(truth / "anat/sub-01_R1map.nii.gz")[tissue]
    r2star = _load(truth / "anat/sub-01_R2starmap.nii.gz")[tissue]
    b1 = _load(truth / "fmap/sub-01_TB1map.nii.gz")[tissue] / 100
    ernst = spgr_signal(m0, r1, r2star, np.deg2rad(21.0), 0.025, 2 * 0.0023, b1=b1)
    np.testing.assert_allclose(image, ernst, rtol=1e-5)


def test_existing_output_and_failures_leave_nothing(tmp_path, monkeypatch):
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_phantom_dataset(target, resolution=RESOLUTION)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dataset_module, "_write_truth", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_phantom_dataset(tmp_path / "new", resolution=RESOLUTION, oversample=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
    with pytest.raises(ValueError, match="dtype"):
        write_phantom_dataset(tmp_path / "x", dtype="float64")


def test_cli_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "qmri-phantom" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--oversample" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["out", "--snr", "-3"])
    assert exit_info.value.code == 2


def test_cli_refuses_a_non_empty_folder_naming_its_flag(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    assert main([str(tmp_path / "taken"), "--resolution", "8"]) == 1
    error = capsys.readouterr().err
    assert "pass --overwrite" in error and "overwrite=True" not in error
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_oversampled_dataset_is_close_to_truth(tmp_path):
    root = write_phantom_dataset(
        tmp_path / "over", resolution=RESOLUTION, snr=math.inf, subjects=1, seed=1, oversample=2, n_coils=2
    )
    truth = root / "derivatives/phantom/sub-01/anat"
    dseg = _load(truth / "sub-01_dseg.nii.gz")
    echo = _load(root / "sub-01/anat/sub-01_echo-1_flip-1_part-mag_VFA.nii.gz")
    assert echo.shape == dseg.shape
    # deep white matter (not at a tissue edge): the k-space-reduced image is close to the block truth
    from scipy import ndimage

    deep_wm = ndimage.binary_erosion(dseg == 3)
    s0 = _load(truth / "sub-01_desc-flip1_S0map.nii.gz")
    r2star = _load(truth / "sub-01_R2starmap.nii.gz")
    expected = s0 * np.exp(-0.0023 * r2star)
    assert np.median(np.abs(echo[deep_wm] / expected[deep_wm] - 1)) < 0.03


def test_default_is_oversampled_with_interior_masks(tmp_path):
    """Default oversample 2: recorded in the command; interior masks and the body-coil field written."""
    root = tmp_path / "default"
    assert main([str(root), "--resolution", str(RESOLUTION), "--snr", "inf", "--seed", "2"]) == 0
    assert "--oversample 2" in (root / "README").read_text()
    truth = root / "derivatives/phantom/sub-01"
    assert json.loads((truth / "sub-01_desc-simulation.json").read_text())["Oversample"] == 2
    dseg = _load(truth / "anat/sub-01_dseg.nii.gz").astype(int)
    rows = [line.split("\t") for line in (truth / "anat/sub-01_dseg.tsv").read_text().splitlines()[1:]]
    written = sorted(path.name for path in (truth / "anat").glob("*_desc-interior_mask.nii.gz"))
    assert "sub-01_label-WM_desc-interior_mask.nii.gz" in written
    assert "sub-01_label-SKL_desc-interior_mask.nii.gz" not in written
    for index, name, abbreviation in rows:
        path = truth / f"anat/sub-01_label-{abbreviation}_desc-interior_mask.nii.gz"
        if not path.is_file():
            continue
        mask = _load(path) > 0
        sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
        assert sidecar["LabelName"] == name and sidecar["LabelIndex"] == int(index)
        assert sidecar["VoxelCount"] == int(mask.sum()) and "footprint" in sidecar["InteriorRule"]
        assert np.all(dseg[mask] == int(index)), name  # interior voxels lie inside their region
    white_matter = _load(truth / "anat/sub-01_label-WM_desc-interior_mask.nii.gz") > 0
    assert 0 < white_matter.sum() < (dseg == 3).sum()
    body = _load(truth / "fmap/sub-01_desc-bodycoil_RB1map.nii.gz")
    brain = _load(truth / "anat/sub-01_desc-brain_mask.nii.gz") > 0
    assert 0.005 < np.abs(body[brain] - 1).max() < 0.035


def test_make_truth_builds_each_subject_on_the_simulation_grid(tmp_path):
    """``make_truth`` (e.g. a cache shared by several datasets) gets make_phantom's keywords."""
    from qmri_workflows.phantom.protocol import Protocol
    from qmri_workflows.phantom.truth import make_phantom

    calls = []

    def make_truth(**arguments):
        calls.append(arguments)
        return make_phantom(**arguments)

    raw = write_phantom_dataset(
        tmp_path / "raw",
        resolution=RESOLUTION,
        subjects=2,
        seed=3,
        oversample=2,
        protocol=Protocol(bssfp=None, afi=None, rb1cor=None, spoiling="ideal"),
        make_truth=make_truth,
    )
    assert calls == [
        {"resolution": RESOLUTION / 2, "field_strength": 3.0, "subject": "patient", "seed": 3},
        {"resolution": RESOLUTION / 2, "field_strength": 3.0, "subject": "control", "seed": 4},
    ]
    assert (raw / "derivatives" / "phantom" / "sub-02" / "anat" / "sub-02_R1map.nii.gz").exists()
    with pytest.raises(ValueError, match="make_truth must be callable"):
        write_phantom_dataset(tmp_path / "refused", resolution=RESOLUTION, make_truth="make_phantom")
    assert not (tmp_path / "refused").exists()
