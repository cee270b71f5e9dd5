"""The hMRI-style multi-parameter-mapping collection (BIDS ``MPM``) in the query layer."""

import shutil

import pytest

from qmri_workflows.io.query import GRE, MT, RECEIVE, collect_inputs, open_layout
from tests.bids_factory import edit_sidecar, make_dataset, sidecar_of


def _collect(dataset):
    return collect_inputs(open_layout(dataset.root), "01")


def _mpm(tmp_path, **options):
    options.setdefault("n_echoes", 4)
    return make_dataset(tmp_path / "raw", gre="MPM", flip_angles=(6.0, 21.0), **options)


def test_mpm_splits_into_mt_off_pair_and_mt_on_contrast(tmp_path):
    dataset = _mpm(tmp_path, mt_echoes=3, receive=True)
    inputs = _collect(dataset)
    assert inputs.gre_suffix == "MPM" and not inputs.problems
    assert [series.flip_angle for series in inputs.gre] == [6.0, 21.0]
    assert ["acq-PDw" in s.magnitude[0] and "acq-T1w" in t.magnitude[0] for s, t in [inputs.gre]] == [True]
    assert all("mt-off" in path for series in inputs.gre for path in series.magnitude)
    assert all(len(series.echo_times) == 4 and series.phase for series in inputs.gre)
    assert inputs.has(MT) and inputs.mt.flip_angle == 6.0 and len(inputs.mt.echo_times) == 3
    assert all("acq-MTw" in path and "mt-on" in path for path in inputs.mt.magnitude)
    # one head/body pair per contrast: PD takes the PDw pair
    assert inputs.has(RECEIVE) and "acq-headPDw" in inputs.receive.head_file
    assert "MT-weighted (MPM mt-on): flip 6 deg" in inputs.describe()


def test_mpm_without_mt_on_has_no_mt(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    for path in dataset.files["mt"]:
        path.unlink()
        sidecar_of(path).unlink()
    inputs = _collect(dataset)
    assert inputs.has(GRE) and not inputs.has(MT) and inputs.problem(MT) is None


def test_two_mt_on_flips_are_an_mt_problem_only(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    for path in dataset.files["mt"]:
        copy = path.with_name(path.name.replace("flip-1", "flip-2"))
        shutil.copy(path, copy)
        shutil.copy(sidecar_of(path), sidecar_of(copy))
    inputs = _collect(dataset)
    assert inputs.has(GRE) and not inputs.has(MT)
    message = inputs.problem(MT).message
    assert "several MT-weighted (mt-on) series" in message and "acq-MTw" in message


@pytest.mark.parametrize("contrast", ["PDw", "MTw"])
def test_missing_echo_names_the_series(tmp_path, contrast):
    dataset = _mpm(tmp_path, phase=False)
    files = dataset.files["gre"] + dataset.files["mt"]
    lost = next(path for path in files if f"acq-{contrast}" in path.name and "echo-2" in path.name)
    lost.unlink()
    inputs = _collect(dataset)
    collection = MT if contrast == "MTw" else GRE
    problem = inputs.problem(collection)
    assert problem is not None and "echo(es) 2 missing" in problem.message and f"acq-{contrast}" in problem.message
    if contrast == "MTw":
        assert inputs.has(GRE)  # R2*, R1, PD and QSM go on without MTsat


def test_mpm_file_without_mt_entity(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    path = dataset.files["gre"][0]
    renamed = path.with_name(path.name.replace("_mt-off", ""))
    path.rename(renamed)
    sidecar_of(path).rename(sidecar_of(renamed))
    problem = _collect(dataset).problem(GRE)
    assert problem is not None and "needs the mt-on or mt-off entity" in problem.message
    assert renamed.name in problem.message


def test_mpm_mt_off_pair_with_different_trs(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    for path in dataset.files["gre"]:
        if "acq-T1w" in path.name:
            edit_sidecar(path, RepetitionTimeExcitation=0.018)
    problem = _collect(dataset).problem(GRE)
    assert problem is not None and "must share one TR" in problem.message


def test_mt_on_with_its_own_tr_is_usable(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    for path in dataset.files["mt"]:
        edit_sidecar(path, RepetitionTimeExcitation=0.037)
    inputs = _collect(dataset)
    assert inputs.mt.repetition_time == pytest.approx(0.037) and not inputs.problems


def test_vfa_wins_over_mpm_with_a_note(tmp_path):
    dataset = _mpm(tmp_path, phase=False)
    vfa = make_dataset(tmp_path / "vfa", phase=False)
    for path in vfa.files["gre"]:
        target = dataset.root / path.relative_to(vfa.root)
        shutil.copy(path, target)
        shutil.copy(sidecar_of(path), sidecar_of(target))
    inputs = _collect(dataset)
    assert inputs.gre_suffix == "VFA" and inputs.mt is None
    assert any(note.startswith("MPM images ignored") for note in inputs.notes)


def test_hmri_entity_order_is_read_too(tmp_path):
    """hMRI exports put echo- after mt- (``acq-MTw_flip-1_mt-on_echo-1_part-mag``); the entities decide."""
    dataset = _mpm(tmp_path, phase=False)
    for path in dataset.files["gre"] + dataset.files["mt"]:
        echo = next(part for part in path.name.split("_") if part.startswith("echo-"))
        renamed = path.with_name(path.name.replace(f"_{echo}", "").replace("_MPM", f"_{echo}_MPM"))
        sidecar_of(path).rename(sidecar_of(renamed))
        path.rename(renamed)
    inputs = _collect(dataset)
    assert not inputs.problems and len(inputs.gre) == 2 and len(inputs.mt.echo_times) == 4
    assert inputs.mt.magnitude[0].endswith("sub-01_acq-MTw_flip-1_mt-on_echo-1_MPM.nii.gz")
