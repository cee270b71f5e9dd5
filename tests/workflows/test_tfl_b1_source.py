"""Where the Siemens tfl_b1map stands among the B1+ sources: --derivatives TB1map > AFI > DAM > TFL
> raw fmap TB1map; the plan names the sources that are not used."""

import dataclasses

import numpy as np

from qmri_workflows.io.query import TB1MAP, DerivativeFile, collect_inputs, open_layout
from qmri_workflows.workflows import registry
from qmri_workflows.workflows.relaxometry import _b1_source, _b1_sources, _build_b1, _describe_b1
from tests.bids_factory import DEFAULT_SHAPE, make_dataset, write_image, write_sidecar


def _inputs(root, *, afi=False, dam=False):
    dataset = make_dataset(root, phase=False, afi=afi)
    fmap = dataset.root / "sub-01" / "fmap"
    if dam:
        for index, angle in ((1, 60.0), (2, 120.0)):
            path = write_image(fmap / f"sub-01_flip-{index}_TB1DAM.nii.gz", seed=index)
            write_sidecar(path, {"FlipAngle": angle, "RepetitionTimeExcitation": 2.0, "MagneticFieldStrength": 3.0})
    famp = write_image(fmap / "sub-01_acq-famp_TB1TFL.nii.gz", np.full(DEFAULT_SHAPE, 800), dtype=np.uint16)
    write_sidecar(famp, {"FlipAngle": 80.0, "MagneticFieldStrength": 3.0})
    return collect_inputs(open_layout(dataset.root), "01"), famp


def test_tfl_is_used_without_afi_or_dam(tmp_path):
    inputs, famp = _inputs(tmp_path / "raw")
    # famp 800 reads as B1+ 1 at 80 deg (sidecar FlipAngle, as VB software writes it)
    assert _b1_source(inputs) == "tfl" and _b1_sources(inputs) == (str(famp),)
    assert _describe_b1(inputs).startswith("Siemens tfl_b1map (famp / 10 / 80 deg, angle from sidecar FlipAngle)")
    node = _build_b1(registry.BuildContext(inputs=inputs, options={"n_coils": 1})).inputs.inputnode
    assert (node.famp_file, node.prep_angle, node.angle_source) == (str(famp), 80.0, "sidecar FlipAngle")


def test_afi_and_dam_win_over_tfl_and_say_so(tmp_path):
    inputs, _ = _inputs(tmp_path / "dam", dam=True)
    assert _b1_source(inputs) == "dam"
    assert _describe_b1(inputs).endswith("(the tfl_b1map is not used)")
    inputs, _ = _inputs(tmp_path / "afi", afi=True, dam=True)
    assert _b1_source(inputs) == "afi"
    assert _describe_b1(inputs).endswith("(the double-angle pair and the tfl_b1map are not used)")


def test_a_derivatives_tb1map_wins_over_tfl(tmp_path):
    inputs, _ = _inputs(tmp_path / "raw")
    given = DerivativeFile(path=str(tmp_path / "TB1map.nii.gz"), units_read='Units "ratio"')
    inputs = dataclasses.replace(inputs, derivatives={TB1MAP: given})
    assert _b1_source(inputs) == "tb1map"
    assert _describe_b1(inputs).endswith("used instead of the tfl_b1map")
