"""The closed-form ground truth agrees with the Fourier forward model of core.dipole.

Guards the formulas of tests/core/qsm/_analytic.py (a wrong sign or angle there would make every
other QSM test meaningless): far from the surfaces the two must agree.
"""

import numpy as np
import pytest

from qmri_workflows.core.dipole import forward_field
from tests.core.qsm._analytic import ball, sample

N = 64
CENTRE = np.full(3, (N - 1) / 2)


@pytest.mark.parametrize("angle_deg", [0.0, 30.0, 54.7356, 90.0])
@pytest.mark.parametrize("b0", [(0, 0, 1), (0.3, 0.2, 1.0)], ids=["axial", "oblique"])
def test_cylinder_closed_form_matches_fourier_model(angle_deg, b0):
    b = np.asarray(b0, float) / np.linalg.norm(b0)
    # An axis at angle_deg to B0: rotate B0 towards a perpendicular direction.
    perpendicular = np.cross(b, [1.0, 0.0, 0.0])
    perpendicular /= np.linalg.norm(perpendicular)
    angle = np.radians(angle_deg)
    axis = np.cos(angle) * b + np.sin(angle) * perpendicular
    chi_value, radius = 0.4, 3.0
    chi, closed_form = sample(
        (N,) * 3,
        1.0,
        [("cylinder", dict(point_on_axis=CENTRE, axis=axis, radius=radius, chi=chi_value))],
        b0,
        supersampling=2,
    )
    # The Fourier model sees a finite cylinder (cut at the array's faces) in a padded box; near the
    # centre its ends are far away. Compare there, 2 voxels away from the surface, after removing
    # the constant the D(0) = 0 convention leaves undetermined.
    fourier = forward_field(chi, 1.0, b0_direction=b0, pad=N)
    grid = np.stack(np.meshgrid(*[np.arange(N) - c for c in CENTRE], indexing="ij"))
    rho = np.sqrt(((grid - np.tensordot(axis, grid, axes=1) * axis.reshape(3, 1, 1, 1)) ** 2).sum(0))
    region = ball((N,) * 3, CENTRE, 12) & (np.abs(rho - radius) > 2)
    difference = (fourier - closed_form)[region]
    difference -= difference.mean()
    inside_field = chi_value / 6 * (3 * np.cos(angle) ** 2 - 1)
    print(f"angle {angle_deg:.1f}: inside {inside_field:+.4f} ppm, max deviation {np.abs(difference).max():.4f} ppm")
    assert np.abs(difference).max() < 0.05 * chi_value
