"""Every QSM step gives the same map whichever way the scanner or converter stored the axes.

Sites store the same acquisition in different voxel orders: RAS or LPS, axial or sagittal slabs
(dcm2niix keeps the scanner's order). A voxel's value must not depend on it: each step is run on
a volume and on the same volume with its axes permuted and two of them reversed (voxel size and B0
direction in voxel coordinates transformed with it), and the second result, put back in the first
order, must equal the first. The voxels are anisotropic and the mask is not symmetric, so a step
that took an axis or a direction for another would show.

PDF and iLSQR run 10 LSQR iterations here: in float32 the two orders' rounding errors grow with the
iterations of these ill-conditioned least-squares problems (PDF: 2e-6 after 10, 5e-5 after 30,
5e-3 after 60), which says nothing about the order.
"""

import numpy as np
import pytest

from qmri_workflows.core.qsm.background import (
    remove_background_lbv,
    remove_background_pdf,
    remove_background_vsharp,
)
from qmri_workflows.core.qsm.inversion import invert_ilsqr, invert_l2_gradient, invert_tkd, invert_tv_admm
from qmri_workflows.core.qsm.phase import unwrap_laplacian, unwrap_region_growing, wrap_phase
from tests.core.qsm._analytic import ball, sample

SHAPE = (40, 46, 34)
VOXEL_SIZE = np.array([1.0, 1.2, 1.5])
B0 = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])
PHASE_SCALE = 2 * np.pi * 42.577478518 * 3.0 * 0.02
PERMUTATION = (2, 0, 1)
REVERSED = (0, 2)  # axes of the permuted volume stored in reverse


def _store(volume):
    return np.flip(np.transpose(volume, PERMUTATION), REVERSED)


def _restore(volume):
    return np.transpose(np.flip(volume, REVERSED), np.argsort(PERMUTATION))


def _stored_b0():
    direction = B0[list(PERMUTATION)].copy()
    direction[list(REVERSED)] *= -1
    return direction


@pytest.fixture(scope="module")
def head():
    centre = np.array(SHAPE) * VOXEL_SIZE / 2 + (1.5, -2.0, 1.0)
    sources = [
        ("sphere", dict(centre=centre + (-6, 4, -5), radius=4.0, chi=0.2)),
        ("sphere", dict(centre=centre + (5, -6, 4), radius=3.0, chi=-0.15)),
        ("cylinder", dict(point_on_axis=centre + (0, 8, 0), axis=(1, 0.2, 0.4), radius=1.5, chi=0.4)),
    ]
    air = [("sphere", dict(centre=centre + (0, 0, 26), radius=6.0, chi=-9.4))]
    _, local = sample(SHAPE, VOXEL_SIZE, sources, B0, supersampling=2)
    _, background = sample(SHAPE, VOXEL_SIZE, air, B0, supersampling=2)
    # an ellipsoid-like mask with a bite out of one side: no symmetry left
    mask = ball(SHAPE, centre, 17.0, VOXEL_SIZE) & ~ball(SHAPE, centre + (12, 10, -6), 7.0, VOXEL_SIZE)
    rng = np.random.default_rng(3)
    return dict(
        local=(local + 0.001 * rng.standard_normal(SHAPE)).astype(np.float32),
        total=(local + background).astype(np.float32),
        mask=mask,
        magnitude=(1.0 + 0.2 * rng.random(SHAPE)).astype(np.float32),
    )


STEPS = {
    "vsharp": lambda h, field, mask, vs, b0: remove_background_vsharp(field, mask, vs)[0],
    "pdf": lambda h, field, mask, vs, b0: remove_background_pdf(field, mask, vs, b0_direction=b0, max_iter=10)[0],
    "lbv": lambda h, field, mask, vs, b0: remove_background_lbv(field, mask, vs)[0],
    "tkd": lambda h, field, mask, vs, b0: invert_tkd(field, mask, vs, b0_direction=b0),
    "l2": lambda h, field, mask, vs, b0: invert_l2_gradient(field, mask, vs, b0_direction=b0),
    "ilsqr": lambda h, field, mask, vs, b0: invert_ilsqr(field, mask, vs, b0_direction=b0, weights=h, max_iter=10),
    "tv": lambda h, field, mask, vs, b0: invert_tv_admm(
        field, mask, vs, b0_direction=b0, weights=h, phase_scale=PHASE_SCALE
    ),
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_step_does_not_depend_on_the_storage_order(head, step):
    field = head["total"] if step in ("vsharp", "pdf", "lbv") else head["local"]
    run = STEPS[step]
    first = run(head["magnitude"], field, head["mask"], VOXEL_SIZE, B0)
    stored = run(
        _store(head["magnitude"]), _store(field), _store(head["mask"]), VOXEL_SIZE[list(PERMUTATION)], _stored_b0()
    )
    second = _restore(stored)
    valid = head["mask"] & (first != 0)
    assert valid.sum() > 0.5 * head["mask"].sum()
    assert np.array_equal(first != 0, second != 0), "the two orders give different masks"
    difference = np.linalg.norm((second - first)[valid]) / np.linalg.norm(first[valid])
    print(f"\n{step}: relative difference between storage orders {difference:.1e}")
    assert difference < 1e-4


@pytest.mark.parametrize("unwrap", [unwrap_laplacian, unwrap_region_growing], ids=["laplacian", "region_growing"])
def test_unwrapping_does_not_depend_on_the_storage_order(head, unwrap):
    mask = head["mask"]
    phase = wrap_phase(PHASE_SCALE * head["total"]).astype(np.float32)
    if unwrap is unwrap_laplacian:
        first = unwrap(phase, VOXEL_SIZE, mask=mask)
        second = _restore(unwrap(_store(phase), VOXEL_SIZE[list(PERMUTATION)], mask=_store(mask)))
    else:
        first = unwrap(phase, magnitude=head["magnitude"], mask=mask)
        second = _restore(unwrap(_store(phase), magnitude=_store(head["magnitude"]), mask=_store(mask)))
    # region growing may start at another voxel: the two agree up to one multiple of 2 pi
    offset = np.median((second - first)[mask])
    assert abs(offset / (2 * np.pi) - round(offset / (2 * np.pi))) < 1e-3
    assert np.abs((second - first - offset)[mask]).max() < 1e-3
