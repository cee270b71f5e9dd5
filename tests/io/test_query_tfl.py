"""The Siemens tfl_b1map (``fmap/*_acq-famp_TB1TFL``, ``*_acq-anat_TB1TFL``) in the input query.

Its famp holds 10 x the actual preparation angle (deg); the nominal angle comes from
``--tb1tfl-prep-angle`` or from a sidecar ``FlipAngle`` that is a preparation angle (VB software),
never from a readout angle (VE/XA software writes 8 or 10 deg there).
"""

import re

import numpy as np
import pytest

from qmri_workflows.io.query import TFL, collect_inputs, open_layout
from tests.bids_factory import DEFAULT_SHAPE, head_image, make_dataset, write_image, write_sidecar

B1_IN_HEAD = 0.95


def _famp(values_in_head, *, seed=1):
    """A famp as the scanner stores it: integers, the head at ``values_in_head``, arccos of noise in
    the air (anywhere in 0..1800, median about 900)."""
    head = head_image(DEFAULT_SHAPE, seed=0) > 300
    air = np.random.default_rng(seed).integers(0, 1801, size=DEFAULT_SHAPE)
    return np.where(head, values_in_head, air)


def _with_tfl(root, *, flip_angle=8.0, famp=None, anat=True, famp_labels=("famp",), dtype=np.uint16):
    dataset = make_dataset(root, phase=False)
    fmap = dataset.root / "sub-01" / "fmap"
    paths = {}
    for label in famp_labels:
        data = _famp(round(10 * 80 * B1_IN_HEAD)) if famp is None else famp
        name = "sub-01_acq-famp" + (f"_{label}" if label != "famp" else "") + "_TB1TFL.nii.gz"
        paths[label] = write_image(fmap / name, data, dtype=dtype)
        write_sidecar(paths[label], {"FlipAngle": flip_angle, "RepetitionTime": 5.0, "MagneticFieldStrength": 3.0})
    if anat:
        paths["anat"] = write_image(fmap / "sub-01_acq-anat_TB1TFL.nii.gz", seed=3)
        write_sidecar(paths["anat"], {"FlipAngle": flip_angle, "RepetitionTime": 5.0, "MagneticFieldStrength": 3.0})
    return dataset, paths


def _collect(dataset, angle=None):
    return collect_inputs(open_layout(dataset.root), "01", tb1tfl_prep_angle=angle)


def _problem(inputs, match):
    problem = inputs.problem(TFL)
    assert problem is not None, inputs.describe()
    assert re.search(match, problem.message), problem.message
    assert not inputs.has(TFL)
    return problem.message


def test_the_option_gives_the_preparation_angle(tmp_path):
    dataset, paths = _with_tfl(tmp_path / "raw")
    inputs = _collect(dataset, 80.0)
    assert inputs.problems == () and inputs.unsupported_transmit == ()
    tfl = inputs.tfl
    assert (tfl.famp_file, tfl.anat_file) == (str(paths["famp"]), str(paths["anat"]))
    assert (tfl.prep_angle, tfl.angle_source) == (80.0, "--tb1tfl-prep-angle")
    # the median of the head, not of the air's arccos of noise
    assert tfl.median_ratio == pytest.approx(B1_IN_HEAD, abs=0.001)
    assert "Siemens tfl_b1map (famp / 10 / 80 deg, angle from --tb1tfl-prep-angle)" in inputs.describe()


def test_the_option_wins_over_a_preparation_angle_in_the_sidecar(tmp_path):
    dataset, _ = _with_tfl(tmp_path / "raw", flip_angle=90.0)
    assert _collect(dataset, 80.0).tfl.prep_angle == 80.0


def test_a_vb_sidecar_gives_the_preparation_angle(tmp_path):
    dataset, _ = _with_tfl(tmp_path / "raw", flip_angle=80.0, anat=False)
    tfl = _collect(dataset).tfl
    assert (tfl.prep_angle, tfl.angle_source, tfl.anat_file) == (80.0, "sidecar FlipAngle", None)


@pytest.mark.parametrize("flip_angle", [8.0, None])
def test_a_readout_angle_in_the_sidecar_is_refused_with_the_fix(tmp_path, flip_angle):
    dataset, paths = _with_tfl(tmp_path / "raw", flip_angle=flip_angle)
    inputs = _collect(dataset)
    message = _problem(inputs, "not the nominal preparation angle")
    assert paths["famp"].name in message
    assert "--tb1tfl-prep-angle DEG" in message and "80 or 90 deg" in message
    assert ("FlipAngle 8 deg" if flip_angle else "no FlipAngle") in message
    assert len(inputs.gre) == 2  # the other collections go on


@pytest.mark.parametrize(
    ("stored", "what"),
    [(80 * B1_IN_HEAD, "degrees"), (B1_IN_HEAD, "a ratio"), (10 * 80 * B1_IN_HEAD * 2.5, "a smaller angle")],
)
def test_a_famp_on_another_scale_is_refused(tmp_path, stored, what):
    """famp already in degrees or as a ratio, or read against the wrong nominal angle."""
    dataset, paths = _with_tfl(tmp_path / "raw", famp=_famp(stored), dtype=np.float32)
    inputs = _collect(dataset, 80.0)
    message = _problem(inputs, r"median famp / \(10 x 80 deg\) in the head is")
    assert paths["famp"].name in message and "stored already in degrees or as a ratio" in message


def test_famp_alone_is_enough_and_anat_alone_is_not(tmp_path):
    dataset, paths = _with_tfl(tmp_path / "raw", anat=False)
    tfl = _collect(dataset, 80.0).tfl
    # without the reference the air is in the median: it stays plausible, as the scale check needs
    assert tfl.anat_file is None and 0.9 < tfl.median_ratio < 1.15
    paths["famp"].unlink()
    write_image(paths["famp"].with_name("sub-01_acq-anat_TB1TFL.nii.gz"))
    message = _problem(_collect(dataset, 80.0), "without its flip-angle map")
    assert "sub-01_acq-anat_TB1TFL.nii.gz" in message and "fmap/*_acq-famp_TB1TFL" in message


def test_two_famp_images_are_one_problem(tmp_path):
    dataset, paths = _with_tfl(tmp_path / "raw", famp_labels=("run-1", "run-2"))
    message = _problem(_collect(dataset, 80.0), "two TB1TFL images with acq-famp")
    assert paths["run-1"].name in message and paths["run-2"].name in message and "keep one" in message
