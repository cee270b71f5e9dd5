"""Tests of the BIDS input query (qmri_workflows.io.query) and image loading (qmri_workflows.io.images)."""

import json
import math
import os
import re
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from qmri_workflows.io.images import load_phase, load_volume
from qmri_workflows.io.query import (
    AFI,
    BSSFP,
    DAM,
    GRE,
    RECEIVE,
    BIDSInputError,
    collect_inputs,
    open_layout,
    phase_scale_from_values,
    select_participants,
)
from tests.bids_factory import (
    DEFAULT_AFFINE,
    edit_sidecar,
    make_dataset,
    phase_data,
    sidecar_of,
    write_image,
    write_sidecar,
)


def _collect(dataset, subject="01", session=None):
    return collect_inputs(open_layout(dataset.root), subject, session)


def _problem(dataset, collection, match):
    """Message of ``collection``'s problem (it must match ``match``); the collection is left out."""
    inputs = _collect(dataset)
    problem = inputs.problem(collection)
    assert problem is not None, inputs.describe()
    assert re.search(match, problem.message), problem.message
    assert not inputs.has(collection)
    return problem.message


def _file(dataset, key, *needles):
    matches = [p for p in dataset.files[key] if all(n in p.name for n in needles)]
    assert len(matches) == 1, (needles, matches)
    return matches[0]


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


# ---------------------------------------------------------------------------------------------- happy paths
def test_vfa_with_phase(tmp_path):
    dataset = make_dataset(tmp_path / "raw", flip_angles=(20.0, 4.0), n_echoes=4)
    inputs = _collect(dataset)
    assert inputs.gre_suffix == "VFA"
    assert [s.flip_angle for s in inputs.gre] == [4.0, 20.0]  # sorted by angle, not flip label
    assert inputs.field_strength == 3.0
    assert inputs.bssfp == () and inputs.afi is None and inputs.receive is None
    for series in inputs.gre:
        assert series.echo_times == pytest.approx((0.003, 0.007, 0.011, 0.015))
        assert series.repetition_time == 0.025
        assert series.phase_scale == 1.0
        assert [os.path.basename(p).split("_")[1] for p in series.magnitude] == ["echo-1", "echo-2", "echo-3", "echo-4"]
        assert all("part-mag" in p for p in series.magnitude)
        assert all("part-phase" in p for p in series.phase)
        assert [p.replace("part-phase", "part-mag") for p in series.phase] == list(series.magnitude)
        assert series.metadata["Manufacturer"] == "Siemens"
    assert "flip-2" in inputs.gre[0].magnitude[0]  # 4 deg was labelled flip-2
    summary = inputs.describe()
    assert "VFA: 2 flip angle(s)" in summary and "TE [3, 7, 11, 15] ms" in summary


def test_megre_magnitude_only_without_part(tmp_path):
    dataset = make_dataset(tmp_path / "raw", gre="MEGRE", n_echoes=5, phase=False)
    assert all("part-" not in p.name for p in dataset.files["gre"])
    inputs = _collect(dataset)
    assert inputs.gre_suffix == "MEGRE"
    (series,) = inputs.gre
    assert len(series.magnitude) == 5 and series.phase is None and series.phase_scale is None
    assert series.flip_angle == 4.0


def test_megre_without_flip_angle_or_tr_is_accepted(tmp_path):
    dataset = make_dataset(tmp_path / "raw", gre="MEGRE", n_echoes=2, phase=False)
    for path in dataset.files["gre"]:
        edit_sidecar(path, FlipAngle=None, RepetitionTimeExcitation=None)
    (series,) = _collect(dataset).gre
    assert series.flip_angle is None and series.repetition_time is None


def test_single_echo_vfa_without_echo_entity_and_plain_nii(tmp_path):
    dataset = make_dataset(tmp_path / "raw", n_echoes=1, phase=False, extension=".nii", flip_angles=(3.0, 10.0, 25.0))
    assert all(p.name.endswith("_VFA.nii") and "echo-" not in p.name for p in dataset.files["gre"])
    inputs = _collect(dataset)
    assert [s.flip_angle for s in inputs.gre] == [3.0, 10.0, 25.0]
    assert all(len(s.magnitude) == 1 and s.echo_times == (0.003,) for s in inputs.gre)


def test_sessions(tmp_path):
    dataset = make_dataset(tmp_path / "raw", subjects=("01", "02"), sessions=("pre", "post"))
    layout = open_layout(dataset.root)
    assert select_participants(layout) == [("01", "post"), ("01", "pre"), ("02", "post"), ("02", "pre")]
    assert select_participants(layout, ["sub-02"], ["ses-pre"]) == [("02", "pre")]
    inputs = collect_inputs(layout, "sub-02", "ses-pre")
    assert inputs.session == "pre"
    assert all("ses-pre" in p and "sub-02" in p for s in inputs.gre for p in (*s.magnitude, *s.phase))
    with pytest.raises(BIDSInputError, match="has sessions"):
        collect_inputs(layout, "01")
    with pytest.raises(BIDSInputError, match="ses-mid not found.*ses-post, ses-pre"):
        collect_inputs(layout, "01", "mid")


def test_dcm2niix_sidecars_and_scanner_integer_phase(tmp_path):
    dataset = make_dataset(tmp_path / "raw", sidecar_style="dcm2niix", phase_units="siemens")
    inputs = _collect(dataset)
    for series in inputs.gre:
        assert series.repetition_time == 0.025  # from RepetitionTime
        assert "PulseSequenceType" not in series.metadata
        assert series.phase_scale == pytest.approx(math.pi / 4096)
    assert any("Siemens" in note and "radians" in note for note in inputs.notes)
    # the phase loaded with the scale is in radians and matches the encoded phase
    raw = np.asarray(nib.load(inputs.gre[0].phase[0]).dataobj)
    radians = load_phase(inputs.gre[0].phase[0], inputs.gre[0].phase_scale)
    assert radians.min() >= -math.pi - 1e-6 and radians.max() <= math.pi
    np.testing.assert_allclose(radians, raw * math.pi / 4096, rtol=1e-6)


def test_unlabelled_float_phase_in_radians(tmp_path):
    dataset = make_dataset(tmp_path / "raw", phase_units="rad2pi")
    for path in dataset.files["gre_phase"]:
        edit_sidecar(path, Units=None)
    inputs = _collect(dataset)
    assert all(s.phase_scale == 1.0 for s in inputs.gre)
    assert inputs.notes == ()


def test_sidecar_inheritance(tmp_path):
    dataset = make_dataset(tmp_path / "raw", inherit=True)
    assert (dataset.root / "VFA.json").is_file()
    inputs = _collect(dataset)
    assert all(s.repetition_time == 0.025 for s in inputs.gre)
    assert inputs.field_strength == 3.0


def test_bssfp_afi_and_receive(tmp_path):
    dataset = make_dataset(
        tmp_path / "raw", bssfp_increments=(270, 0, 90, 180), bssfp_flip_angles=(50.0, 15.0), afi=True, receive=True
    )
    inputs = _collect(dataset)
    assert [s.flip_angle for s in inputs.bssfp] == [15.0, 50.0]
    for series in inputs.bssfp:
        assert series.phase_increments == (0.0, 90.0, 180.0, 270.0)
        assert [os.path.basename(p).split("_")[1] for p in series.magnitude] == [
            "acq-bssfp000",
            "acq-bssfp090",
            "acq-bssfp180",
            "acq-bssfp270",
        ]
        assert [p.replace("part-phase", "part-mag") for p in series.phase] == list(series.magnitude)
        assert series.repetition_time == 0.005 and series.phase_scale == 1.0
    # bSSFP files are VFA files but must not leak into the spoiled GRE collection
    assert all("bssfp" not in os.path.basename(p) for s in inputs.gre for p in s.magnitude)
    assert [s.flip_angle for s in inputs.gre] == [4.0, 20.0]
    assert inputs.afi.tr1 == 0.02 and inputs.afi.tr2 == 0.1 and inputs.afi.flip_angle == 60.0
    assert "acq-tr1" in inputs.afi.tr1_file and "acq-tr2" in inputs.afi.tr2_file
    assert "acq-headPDw" in inputs.receive.head_file and "acq-bodyPDw" in inputs.receive.body_file
    assert "bSSFP: flip 15 deg" in inputs.describe()


def test_bssfp_without_spoiled_gre(tmp_path):
    dataset = make_dataset(tmp_path / "raw", gre=None, bssfp_increments=(0, 180), phase=False)
    inputs = _collect(dataset)
    assert inputs.gre == () and inputs.gre_suffix is None
    assert inputs.bssfp[0].phase is None and inputs.bssfp[0].phase_increments == (0.0, 180.0)


def test_vfa_preferred_over_megre(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    megre = make_dataset(tmp_path / "other", gre="MEGRE")
    for path in megre.files["gre"]:
        target = dataset.root / path.relative_to(megre.root)
        target.write_bytes(path.read_bytes())
        sidecar_of(target).write_text(sidecar_of(path).read_text())
    inputs = _collect(dataset)
    assert inputs.gre_suffix == "VFA"
    assert any("MEGRE images ignored" in note for note in inputs.notes)


def test_query_never_writes_into_dataset_and_ignores_derivatives(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    stray = dataset.root / "derivatives" / "old" / "sub-01" / "anat" / "sub-01_echo-9_flip-1_part-mag_VFA.nii.gz"
    write_image(stray)
    before = _snapshot(dataset.root)
    layout = open_layout(dataset.root, database_path=tmp_path / "work" / "pybids")
    inputs = collect_inputs(layout, "01")
    assert all("derivatives" not in p for s in inputs.gre for p in s.magnitude)
    assert _snapshot(dataset.root) == before
    with pytest.raises(BIDSInputError, match="inside the input dataset"):
        open_layout(dataset.root, database_path=dataset.root / "code" / "db")


# ---------------------------------------------------------------------------------------------- participants
def test_select_participants_errors(tmp_path):
    dataset = make_dataset(tmp_path / "raw", subjects=("01", "02"))
    layout = open_layout(dataset.root)
    assert select_participants(layout) == [("01", None), ("02", None)]
    assert select_participants(layout, ["02", "sub-01"]) == [("01", None), ("02", None)]
    with pytest.raises(BIDSInputError, match=r"sub-03 not found in .*raw.*available: sub-01, sub-02"):
        select_participants(layout, ["sub-03"])
    with pytest.raises(BIDSInputError, match="ses-1 not found.*none"):
        select_participants(layout, None, ["1"])


def test_open_layout_requires_dataset_root(tmp_path):
    with pytest.raises(BIDSInputError, match="does not exist"):
        open_layout(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BIDSInputError, match="dataset_description.json"):
        open_layout(tmp_path / "empty")


def test_no_qmri_inputs(tmp_path):
    dataset = make_dataset(tmp_path / "raw", gre=None, afi=True)
    inputs = _collect(dataset)  # no exception: the subject is simply empty
    assert inputs.gre == () and inputs.bssfp == () and not inputs.has(GRE) and not inputs.has(BSSFP)
    assert [p.collection for p in inputs.problems] == [GRE]
    assert re.search("no qMRI inputs for sub-01.*TB1AFI", inputs.problem(GRE).message)
    assert "gre unusable: no qMRI inputs" in inputs.describe()


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "key, match",
    [
        ("EchoTime", "no 'EchoTime'"),
        ("FlipAngle", "no 'FlipAngle'.*required for VFA"),
        ("RepetitionTimeExcitation", r"no 'RepetitionTimeExcitation' \(or 'RepetitionTime'\)"),
    ],
)
def test_missing_metadata(tmp_path, key, match):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-2", "flip-2")
    edit_sidecar(target, **{key: None})
    message = _problem(dataset, GRE, match)
    assert target.name in message
    assert target.name.replace(".nii.gz", ".json") in message  # says which sidecar to fix


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("RepetitionTimeExcitation", 0.03, "inconsistent TR"),
        ("FlipAngle", 5.0, "inconsistent FlipAngle"),
    ],
)
def test_inconsistent_within_series(tmp_path, key, value, match):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-3", "flip-1")
    edit_sidecar(target, **{key: value})
    message = _problem(dataset, GRE, match)
    assert target.name in message


def test_inconsistent_tr_across_flip_angles(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    for path in dataset.files["gre"]:
        if "flip-2" in path.name:
            edit_sidecar(path, RepetitionTimeExcitation=0.03)
    message = _problem(dataset, GRE, "share one TR")
    assert "flip-2" in message


def test_duplicate_echo_times(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-2", "flip-1", "part-mag")
    edit_sidecar(target, EchoTime=0.003)
    message = _problem(dataset, GRE, "duplicate echo time")
    assert target.name in message


def test_echo_times_in_milliseconds(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-1", "flip-1", "part-mag")
    edit_sidecar(target, EchoTime=3.0)
    message = _problem(dataset, GRE, "seconds, not ms")
    assert target.name in message


def test_phase_echoes_must_match_magnitude(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    missing = _file(dataset, "gre_phase", "echo-3", "flip-1")
    missing.unlink()
    sidecar_of(missing).unlink()
    message = _problem(dataset, GRE, r"phase echoes \[1, 2\] do not match magnitude echoes \[1, 2, 3\]")
    assert "flip-1" in message


def test_phase_echo_time_must_match_magnitude(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre_phase", "echo-2", "flip-2")
    edit_sidecar(target, EchoTime=0.008)
    message = _problem(dataset, GRE, "EchoTime 0.008")
    assert target.name in message


@pytest.mark.parametrize("change", ["shape", "affine"])
def test_grid_mismatch(tmp_path, change):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-1", "flip-2", "part-mag")
    if change == "shape":
        write_image(target, shape=(8, 8, 5))
    else:
        affine = DEFAULT_AFFINE.copy()
        affine[0, 3] += 0.01  # 10 micrometres: beyond the 1e-3 mm tolerance
        write_image(target, affine=affine)
    message = _problem(dataset, GRE, "not on one voxel grid")
    assert target.name in message


def test_grid_tolerance_accepts_rounding(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    affine = DEFAULT_AFFINE.copy()
    affine[0, 3] += 1e-5  # float32 header rounding is ~1e-6 mm
    write_image(_file(dataset, "gre", "echo-1", "flip-2", "part-mag"), affine=affine)
    assert len(_collect(dataset).gre) == 2


def test_4d_image_refused(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-1", "flip-2", "part-mag")
    write_image(target, shape=(8, 8, 6, 3))
    message = _problem(dataset, GRE, r"shape \(8, 8, 6, 3\)")
    assert target.name in message


def test_unknown_phase_units(tmp_path):
    dataset = make_dataset(tmp_path / "raw", phase_units="weird")
    _problem(
        dataset,
        GRE,
        r"cannot tell the units of phase image .*echo-1_flip-1_part-phase"
        r".*values span \[.*\].*\"Units\": \"rad\"",
    )


def test_unsupported_phase_units_label(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre_phase", "echo-1", "flip-1")
    edit_sidecar(target, Units="Hz")
    message = _problem(dataset, GRE, "unsupported phase")
    assert target.name.replace(".nii.gz", ".json") in message


def _to_degrees(path):
    image = nib.load(path)
    degrees = np.degrees(np.asarray(image.dataobj, dtype=np.float64)).astype(np.float32)
    nib.save(nib.Nifti1Image(degrees, image.affine), path)


def test_phase_in_degrees_label(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    for path in dataset.files["gre_phase"]:
        _to_degrees(path)
        edit_sidecar(path, Units="deg")
    assert all(s.phase_scale == pytest.approx(math.pi / 180) for s in _collect(dataset).gre)


def test_scanner_integer_phase_labelled_radians_is_refused_at_query_time(tmp_path):
    """A sidecar "Units": "rad" beside Siemens integers is one error naming the file, the values and
    the fix, before any processing (it used to stop the App in its denoising and QSM steps)."""
    dataset = make_dataset(tmp_path / "raw", phase_units="siemens")
    for path in dataset.files["gre_phase"]:
        edit_sidecar(path, Units="rad")
    message = _problem(dataset, GRE, r'says "Units": \'rad\' but its values span \[-4096, 4095\]')
    assert "echo-1_flip-1_part-phase" in message
    assert "Siemens 12-bit phase" in message and '"arbitrary"' in message


def test_radian_phase_labelled_degrees_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    for path in dataset.files["gre_phase"]:
        edit_sidecar(path, Units="deg")
    message = _problem(dataset, GRE, r'says "Units": \'deg\' but its values span')
    assert 'they look like radians: give its sidecar the "Units" of its values ("rad")' in message


def test_real_imaginary_parts_refused(tmp_path):
    dataset = make_dataset(tmp_path / "raw", phase=False)
    path = _file(dataset, "gre", "echo-1", "flip-1")
    real = path.with_name(path.name.replace("_VFA", "_part-real_VFA"))
    write_image(real)
    sidecar_of(real).write_text(sidecar_of(path).read_text())
    message = _problem(dataset, GRE, "part-real")
    assert real.name in message


def test_two_vfa_acquisitions_refused(tmp_path):
    dataset = make_dataset(tmp_path / "raw", n_echoes=1, phase=False)
    path = _file(dataset, "gre", "flip-1")
    other = path.with_name(path.name.replace("sub-01_", "sub-01_acq-lowres_"))
    write_image(other)
    sidecar_of(other).write_text(sidecar_of(path).read_text())
    message = _problem(dataset, GRE, "several VFA collections differ in acq-")
    assert other.name in message


def test_bssfp_sequence_type_conflict(tmp_path):
    dataset = make_dataset(tmp_path / "raw", bssfp_increments=(0, 180))
    target = dataset.files["bssfp"][0]
    edit_sidecar(target, PulseSequenceType="SPGR")
    message = _problem(dataset, BSSFP, "acq-bssfp000 marks a phase-cycled bSSFP")
    assert target.name in message
    assert len(_collect(dataset).gre) == 2  # the spoiled GRE is not affected


def test_bssfp_increment_conflict(tmp_path):
    dataset = make_dataset(tmp_path / "raw", bssfp_increments=(0, 90), phase=False)
    target = [p for p in dataset.files["bssfp"] if "bssfp090" in p.name][0]
    edit_sidecar(target, PhaseCyclingIncrement=180)
    message = _problem(dataset, BSSFP, "says 90 deg but the sidecar")
    assert target.name in message


def test_unknown_pulse_sequence(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    target = _file(dataset, "gre", "echo-1", "flip-1", "part-mag")
    edit_sidecar(target, PulseSequenceType="MP2RAGE")
    message = _problem(dataset, GRE, "MP2RAGE")
    assert target.name in message


def test_afi_errors(tmp_path):
    dataset = make_dataset(tmp_path / "raw", afi=True)
    tr1, tr2 = dataset.files["afi"]
    intact = _collect(dataset)
    assert intact.has(AFI) and intact.problems == ()
    edit_sidecar(tr2, FlipAngle=55.0)
    message = _problem(dataset, AFI, "AFI pair with different flip angles")
    assert tr1.name in message and tr2.name in message
    inputs = _collect(dataset)  # a broken AFI pair no longer stops the GRE
    assert inputs.afi is None and inputs.gre_suffix == "VFA" and len(inputs.gre) == 2
    assert [p.collection for p in inputs.problems] == [AFI]
    assert inputs.gre == intact.gre and inputs.field_strength == intact.field_strength
    edit_sidecar(tr2, FlipAngle=60.0, RepetitionTimeExcitation=0.02)
    message = _problem(dataset, AFI, "TR2 <= TR1")
    assert tr2.name in message
    tr2.unlink()
    message = _problem(dataset, AFI, "incomplete AFI pair")
    assert tr1.name in message


def _dam_pair(dataset, angles=(120.0, 60.0), trs=(4.0, 4.0)):
    """A double-angle pair whose flip-1 image has the larger angle: labels only number the images."""
    paths = []
    for index, (angle, tr) in enumerate(zip(angles, trs), start=1):
        path = write_image(dataset.root / "sub-01" / "fmap" / f"sub-01_flip-{index}_TB1DAM.nii.gz", seed=index)
        write_sidecar(path, {"FlipAngle": angle, "RepetitionTime": tr, "MagneticFieldStrength": 3.0})
        paths.append(path)
    return paths


def test_double_angle_pair_is_ordered_by_flip_angle(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    first, second = _dam_pair(dataset)
    inputs = _collect(dataset)
    assert inputs.has(DAM) and inputs.problems == () and inputs.unsupported_transmit == ()
    assert inputs.dam.flip_angles == (60.0, 120.0) and inputs.dam.repetition_time == 4.0
    assert (inputs.dam.flip1_file, inputs.dam.flip2_file) == (str(second), str(first))
    assert "double-angle pair: flip 60/120 deg, TR 4000 ms" in inputs.describe()


@pytest.mark.parametrize(
    ("angles", "trs", "match"),
    [
        ((60.0, 60.0), (4.0, 4.0), "double-angle pair with one flip angle"),
        ((60.0, 120.0), (4.0, 5.0), "different repetition times"),
        ((60.0, 180.0), (4.0, 4.0), "flip angles below 180"),
        ((60.0, 185.0), (4.0, 4.0), "not a valid excitation flip angle"),
        ((60.0, None), (4.0, 4.0), "FlipAngle"),
    ],
)
def test_double_angle_pair_errors_name_the_files_and_leave_the_gre(tmp_path, angles, trs, match):
    dataset = make_dataset(tmp_path / "raw")
    first, second = _dam_pair(dataset, angles=(60.0, 120.0), trs=trs)
    edit_sidecar(second, FlipAngle=angles[1])
    message = _problem(dataset, DAM, match)
    assert second.name in message
    assert len(_collect(dataset).gre) == 2


def test_double_angle_pair_of_one_image_is_refused(tmp_path):
    dataset = make_dataset(tmp_path / "raw")
    first, second = _dam_pair(dataset)
    second.unlink()
    sidecar_of(second).unlink()
    assert first.name in _problem(dataset, DAM, "needs two fmap/\\*_flip-<n>_TB1DAM images, found 1")


def test_receive_pair_incomplete(tmp_path):
    dataset = make_dataset(tmp_path / "raw", receive=True)
    head, body = dataset.files["receive"]
    body.unlink()
    message = _problem(dataset, RECEIVE, "incomplete receive-field pair")
    assert head.name in message
    inputs = _collect(dataset)
    assert len(inputs.gre) == 2 and inputs.problem(GRE) is None


# ---------------------------------------------------------------------------------------------- phase units
@pytest.mark.parametrize(
    "units, scale",
    [
        ("rad", 1.0),
        ("rad2pi", 1.0),
        ("siemens", math.pi / 4096),
        ("siemens12", 2 * math.pi / 4096),
        ("ge", 1e-3),
        ("int16", math.pi / 32768),
    ],
)
def test_phase_scale_from_values_recovers_radians(units, scale):
    data, dtype = phase_data(units, shape=(16, 16, 8), seed=3)
    stored = data.astype(dtype)
    integer = bool(np.all(stored == np.round(stored)))
    found, description = phase_scale_from_values(float(stored.min()), float(stored.max()), integer_valued=integer)
    assert found == pytest.approx(scale)
    truth, _ = phase_data("rad", shape=(16, 16, 8), seed=3)
    # same phase modulo 2 pi, to within the quantisation step of the encoding
    difference = np.angle(np.exp(1j * (stored * found - truth)))
    step = scale if units not in ("rad", "rad2pi") else 1e-6
    assert np.abs(difference).max() <= step + 1e-6, description


@pytest.mark.parametrize(
    "minimum, maximum, integer",
    [
        (0.0, 1000.0, False),  # floats beyond 2 pi
        (-100.0, 100.0, True),  # integers filling no known encoding
        (0.0, 4095.0 * 4, True),
    ],
)
def test_phase_scale_from_values_refuses_unknown(minimum, maximum, integer):
    with pytest.raises(BIDSInputError, match="cannot tell the units"):
        phase_scale_from_values(minimum, maximum, integer_valued=integer)


@pytest.mark.parametrize("minimum, maximum, integer", [(-180.0, 179.9, False), (0.0, 359.0, True)])
def test_phase_in_degrees_without_units_is_refused_with_the_degrees_advice(minimum, maximum, integer):
    # "Units": "rad", the advice for unknown values, would make degrees be read as radians
    with pytest.raises(BIDSInputError, match=r'cannot tell the units.*look like degrees: add "Units": "deg"'):
        phase_scale_from_values(minimum, maximum, integer_valued=integer, name="phase image x_part-phase.nii")


# ---------------------------------------------------------------------------------------------- images
def test_load_volume(tmp_path):
    data = np.random.default_rng(0).normal(size=(4, 5, 6))
    path = write_image(tmp_path / "a.nii.gz", data, dtype=np.float64)
    loaded = load_volume(path)
    assert loaded.dtype == np.float32 and loaded.shape == (4, 5, 6)
    np.testing.assert_allclose(loaded, data, rtol=1e-6)
    single = write_image(tmp_path / "b.nii.gz", data[..., None])
    assert load_volume(single, reference=nib.load(path)).shape == (4, 5, 6)


def test_load_volume_errors(tmp_path):
    nan = write_image(tmp_path / "nan.nii.gz", np.full((3, 3, 3), np.nan))
    with pytest.raises(BIDSInputError, match="nan.nii.gz holds no finite value"):
        load_volume(nan)
    four_d = write_image(tmp_path / "4d.nii.gz", np.ones((3, 3, 3, 2)))
    with pytest.raises(BIDSInputError, match=r"4d.nii.gz has shape \(3, 3, 3, 2\)"):
        load_volume(four_d)
    two_d = write_image(tmp_path / "2d.nii.gz", np.ones((3, 3)))
    with pytest.raises(BIDSInputError, match="2d.nii.gz"):
        load_volume(two_d)
    other = write_image(tmp_path / "other.nii.gz", np.ones((3, 3, 4)))
    with pytest.raises(BIDSInputError, match="other.nii.gz .* not on the grid"):
        load_volume(other, reference=nib.load(nan))
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    with pytest.raises(BIDSInputError, match="cannot read image .*junk.nii.gz"):
        load_volume(tmp_path / "junk.nii.gz")


def test_load_phase(tmp_path):
    stored = np.array([[[-4096, 0, 2048, 4094]]], dtype=np.int16)
    path = write_image(tmp_path / "p.nii.gz", stored, dtype=np.int16)
    np.testing.assert_allclose(
        load_phase(path, math.pi / 4096)[0, 0], [-math.pi, 0, math.pi / 2, math.pi * 4094 / 4096], rtol=1e-6
    )
    with pytest.raises(BIDSInputError, match="invalid phase scale"):
        load_phase(path, None)


def test_factory_layout_passes_bids_validator(tmp_path):
    """The raw layout of docs/architecture.rst (incl. the bSSFP convention) is valid BIDS."""
    validator = shutil.which("bids-validator-deno") or os.path.join(
        os.path.dirname(sys.executable), "bids-validator-deno"
    )
    if not os.path.exists(validator):
        pytest.skip("bids-validator-deno not installed")
    # (dcm2niix-style VFA sidecars lack PulseSequenceType, which BIDS requires for VFA; the query
    # tolerates that, the validator does not)
    make_dataset(
        tmp_path / "raw",
        sessions=("1",),
        bssfp_increments=(0, 90, 180, 270),
        afi=True,
        receive=True,
        phase_units="siemens",
    )
    make_dataset(tmp_path / "raw", subjects=("02",), gre="MEGRE", sidecar_style="dcm2niix")
    (tmp_path / "raw" / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\n")
    result = subprocess.run([validator, "--json", str(tmp_path / "raw")], capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    errors = [issue for issue in report["issues"]["issues"] if issue.get("severity") == "error"]
    assert errors == [], errors


# ---------------------------------------------------------------------------------------------- per-collection problems
@pytest.mark.parametrize("part", ["phase", "mag"])
def test_bssfp_duplicate_increment(tmp_path, part):
    dataset = make_dataset(tmp_path / "raw", bssfp_increments=(0, 90))
    source = next(p for p in dataset.files["bssfp"] if "bssfp090" in p.name and f"part-{part}" in p.name)
    # same increment (from the sidecar), named without the acq- label
    duplicate = source.with_name(source.name.replace("_acq-bssfp090", ""))
    duplicate.write_bytes(source.read_bytes())
    sidecar_of(duplicate).write_text(sidecar_of(source).read_text())
    message = _problem(
        dataset, BSSFP, f"two bSSFP {'magnitude' if part == 'mag' else 'phase'} images with increment 90 deg"
    )
    assert source.name in message and duplicate.name in message
    assert len(_collect(dataset).gre) == 2


def test_field_strength_disagreement_is_a_problem_of_the_later_collection(tmp_path):
    dataset = make_dataset(tmp_path / "raw", bssfp_increments=(0, 180), afi=True)
    for path in dataset.files["bssfp"]:
        edit_sidecar(path, MagneticFieldStrength=1.5)
    message = _problem(dataset, BSSFP, "MagneticFieldStrength 1.5 T but .*VFA.nii.gz states 3 T")
    assert "bssfp" in message
    inputs = _collect(dataset)
    assert inputs.field_strength == 3.0 and len(inputs.gre) == 2 and inputs.has(AFI)
    assert [p.collection for p in inputs.problems] == [BSSFP]


def test_has_and_problem_refuse_unknown_collections(tmp_path):
    inputs = _collect(make_dataset(tmp_path / "raw"))
    assert inputs.has(GRE) and not inputs.has(AFI) and inputs.problem(GRE) is None
    with pytest.raises(ValueError, match="unknown input collection 'B1'"):
        inputs.has("B1")
    with pytest.raises(ValueError, match="unknown input collection"):
        inputs.problem("B1")


def _bssfp_without(tmp_path, *parts):
    """Four cycles at two flip angles, minus the images whose names contain every one of ``parts``."""
    dataset = make_dataset(tmp_path / "raw", bssfp_increments=(0, 90, 180, 270), bssfp_flip_angles=(15.0, 50.0))
    for path in dataset.files["bssfp"]:
        if all(part in path.name for part in parts):
            path.unlink()
            sidecar_of(path).unlink()
    return dataset


def test_bssfp_cycle_missing_at_one_flip_angle(tmp_path):
    """Every flip angle needs the same phase cycles; the spoiled GRE is not affected."""
    dataset = _bssfp_without(tmp_path, "bssfp270", "flip-2")
    message = _problem(dataset, BSSFP, "different phase cycles")
    assert "270" in message and "flip-" in message and "add the missing" in message
    assert len(_collect(dataset).gre) == 2


def test_bssfp_phase_at_one_flip_angle_only(tmp_path):
    dataset = _bssfp_without(tmp_path, "part-phase", "flip-2")
    message = _problem(dataset, BSSFP, "phase images at some flip angles only")
    assert "flip-2" in message and "50 deg" in message
