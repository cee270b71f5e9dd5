"""The QSM mask keeps enclosed dark voxels and removes unreliable ones connected to the edge."""

import numpy as np

from qmri_workflows.core.qsm import estimate_csf_mask, reliable_edge_mask
from tests.core.qsm._analytic import ball

SHAPE = (40, 40, 40)
CENTRE = (20.0, 20.0, 20.0)


def test_edge_voxels_go_enclosed_ones_stay():
    brain = ball(SHAPE, CENTRE, 12.0)
    given = ball(SHAPE, CENTRE, 14.0)  # two voxels of skull in the anatomical mask
    vein = ball(SHAPE, (20.0, 20.0, 16.0), 2.0)  # dark, but enclosed by tissue
    magnitude = np.where(brain & ~vein, 1.0, 0.02)
    noisy_patch = ball(SHAPE, (20.0, 31.0, 20.0), 2.5) & brain  # bright, but phase unusable
    field_sd = np.where(noisy_patch, 5.0, 0.1)
    reliable = reliable_edge_mask(given, magnitude, field_sd)
    assert not (reliable & ~brain).any()
    assert reliable[vein].all()
    assert not reliable[noisy_patch].any()
    assert reliable.sum() == (brain & ~noisy_patch).sum()
    # Without a finite field SD (two echoes) the magnitude criterion alone applies.
    assert reliable_edge_mask(given, magnitude, np.full(SHAPE, np.nan)).sum() == brain.sum()


def test_csf_is_slow_decay_deep_inside():
    mask = ball(SHAPE, CENTRE, 15.0)
    ventricle = ball(SHAPE, CENTRE, 4.0)
    sulcus = ball(SHAPE, (20.0, 20.0, 33.0), 2.5) & mask
    r2star = np.where(ventricle | sulcus, 3.0, 20.0)
    csf = estimate_csf_mask(mask, r2star, (1.0, 1.0, 1.0))
    assert np.array_equal(csf, ventricle)
