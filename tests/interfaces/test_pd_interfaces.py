"""ReceiveSensitivity, CalibratePD and EstimateB1FromVFA on files written from the 2 mm phantom."""

import json

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.interfaces.pd import CalibratePD, EstimateB1FromVFA, ReceiveSensitivity
from qmri_workflows.io.errors import BIDSInputError
from tests.core.relaxometry.phantom_2mm import Subject2mm, format_errors, save_map, write_subject_files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Maps on the 2 mm grid and the RB1COR pair on its own 4 mm grid."""
    root = tmp_path_factory.mktemp("pd")
    subject = Subject2mm("patient", rb1cor_factor=2)
    written = write_subject_files(subject, root)
    rb1cor_affine = written["rb1cor_affine"]
    paths = {
        "m0": written["m0_file"],
        "r1": written["r1_file"],
        "mask": written["mask_file"],
        "head": written["head_file"],
        "body": written["body_file"],
        "flip1": written["flip_files"][0],
        "flip2": written["flip_files"][1],
    }
    shifted = rb1cor_affine.copy()
    shifted[:3, 3] += 500.0  # a body-coil image from elsewhere (another session, a broken header)
    paths["body_elsewhere"] = save_map(root / "body_elsewhere.nii", subject.body, shifted)
    finer = rb1cor_affine.copy()
    finer[:3, :3] /= 2.0  # the same body-coil image at twice the resolution, same field of view
    paths["body_finer"] = save_map(
        root / "body_finer.nii", np.kron(subject.body, np.ones((2, 2, 2))), finer @ _half_voxel_shift()
    )
    return subject, paths


def _half_voxel_shift():
    """Keep the field of view when halving the voxel: the first centre moves by -1/4 coarse voxel."""
    shift = np.eye(4)
    shift[:3, 3] = -0.5
    return shift


def _in(tmp_path, interface):
    import os

    previous = os.getcwd()
    os.chdir(tmp_path)
    try:
        return interface.run()
    finally:
        os.chdir(previous)


def test_receive_correction_from_a_low_resolution_pair_gives_pd_within_two_percent(files, tmp_path):
    subject, paths = files
    receive = _in(
        tmp_path,
        ReceiveSensitivity(
            head_file=paths["head"], body_file=paths["body"], reference_file=paths["m0"], mask_file=paths["mask"]
        ),
    )
    assert nib.load(receive.outputs.receive_file).shape == subject.truth.shape
    result = _in(
        tmp_path,
        CalibratePD(
            m0_file=paths["m0"],
            r1_file=paths["r1"],
            mask_file=paths["mask"],
            receive_file=receive.outputs.receive_file,
            reference="csf",
        ),
    )
    pd = np.asarray(nib.load(result.outputs.pd_file).dataobj)
    errors = subject.median_errors(pd, subject.truth.pd)
    print(f"\nPD through the interfaces, RB1COR at 4 mm: {format_errors(errors)}")
    assert max(abs(e) for e in errors.values()) < 2.0
    metadata = result.outputs.metadata
    assert metadata["Units"] == "percent" and metadata["ReceiveCorrection"] == "rb1cor"
    assert "RB1COR" in metadata["EstimationAlgorithm"]
    json.dumps(metadata)  # sidecar-ready


def test_a_body_coil_image_on_another_grid_is_resampled(files, tmp_path):
    subject, paths = files
    same = _in(
        tmp_path,
        ReceiveSensitivity(head_file=paths["head"], body_file=paths["body"], reference_file=paths["m0"]),
    )
    finer = _in(
        tmp_path,
        ReceiveSensitivity(head_file=paths["head"], body_file=paths["body_finer"], reference_file=paths["m0"]),
    )
    a = np.asarray(nib.load(same.outputs.receive_file).dataobj)
    b = np.asarray(nib.load(finer.outputs.receive_file).dataobj)
    brain = subject.brain_mask
    ratio = b[brain] / a[brain]
    assert np.median(np.abs(ratio / np.median(ratio) - 1)) < 0.01


def test_a_body_coil_image_elsewhere_or_missing_gets_one_clear_error(files, tmp_path):
    _, paths = files
    with pytest.raises(BIDSInputError, match="does not overlap"):
        _in(
            tmp_path,
            ReceiveSensitivity(head_file=paths["head"], body_file=paths["body_elsewhere"], reference_file=paths["m0"]),
        )
    with pytest.raises(BIDSInputError, match="does not exist"):
        _in(
            tmp_path,
            ReceiveSensitivity(
                head_file=paths["head"], body_file=str(tmp_path / "missing.nii"), reference_file=paths["m0"]
            ),
        )


def test_without_a_pair_the_r1_relation_is_used_and_said(files, tmp_path):
    subject, paths = files
    result = _in(tmp_path, CalibratePD(m0_file=paths["m0"], r1_file=paths["r1"], mask_file=paths["mask"]))
    assert result.outputs.metadata["ReceiveCorrection"] == "r1_relation"
    pd = np.asarray(nib.load(result.outputs.pd_file).dataobj)
    errors = subject.median_errors(pd, subject.truth.pd)
    print(f"\nPD through the interface, 1/PD-R1 receive estimate: {format_errors(errors)}")
    assert max(abs(e) for e in errors.values()) < 3.0
    off = _in(
        tmp_path,
        CalibratePD(m0_file=paths["m0"], r1_file=paths["r1"], mask_file=paths["mask"], receive_correction=False),
    )
    assert off.outputs.metadata["ReceiveCorrection"] == "none"
    assert "no receive-sensitivity correction" in off.outputs.metadata["EstimationAlgorithm"]
    # the calibration is cited with and without a receive correction, the correction when made
    assert any("Tofts" in reference for reference in off.outputs.metadata["EstimationReference"])
    assert not any("Volz" in reference for reference in off.outputs.metadata["EstimationReference"])
    references = result.outputs.metadata["EstimationReference"]
    assert any("Tofts" in reference for reference in references)
    assert any("Volz" in reference for reference in references)


def test_map_free_b1_writes_a_percent_tb1map(files, tmp_path):
    subject, paths = files
    result = _in(
        tmp_path,
        EstimateB1FromVFA(
            signal_files=[paths["flip1"], paths["flip2"]],
            flip_angles=list(subject.protocol.vfa.flip_angles),
            repetition_time=subject.repetition_time,
            mask_file=paths["mask"],
        ),
    )
    b1 = np.asarray(nib.load(result.outputs.b1_file).dataobj)
    brain = subject.brain_mask
    assert result.outputs.metadata["Units"] == "percent"
    assert abs(np.mean(b1[brain]) - 100.0) < 0.01
    assert np.median(np.abs(b1[brain] / (100 * subject.truth.b1[brain]) - 1)) < 0.03
    with pytest.raises(BIDSInputError, match="two or more distinct flip angles"):
        _in(
            tmp_path,
            EstimateB1FromVFA(
                signal_files=[paths["flip1"]], flip_angles=[6.0], repetition_time=0.025, mask_file=paths["mask"]
            ),
        )
