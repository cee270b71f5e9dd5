"""The phantom's field against closed forms: a sphere and an infinite cylinder at several angles to B0.

The field is computed from a map twice as fine as the grid it is compared on and cropped in
k-space (``band_limited_field``), as the phantom's B0 is. The reference formulas are those of
``tests/core/qsm/_analytic.py`` (Lorentz-corrected, relative to the surrounding medium):

* sphere of radius R: 0 inside, ``chi R^3 / 3 (3 cos^2 theta - 1) / r^3`` outside;
* infinite cylinder of radius a at angle theta to B0: ``chi / 6 (3 cos^2 theta - 1)`` inside,
  ``chi / 2 sin^2 theta (a / rho)^2 cos 2 phi`` outside.

The k-space crop rings next to the sharp edge (a few % of chi within 2 mm); farther away the field
must match the closed form within 4.5 % of chi, and within 1 % of chi on average.
"""

import numpy as np
import pytest

from qmri_workflows.phantom.fields import band_limited_field
from tests.core.qsm._analytic import cylinder, sample, sphere

FINE_MM = 0.5
FACTOR = 2
N = 48  # coarse voxels (1 mm) per axis
CENTRE = np.array([24.0, 24.0, 24.0])
EDGE_MARGIN_MM = 2.0
MAX_ERROR = 0.045
RMS_ERROR = 0.01


def _direction(theta_degrees, azimuth=0.4):
    theta = np.radians(theta_degrees)
    return np.array([np.sin(theta) * np.cos(azimuth), np.sin(theta) * np.sin(azimuth), np.cos(theta)])


def _coarse_points(shape):
    # coarse voxel m is the centre of fine voxels 2m and 2m + 1: (2m + 0.5) * 0.5 mm
    return np.stack(np.meshgrid(*[np.arange(n) * 1.0 + 0.25 for n in shape], indexing="ij"))


@pytest.mark.parametrize("theta", [0.0, 35.0, 90.0])
def test_sphere_field_is_zero_inside_and_dipolar_outside(theta):
    b0 = _direction(theta)
    chi_fine, _ = sample((2 * N,) * 3, FINE_MM, [("sphere", dict(centre=CENTRE, radius=6.0, chi=1.0))], b0)
    field = band_limited_field(chi_fine, FINE_MM, FACTOR, b0_direction=b0)
    assert field.shape == (N, N, N)
    points = _coarse_points(field.shape)
    _, expected = sphere(points, CENTRE, 6.0, 1.0, b0)
    r = np.sqrt(((points - CENTRE.reshape(3, 1, 1, 1)) ** 2).sum(0))
    away = (np.abs(r - 6.0) > EDGE_MARGIN_MM) & (r < 20)
    error = np.abs(field - expected)[away]
    print(f"\nsphere, B0 at {theta} deg: max error {error.max():.4f}, RMS {np.sqrt(np.mean(error**2)):.4f} x chi")
    assert error.max() < MAX_ERROR
    assert np.sqrt(np.mean(error**2)) < RMS_ERROR
    assert np.abs(field[r < 6.0 - EDGE_MARGIN_MM]).max() < MAX_ERROR  # the Lorentz sphere


@pytest.mark.parametrize("theta", [0.0, 30.0, 54.7356, 70.0, 90.0])
def test_infinite_cylinder_field_at_several_angles(theta):
    b0 = _direction(theta)
    # along the third axis without padding the FFT's periodicity makes the cylinder infinite
    source = [("cylinder", dict(point_on_axis=CENTRE, axis=(0, 0, 1), radius=5.0, chi=1.0))]
    chi_fine, _ = sample((2 * N, 2 * N, 8), FINE_MM, source, b0)
    field = band_limited_field(chi_fine, FINE_MM, FACTOR, b0_direction=b0, pad=(N // 2, N // 2, 0))
    points = _coarse_points(field.shape)
    _, expected = cylinder(points, CENTRE, (0, 0, 1), 5.0, 1.0, b0)
    rho = np.sqrt(((points[:2] - CENTRE[:2].reshape(2, 1, 1, 1)) ** 2).sum(0))
    away = (np.abs(rho - 5.0) > EDGE_MARGIN_MM) & (rho < 20)
    error = np.abs(field - expected)[away]
    inside = rho < 5.0 - EDGE_MARGIN_MM
    print(
        f"\ncylinder at {theta} deg: inside {field[inside].mean():+.4f} (closed form "
        f"{expected[inside].mean():+.4f}), max error {error.max():.4f} x chi"
    )
    assert error.max() < MAX_ERROR
    assert np.sqrt(np.mean(error**2)) < RMS_ERROR
    assert abs(field[inside].mean() - expected[inside].mean()) < 0.01


def test_the_crop_is_not_the_coarse_grids_own_model():
    """The field differs from the discrete model of the block-averaged map (no inverse crime)."""
    from qmri_workflows.core.dipole import forward_field

    b0 = _direction(20.0)
    sources = [
        ("sphere", dict(centre=CENTRE + offset, radius=radius, chi=chi))
        for offset, radius, chi in [((-5, 0, 3), 3.3, 1.0), ((6, 4, -2), 2.2, -0.7)]
    ]
    chi_fine, _ = sample((2 * N,) * 3, FINE_MM, sources, b0)
    cropped = band_limited_field(chi_fine, FINE_MM, FACTOR, b0_direction=b0)
    block = chi_fine.reshape(N, 2, N, 2, N, 2).mean(axis=(1, 3, 5))
    crime = forward_field(block, 1.0, b0_direction=b0)
    near = np.abs(crime) > 0.01
    difference = np.sqrt(np.mean((cropped - crime)[near] ** 2) / np.mean(crime[near] ** 2))
    print(f"\nrelative RMS difference of the cropped field from the coarse model: {difference:.3f}")
    assert difference > 0.02


def test_neck_extension_adds_the_field_of_sources_below_the_grid():
    b0 = _direction(0.0)
    slab = np.zeros((32, 32, 32), dtype=np.float32)
    slab[8:24, 8:24, :4] = 1.0  # a column leaving the grid at its bottom
    cut = band_limited_field(slab, 1.0, 1, b0_direction=b0)
    continued = band_limited_field(slab, 1.0, 1, b0_direction=b0, extend_low=(0, 0, 40))
    # a column ending at the grid's bottom has a pole there: its field above falls off; continued
    # below, the column is longer and its end field above it is weaker near the bottom edge
    assert not np.allclose(cut[:, :, 6:12], continued[:, :, 6:12], atol=1e-3)
    infinite_inside = 1.0 / 3.0  # an infinite column along B0: chi / 6 (3 - 1)
    assert abs(continued[16, 16, 0] - infinite_inside) < abs(cut[16, 16, 0] - infinite_inside)
