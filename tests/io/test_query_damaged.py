"""Damaged images are found by the pre-flight (:func:`collect_inputs`) and disable only their collection."""

import gzip
import re

import pytest

from qmri_workflows.io.query import AFI, GRE, TB1MAP, collect_inputs, open_derivatives, open_layout
from tests.bids_factory import DAMAGE_KINDS, DAMAGE_MESSAGES, damage_image, edit_sidecar, make_dataset, make_derivatives


def _single_line_problem(inputs, collection, damaged):
    problem = inputs.problem(collection)
    assert problem is not None, inputs.describe()
    assert str(damaged) in problem.message and "\n" not in problem.message
    return problem.message


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_gre_echo_disables_gre_only(tmp_path, kind):
    raw = make_dataset(tmp_path / "raw", afi=True)
    damaged = damage_image(raw.files["gre"][3], kind)  # an echo of the second flip angle
    inputs = collect_inputs(open_layout(raw.root), "01")
    message = _single_line_problem(inputs, GRE, damaged)
    assert re.search(DAMAGE_MESSAGES[kind], message), message
    assert not inputs.has(GRE) and inputs.gre == ()
    assert inputs.has(AFI) and inputs.problem(AFI) is None


@pytest.mark.parametrize("kind", DAMAGE_KINDS)
def test_damaged_afi_image_disables_afi_only(tmp_path, kind):
    raw = make_dataset(tmp_path / "raw", afi=True, phase=False)
    damaged = damage_image(raw.files["afi"][1], kind)
    inputs = collect_inputs(open_layout(raw.root), "01")
    message = _single_line_problem(inputs, AFI, damaged)
    assert re.search(DAMAGE_MESSAGES[kind], message), message
    assert not inputs.has(AFI)
    assert inputs.has(GRE) and inputs.problem(GRE) is None and len(inputs.gre) == 2


def test_damaged_unlabelled_phase_echo_is_a_problem_not_a_crash(tmp_path):
    # The first phase echo without "Units" is read voxel by voxel to tell its units: a truncated one
    # used to raise EOFError out of collect_inputs.
    # (Large enough that the cut leaves the header readable, as in a real interrupted copy.)
    raw = make_dataset(tmp_path / "raw", phase_units="siemens", shape=(24, 24, 16))
    first_phase = raw.files["gre_phase"][0]
    edit_sidecar(first_phase, Units=None)
    damage_image(first_phase, "truncated")
    inputs = collect_inputs(open_layout(raw.root), "01")
    assert "is damaged or truncated" in _single_line_problem(inputs, GRE, first_phase)


@pytest.mark.parametrize("kind", ["truncated", "lying_header"])
def test_damaged_derivative_disables_that_derivative_only(tmp_path, kind):
    raw = make_dataset(tmp_path / "raw", phase=False)
    derivatives = make_derivatives(tmp_path / "deriv")
    damaged = damage_image(derivatives.files["tb1map"][0], kind)
    inputs = collect_inputs(open_layout(raw.root), "01", derivatives=open_derivatives([derivatives.root]))
    _single_line_problem(inputs, TB1MAP, damaged)
    assert not inputs.has(TB1MAP) and inputs.has(GRE)
    assert {"dseg", "lesion_mask", "brain_mask"} <= set(inputs.derivatives)


def test_whole_multi_member_gzip_echo_passes(tmp_path):
    # pigz/bgzip write several gzip members: the trailer then holds only the last member's size,
    # and the file must still pass (it is decompressed once to count).
    raw = make_dataset(tmp_path / "raw", phase=False)
    echo = raw.files["gre"][0]
    plain = gzip.decompress(echo.read_bytes())
    echo.write_bytes(b"".join(gzip.compress(plain[i : i + 500]) for i in range(0, len(plain), 500)))
    inputs = collect_inputs(open_layout(raw.root), "01")
    assert inputs.problems == () and len(inputs.gre) == 2
